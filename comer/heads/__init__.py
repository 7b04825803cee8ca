from comer.heads.anchor_generator import AnchorGenerator
from comer.heads.bbox_head import SharedFCBBoxHead
from comer.heads.conv_module import ConvModule
from comer.heads.fcn_head import FCNHead
from comer.heads.fpn import FPN
from comer.heads.mask_head import FCNMaskHead, mask_targets
from comer.heads.mask_paste import paste_masks
from comer.heads.max_iou_assigner import AssignResult, MaxIoUAssigner
from comer.heads.multiclass_nms import multiclass_nms
from comer.heads.random_sampler import RandomSampler, SamplingResult
from comer.heads.roi_extractor import RoIExtractor
from comer.heads.rpn_head import RPNHead
from comer.heads.semantic_fpn import SemanticFPNHead
from comer.heads.standard_roi_head import StandardRoIHead
from comer.heads.uper_head import UPerHead

__all__ = [
    "AnchorGenerator", "AssignResult", "ConvModule", "FCNHead", "FCNMaskHead", "FPN", "MaxIoUAssigner", "RPNHead",
    "RandomSampler", "RoIExtractor", "SamplingResult", "SemanticFPNHead", "SharedFCBBoxHead", "StandardRoIHead",
    "UPerHead",
    "mask_targets", "multiclass_nms", "paste_masks",
]
