from comer.metrics.coco import CocoMetric, evaluate_results, evaluate_results_file
from comer.metrics.segmentation import SegmentationIoU, format_table

__all__ = ["CocoMetric", "SegmentationIoU", "evaluate_results", "evaluate_results_file", "format_table"]
