"""Hot ops, each beside its pure-PyTorch reference, and the box utilities of detection."""
from .box_coder import DeltaXYWHBBoxCoder
from .boxes import bbox_overlaps, box_area, box_iou, clip_boxes
from .ms_deform_attn import (
    get_ms_deform_attn_impl,
    ms_deform_attn,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
    set_ms_deform_attn_impl,
)
from .nms import batched_nms, nms
from .roi_align import get_roi_align_impl, roi_align, roi_align_reference, roi_align_triton, set_roi_align_impl

__all__ = [
    "DeltaXYWHBBoxCoder", "batched_nms", "bbox_overlaps", "box_area", "box_iou", "clip_boxes",
    "get_ms_deform_attn_impl", "get_roi_align_impl", "ms_deform_attn", "ms_deform_attn_reference",
    "ms_deform_attn_triton", "nms", "roi_align", "roi_align_reference", "roi_align_triton",
    "set_ms_deform_attn_impl", "set_roi_align_impl",
]
