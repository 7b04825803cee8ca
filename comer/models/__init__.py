from comer.models.build import build_detector, detector_config, instantiate_detector
from comer.models.mask_rcnn import MaskRCNN, build_mask_rcnn
from comer.models.segmentor import EncoderDecoder, build_segmentor

__all__ = ["EncoderDecoder", "MaskRCNN", "build_detector", "build_mask_rcnn", "build_segmentor", "detector_config",
           "instantiate_detector"]
