"""What a run prints: the composed config as a tree and its tags at the start, and not the libraries' noise.

Each message left out is named exactly (by its text and the module or logger that emits it), so anything else
a library says still shows:

* Lightning's tips (advertisements for litlogger and litmodels), its note that ``limit_val_batches=1.0`` uses
  100% of the batches,
  its note that checkpoints default to ``weights_only=False``;
* torch's FutureWarning about ``isinstance(treespec, LeafSpec)``, raised from Lightning's own ``_pytree.py`` (and,
  during ONNX export, from ``copyreg``), and the DataLoader's note that ``pin_memory`` does nothing without a GPU;
* the ONNX exporter's notes that torchvision, which this project does not use, is not installed;
* Lightning's model-summary FLOPs, which it counts only for a module with an ``example_input_array`` and
  otherwise prints as 0 (comer.app.complexity_record logs the measured ones): :class:`ModelSummaryWithoutFlops`.

The W&B "anonymous setting" warning is answered in comer/app/wandb_logger.py, the DataLoader's warning about
more workers than CPUs by capping the workers (comer/app/builders.py).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import yaml
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

# Libraries' informational messages that say nothing about this run: (logger, the message's start).
LIBRARY_NOTES = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: "),  # litlogger's and litmodels' advertisements
    ("lightning.pytorch.utilities.rank_zero", "`Trainer(limit_val_batches=1.0)` was configured so 100%"),
    ("lightning.pytorch.utilities.rank_zero", "Trainer already configured with model summary callbacks"),
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", "`weights_only` was not set"),
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed. Skipping torchvision::"),
)
# Library warnings about library internals: (category, message regex, module regex of the warning's location).
LIBRARY_WARNINGS = (
    # from Lightning's _pytree, and from copyreg while torch.export copies tree specs
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     r"(lightning\.pytorch\.utilities\._pytree|copyreg)"),
    # data.pin_memory=true (the GPU recipes') on a machine without one: nothing to pin to, nothing lost
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found",
     r"torch\.utils\.data\.dataloader"),
)

# The config tree shows these groups first, then the other top-level keys in their order.
CONFIG_TREE_ORDER = ("data", "model", "backbone", "module", "trainer", "callbacks", "logger", "paths")
CONFIG_TREE_TITLE = "CONFIG"
TREE_INDENT = "    "
YAML_WIDTH = 110
YAML_DOCUMENT_END = "\n..."  # what PyYAML appends to a lone scalar

FLOPS_COLUMN = "FLOPs"
SUMMARY_COLUMN_SEPARATOR = " | "
SUMMARY_TOTALS_WIDTH = 10


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Leave out the messages named in this module's docstring (idempotent: a second call adds nothing)."""
    prefixes: dict[str, list[str]] = {}
    for logger_name, prefix in LIBRARY_NOTES:
        prefixes.setdefault(logger_name, []).append(prefix)
    for logger_name, names in prefixes.items():
        logger = logging.getLogger(logger_name)
        for existing in [f for f in logger.filters if isinstance(f, DropMessages)]:
            logger.removeFilter(existing)
        logger.addFilter(DropMessages(names))
    for category, message, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


# ------------------------------------------------------------------------------------------ config tree
def _tree_keys(cfg: DictConfig, order: Sequence[str]) -> list[str]:
    first = [key for key in order if key in cfg]
    return first + [key for key in cfg if key not in first]


def _is_group(value) -> bool:
    return isinstance(value, DictConfig)


class _TreeDumper(yaml.SafeDumper):
    """Block YAML, except that a list of plain values stays on one line (``crop_size: [512, 512]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_TreeDumper.add_representer(list, _represent_list)


def _yaml(value) -> str:
    """A config node as YAML, resolved."""
    container = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    return yaml.dump(container, Dumper=_TreeDumper, default_flow_style=False, sort_keys=False,
                     width=YAML_WIDTH).rstrip("\n")


def _leaf_text(key: str, value) -> str:
    return f"{key}: {_yaml(value).removesuffix(YAML_DOCUMENT_END)}"


def config_tree_text(cfg: DictConfig, order: Sequence[str] = CONFIG_TREE_ORDER) -> str:
    """The resolved config as a plain indented tree: one branch per group with its YAML beneath, one line per
    top-level value."""
    lines = [CONFIG_TREE_TITLE]
    for key in _tree_keys(cfg, order):
        if _is_group(cfg[key]):
            lines.append(f"{key}:")
            lines.extend(TREE_INDENT + line for line in _yaml(cfg[key]).splitlines())
        else:
            lines.append(_leaf_text(key, cfg[key]))
    return "\n".join(lines)


def print_config_tree(cfg: DictConfig, order: Sequence[str] = CONFIG_TREE_ORDER) -> None:
    """Print the resolved config as a tree (lightning-hydra-template's ``print_config_tree``): with rich, a rich
    tree with YAML highlighting; without it, :func:`config_tree_text`."""
    try:
        import rich
        from rich.syntax import Syntax
        from rich.text import Text
        from rich.tree import Tree
    except ImportError:
        print(config_tree_text(cfg, order), flush=True)
        return
    tree = Tree(CONFIG_TREE_TITLE, style="dim", guide_style="dim")
    for key in _tree_keys(cfg, order):
        if _is_group(cfg[key]):
            tree.add(key, style="bold", guide_style="dim").add(Syntax(_yaml(cfg[key]), "yaml", word_wrap=True))
        else:
            tree.add(Text(_leaf_text(key, cfg[key])))  # plain text: `[a, b]` is not rich markup
    rich.print(tree)


def announce_run(cfg: DictConfig) -> None:
    """At the start of a run (rank zero): the config tree unless ``extras.print_config=false``, and its tags."""
    if (cfg.get("extras") or {}).get("print_config", False):
        print_config_tree(cfg)
    tags = list(cfg.get("tags") or [])
    if tags:
        log.info("tags: %s", ", ".join(tags))


# ------------------------------------------------------------------------------------------ model summary
def summary_table(columns: Sequence[tuple[str, Sequence[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float) -> str:
    """The layer table of ``columns`` ((header, cells) pairs) and the parameter totals, as plain text."""
    widths = [max([len(header), *(len(str(cell)) for cell in cells)]) for header, cells in columns]
    rule = "-" * (sum(widths) + len(SUMMARY_COLUMN_SEPARATOR) * (len(widths) - 1))
    rows = [SUMMARY_COLUMN_SEPARATOR.join(h.ljust(w) for (h, _), w in zip(columns, widths)), rule]
    for cells in zip(*(cells for _, cells in columns)):
        rows.append(SUMMARY_COLUMN_SEPARATOR.join(str(c).ljust(w) for c, w in zip(cells, widths)))
    rows.append(rule)
    totals = ((get_human_readable_count(trainable_parameters), "Trainable params"),
              (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
              (get_human_readable_count(total_parameters), "Total params"),
              (f"{model_size:,.3f}", "Total estimated model params size (MB)"))
    rows.extend(value.ljust(SUMMARY_TOTALS_WIDTH) + label for value, label in totals)
    return "\n".join(rows)


class ModelSummaryWithoutFlops(ModelSummary):
    """Lightning's model summary (layers, parameter counts, size) without the FLOPs column and total."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict, total_flops: int, **summarize_kwargs) -> None:
        columns = [(header, cells) for header, cells in summary_data if header != FLOPS_COLUMN]
        log.info("model summary:\n%s", summary_table(columns, total_parameters, trainable_parameters, model_size))


def console_callbacks(cfg: DictConfig) -> list:
    """The callbacks that replace Lightning's noisy defaults (none when the model summary is switched off)."""
    return [ModelSummaryWithoutFlops()] if cfg.trainer.get("enable_model_summary", True) else []
