from comer.metrics.segmentation import SegmentationIoU, format_table

__all__ = ["SegmentationIoU", "format_table"]
