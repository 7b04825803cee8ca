"""ONNX export of a segmentor's single-window forward, and of its backbone alone, checked with onnxruntime:

    python -m comer.export ckpt_path=/ckpt/upernet_comer_s.pth task=ade20k backbone=comer_s

(conf/export.yaml; needs the `export` extra: pip install -e ".[export]"). The segmentor graph maps a
normalised window [B, 3, H, W] (the task's crop, ImageNet mean/std already applied; both are stored in the
model's metadata) to logits [B, num_classes, H, W]; slide inference, flipping and the argmax stay outside.
The backbone graph maps the same input to res2..res5.

Export goes through torch.export (the dynamo-based torch.onnx exporter). Multi-scale deformable attention
reaches it as the opaque custom op `comer::ms_deform_attn`; `ms_deform_attn_onnx` lowers that op to ONNX as
the PyTorch reference computes it (a bilinear GridSample per level, zero padding, align_corners=False: opset
>= 16). Batch, height and width are dynamic (multiples of 32) where the model allows it: the dynamic graph
must match PyTorch at the export size and at a second size and batch (the ViT-CoMer backbones do; UperNet's
pyramid pooling does not), else the graph is exported again, fixed to the export size, and the summary says
why. Each graph is run in onnxruntime on the CPU; the largest absolute differences from PyTorch go to the log
and to export.json.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import hydra
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from comer import kernels
from comer.app.builders import apply_process_switches, build_model, check_config
from comer.app.console import quiet_library_noise
from comer.backbones.vit_comer import OUTPUT_STRIDES
from comer.checkpoint import load_segmentor_checkpoint
from comer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from comer.training.checkpoint_io import atomic_write_text

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MIN_OPSET = 16  # GridSample
SIZE_MULTIPLE = max(OUTPUT_STRIDES)  # every backbone here needs H and W divisible by its coarsest stride
INPUT_NAME = "images"
SEGMENTOR_OUTPUTS = ("logits",)
SEGMENTOR_FILE, BACKBONE_FILE, SUMMARY_FILE = "segmentor.onnx", "backbone.onnx", "export.json"
# Weights go to a side file (<name>.onnx.data) past this size: one protobuf message holds at most 2 GiB.
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB
CHECK_SEED = 0
QUIET_LOGGERS = ("onnxscript", "onnx_ir")  # the exporter's graph passes log every rewrite at INFO
SECOND_SIZE_STEP = SIZE_MULTIPLE  # the second check input: + 1 image, + 1 step in height, + 2 in width


class ExportCheckError(RuntimeError):
    pass


# --- the deformable-attention op in ONNX ----------------------------------------------------------
def ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl):
    """ONNX lowering of `comer::ms_deform_attn` (any impl: they compute the same), as the PyTorch reference:
    per level, the level's values [N*M, D, h, w] sampled bilinearly (GridSample, zero padding,
    align_corners=False) at 2 * location - 1, weighted over the points and summed over the levels.

    Shapes as in comer/kernels/ms_deform_attn/reference.py; the level sizes are read from spatial_shapes and
    level_start_index in the graph, so the lowering holds for dynamic image sizes."""
    from onnxscript import opset18 as op

    _, _, heads, num_levels, _, _ = sampling_locations.shape
    head_dim = value.shape[3]

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def flatten_heads(tensor, perm, tail_start):
        """Transpose by perm (heads second), then merge batch and heads: [N*M, ...]."""
        tensor = op.Transpose(tensor, perm=perm)
        return op.Reshape(tensor, op.Concat(ints(-1), op.Shape(tensor, start=tail_start), axis=0))

    # [N, Lq, M, L, P, 2] -> [N*M, L, Lq, P, 2] in grid_sample's [-1, 1]; weights [N, Lq, M, L, P] -> [N*M, L, Lq, P]
    grids = flatten_heads(sampling_locations, [0, 2, 3, 1, 4, 5], 2)
    grids = op.Sub(op.Mul(grids, op.CastLike(op.Constant(value_float=2.0), grids)),
                   op.CastLike(op.Constant(value_float=1.0), grids))
    weights = op.Unsqueeze(flatten_heads(attention_weights, [0, 2, 3, 1, 4], 2), ints(2))  # [N*M, L, 1, Lq, P]
    value = op.Transpose(value, perm=[0, 2, 3, 1])  # [N, S, M, D] -> [N, M, D, S]
    output = None
    for level in range(num_levels):
        index = ints(level)
        size = op.Reshape(op.Gather(spatial_shapes, index, axis=0), ints(2))  # (h, w)
        start = op.Gather(level_start_index, index, axis=0)
        level_value = op.Slice(value, start, op.Add(start, op.ReduceProd(size, keepdims=1)), ints(3))
        level_value = op.Reshape(level_value, op.Concat(ints(-1, head_dim), size, axis=0))  # [N*M, D, h, w]
        sampled = op.GridSample(level_value, op.Squeeze(op.Gather(grids, index, axis=1), ints(1)),
                                mode="bilinear", padding_mode="zeros", align_corners=0)  # [N*M, D, Lq, P]
        level_weights = op.Squeeze(op.Gather(weights, index, axis=1), ints(1))  # [N*M, 1, Lq, P]
        contribution = op.ReduceSum(op.Mul(sampled, level_weights), ints(-1), keepdims=0)  # [N*M, D, Lq]
        output = contribution if output is None else op.Add(output, contribution)
    num_queries = op.Shape(sampling_locations, start=1, end=2)
    output = op.Reshape(output, op.Concat(ints(-1, heads * head_dim), num_queries, axis=0))
    return op.Transpose(output, perm=[0, 2, 1])  # [N, Lq, M*D]


def custom_translations() -> dict[Callable, Callable]:
    return {torch.ops.comer.ms_deform_attn.default: ms_deform_attn_onnx}


# --- export and check -----------------------------------------------------------------------------
@dataclass
class ExportedModel:
    path: str
    outputs: list[str]
    input_shape: list[int]
    dynamic: bool
    static_reason: str | None = None  # why the graph is fixed to the export size
    max_abs_error: dict[str, float] = field(default_factory=dict)  # per checked input shape
    max_abs_reference: dict[str, float] = field(default_factory=dict)


class _Outputs(nn.Module):
    """The module's outputs as a tuple in a fixed order (dict outputs by name)."""

    def __init__(self, module: nn.Module, names: Sequence[str]):
        super().__init__()
        self.module = module
        self.names = tuple(names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(images)
        if isinstance(out, Mapping):
            return tuple(out[name] for name in self.names)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _dynamic_shapes() -> dict:
    dim = torch.export.Dim
    return {INPUT_NAME: {0: dim("batch"), 2: SIZE_MULTIPLE * dim("height_blocks"),
                         3: SIZE_MULTIPLE * dim("width_blocks")}}


def _export_failure(error: Exception) -> str:
    """The innermost cause of a failed torch.onnx export, in one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def export_onnx(module: nn.Module, images: torch.Tensor, path: str | Path, output_names: Sequence[str],
                opset: int = 18, dynamic_example: torch.Tensor | None = None,
                metadata: Mapping[str, object] | None = None, optimize: bool = True) -> ExportedModel:
    """Export ``module`` (put in eval mode; float32, CPU) to ``path``. With ``dynamic_example`` (traced with
    dynamic batch, height and width: torch.export fixes a size-1 dim, so it is not ``images``), when the forward
    allows it; otherwise, or when that export fails, fixed to ``images``' shape [B, 3, H, W]. ``optimize``: run
    onnxscript's graph optimiser (constant folding, fusions) on the traced graph; on a ViT-CoMer it takes about
    two thirds of the export time."""
    if opset < MIN_OPSET:
        raise ValueError(f"export: opset {opset} < {MIN_OPSET}: GridSample (deformable attention) needs opset >= 16")
    for example in (images, dynamic_example):
        if example is not None and (example.dim() != 4 or example.shape[-1] % SIZE_MULTIPLE
                                    or example.shape[-2] % SIZE_MULTIPLE):
            raise ValueError(f"export: images must be [B, 3, H, W] with H and W multiples of {SIZE_MULTIPLE}, got "
                             f"{tuple(example.shape)}")
    wrapped = _Outputs(module, output_names).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(input_names=[INPUT_NAME], output_names=list(output_names), opset_version=opset, dynamo=True,
                   custom_translation_table=custom_translations(), optimize=optimize, verbose=False)
    static_reason = "dynamic_size=false"
    program = None
    with torch.no_grad():
        if dynamic_example is not None:
            try:
                program = torch.onnx.export(wrapped, (dynamic_example,), dynamic_shapes=_dynamic_shapes(), **options)
                static_reason = None
            except Exception as error:  # the forward specialises on the input size: fall back to a fixed size
                static_reason = f"no dynamic-size export: {_export_failure(error)}"
                log.warning("export: %s has %s; fixing the graph to %s", type(module).__name__, static_reason,
                            tuple(images.shape))
        if program is None:
            program = torch.onnx.export(wrapped, (images,), **options)
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = str(value)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return ExportedModel(path=str(path), outputs=list(output_names), input_shape=list(images.shape),
                         dynamic=static_reason is None, static_reason=static_reason)


def check_onnx(exported: ExportedModel, module: nn.Module, inputs: Sequence[torch.Tensor]) -> ExportedModel:
    """Run the ONNX file in onnxruntime (CPU) on each input and record the largest absolute difference from
    ``module``'s outputs, over all outputs, per input shape."""
    import onnxruntime

    session = onnxruntime.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    wrapped = _Outputs(module, exported.outputs).eval()
    for images in inputs:
        shape = "x".join(map(str, images.shape))
        with torch.no_grad():
            expected = wrapped(images)
        try:
            got = session.run(list(exported.outputs), {INPUT_NAME: images.numpy()})
        except Exception as error:  # onnxruntime's own exception types: a size the graph was not built for
            raise ExportCheckError(f"onnxruntime fails on {shape} ({_export_failure(error)})") from error
        exported.max_abs_error[shape] = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
        exported.max_abs_reference[shape] = max(float(e.abs().max()) for e in expected)
    return exported


def check_inputs(shape: Sequence[int], dynamic: bool) -> list[torch.Tensor]:
    """Random normalised images: the export shape, and for a dynamic graph a second one with one more image,
    one more size multiple on the height and two on the width (the dynamic graph is traced on it)."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    batch, channels, height, width = shape
    shapes = [(batch, channels, height, width)]
    if dynamic:
        shapes.append((batch + 1, channels, height + SECOND_SIZE_STEP, width + 2 * SECOND_SIZE_STEP))
    return [torch.randn(s, generator=generator) for s in shapes]


def _first_mismatch(exported: ExportedModel, module: nn.Module, inputs: Sequence[torch.Tensor],
                    atol: float) -> str | None:
    """Check ``exported`` on every input; a description of the first failure (onnxruntime refuses the input,
    or the outputs differ by more than atol), None when it holds everywhere."""
    try:
        check_onnx(exported, module, inputs)
    except ExportCheckError as error:
        return str(error)
    bad = {shape: error for shape, error in exported.max_abs_error.items() if error > atol}
    return f"max abs error {bad} > {atol}" if bad else None


def export_and_check(module: nn.Module, shape: Sequence[int], path: Path, output_names: Sequence[str], opset: int,
                     dynamic: bool, atol: float, metadata: Mapping[str, object], optimize: bool = True) -> ExportedModel:
    """Export and check with onnxruntime (max abs error per input shape in the result; above ``atol`` it fails).
    A dynamic graph must hold at both check inputs; one that does not (a forward that specialised silently on
    the traced size) is exported again, fixed to ``shape``."""
    inputs = check_inputs(shape, dynamic)
    exported = export_onnx(module, inputs[0], path, output_names, opset, inputs[-1] if dynamic else None, metadata,
                           optimize)
    if exported.dynamic:
        problem = _first_mismatch(exported, module, inputs, atol)
        if problem is None:
            log.info("%s: dynamic batch/height/width; max abs error vs PyTorch %s", path.name, exported.max_abs_error)
            return exported
        log.warning("export: the dynamic graph of %s does not hold (%s); fixing it to %s", type(module).__name__,
                    problem, tuple(shape))
        exported = export_onnx(module, inputs[0], path, output_names, opset, None, metadata, optimize)
        exported.static_reason = f"the dynamic graph does not hold: {problem}"
    problem = _first_mismatch(exported, module, inputs[:1], atol)
    log.info("%s: fixed to %s; max abs error vs PyTorch %s", path.name, tuple(shape), exported.max_abs_error)
    if problem is not None:
        raise ExportCheckError(f"{path}: {problem} (export.atol)")
    return exported


# --- the entry point ------------------------------------------------------------------------------
def export(cfg: DictConfig) -> dict:
    """Build the task's segmentor for ``cfg.backbone``, load ``cfg.ckpt_path`` (our Lightning checkpoint or a
    released mmseg one), export segmentor and backbone to ONNX in the run directory and check both."""
    quiet_library_noise()
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).resolve())
    check_config(cfg)
    checkpoint = Path(cfg.ckpt_path).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    settings = cfg.export
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    apply_process_switches(cfg)
    kernels.set_ms_deform_attn_impl("reference")  # the exported graph and the PyTorch side of the check
    segmentor = build_model(cfg).eval()
    report = load_segmentor_checkpoint(segmentor, checkpoint)
    log.info("loaded %s", report)
    height, width = settings.image_size
    shape = (int(settings.batch_size), 3, int(height), int(width))
    output_dir = Path(cfg.paths.output_dir)
    metadata = {"input": f"{INPUT_NAME} [B, 3, H, W] float32 RGB, (pixel in 0..255 - image_mean) / image_std",
                "image_mean": list(cfg.module.get("image_mean", IMAGENET_MEAN)),
                "image_std": list(cfg.module.get("image_std", IMAGENET_STD)),
                "num_classes": segmentor.num_classes, "backbone": cfg.backbone_name, "checkpoint": str(checkpoint)}
    common = dict(opset=int(settings.opset), dynamic=bool(settings.dynamic_size), atol=float(settings.atol),
                  optimize=bool(settings.optimize))
    models = {"segmentor": export_and_check(segmentor, shape, output_dir / SEGMENTOR_FILE, SEGMENTOR_OUTPUTS,
                                            metadata={**metadata, "output": "logits [B, num_classes, H, W]"}, **common)}
    if settings.backbone:
        names = list(segmentor.backbone.output_shape())
        models["backbone"] = export_and_check(segmentor.backbone, shape, output_dir / BACKBONE_FILE, names,
                                              metadata={**metadata, "output": ", ".join(names)}, **common)
    summary = {"checkpoint": str(checkpoint), "opset": int(settings.opset), "optimized": bool(settings.optimize),
               "models": {name: asdict(model) for name, model in models.items()}}
    atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    log.info("ONNX models and %s written to %s", SUMMARY_FILE, output_dir)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
