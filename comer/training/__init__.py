"""The Lightning side of training: module, layer-decay optimizer groups, schedules, checkpoint IO."""
from .checkpoint_io import AtomicCheckpointIO
from .csv_logger import ContinuingCSVLogger
from .last_checkpoint import LastCheckpoint
from .layer_decay import build_optimizer, param_groups_layer_decay
from .schedulers import poly_warmup_scheduler, step_warmup_scheduler
from .seg_module import NonFiniteLossError, SegmentationModule

__all__ = ["AtomicCheckpointIO", "ContinuingCSVLogger", "LastCheckpoint", "build_optimizer", "param_groups_layer_decay", "poly_warmup_scheduler",
           "step_warmup_scheduler", "SegmentationModule", "NonFiniteLossError"]
