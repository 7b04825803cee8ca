"""The Lightning side of training: task modules, layer-decay optimizer groups, schedules, checkpoint IO."""
from .checkpoint_io import AtomicCheckpointIO
from .csv_logger import ContinuingCSVLogger
from .det_module import DetectionModule
from .last_checkpoint import LastCheckpoint
from .layer_decay import build_optimizer, param_groups_layer_decay
from .schedulers import poly_warmup_scheduler, step_warmup_scheduler
from .seg_module import SegmentationModule
from .task_module import NonFiniteLossError, TaskModule

__all__ = ["AtomicCheckpointIO", "ContinuingCSVLogger", "DetectionModule", "LastCheckpoint", "NonFiniteLossError",
           "SegmentationModule", "TaskModule", "build_optimizer", "param_groups_layer_decay", "poly_warmup_scheduler",
           "step_warmup_scheduler"]
