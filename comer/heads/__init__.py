from comer.heads.conv_module import ConvModule
from comer.heads.fcn_head import FCNHead
from comer.heads.uper_head import UPerHead

__all__ = ["ConvModule", "FCNHead", "UPerHead"]
