"""ONNX export (comer.export): the deformable-attention lowering and the relative position bias with dynamic
sizes, the fallback to a fixed size, and comer_t's segmentor and backbone end to end, each run in onnxruntime."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from app_utils import compose_config  # noqa: E402
from comer.app.builders import build_model  # noqa: E402
from comer.export import ExportCheckError, export, export_and_check  # noqa: E402
from comer.kernels import set_ms_deform_attn_impl  # noqa: E402
from comer.layers import Attention, LevelLayout, MSDeformAttn  # noqa: E402

FLOAT32_ATOL = 1e-4


@pytest.fixture(autouse=True)
def _reference_attention():
    set_ms_deform_attn_impl("reference")  # conftest resets it after the test


class DeformableAndRelativePosition(nn.Module):
    """The size-dependent pieces of our backbones in one small graph: the three pooled levels of an image
    (strides 8, 16, 32) attending to each other through MSDeformAttn (the op and its layout tensors follow the
    input size, as in ViT-CoMer), and the stride-16 tokens through BEiT relative-position attention, global
    (table learned on 4x4, resized to the grid) and in 3x3 windows."""

    def __init__(self, dim=8, heads=2, points=3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 1)
        self.deformable = MSDeformAttn(dim, heads, num_levels=3, num_points=points)
        self.global_attn = Attention(dim, heads, rel_pos_grid=(4, 4))
        self.window_attn = Attention(dim, heads, window_size=3, rel_pos_grid=(4, 4))
        with torch.no_grad():  # spread the sampling points (some fall outside the map: zero padding); bias tables
            self.deformable.sampling_offsets.weight.normal_(0, 2.0)
            self.deformable.attention_weights.weight.normal_(0, 1.0)
            self.global_attn.relative_position_bias_table.normal_()
            self.window_attn.relative_position_bias_table.normal_()

    def forward(self, images):
        layout = LevelLayout.from_image_size(images.shape[-2], images.shape[-1], images.device)
        maps = [F.avg_pool2d(self.embed(images), stride) for stride in (8, 16, 32)]
        tokens = layout.from_maps(maps)
        mixed = self.deformable(tokens, tokens, layout, layout.reference_points(tokens.dtype))
        grid = layout.vit_grid
        vit_tokens = maps[layout.vit_level].flatten(2).transpose(1, 2)
        return mixed, self.window_attn(self.global_attn(vit_tokens, grid), grid)


def test_deformable_attention_and_relative_position_bias_export_dynamic(tmp_path):
    """comer::ms_deform_attn lowered to ONNX (GridSample per level) and the relative position bias (table
    resize, index) match PyTorch at the traced size and at another batch and size: sizes come from the graph."""
    torch.manual_seed(3)
    exported = export_and_check(DeformableAndRelativePosition().eval(), (1, 3, 64, 96), tmp_path / "attn.onnx",
                                ["deformable", "relative"], opset=18, dynamic=True, atol=FLOAT32_ATOL, metadata={})
    assert exported.dynamic and exported.static_reason is None
    assert list(exported.max_abs_error) == ["1x3x64x96", "2x3x96x160"]
    assert max(exported.max_abs_error.values()) < 1e-5 < min(exported.max_abs_reference.values())


class PinnedPooling(nn.Module):
    """Adaptive pooling to 3x3 (as UperNet's pyramid pooling): its ONNX lowering is built for the traced size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 32, stride=32)

    def forward(self, images):
        pooled = F.adaptive_avg_pool2d(self.conv(images), 3)
        return F.interpolate(pooled, size=images.shape[-2:], mode="bilinear", align_corners=False)


def test_graph_that_does_not_hold_at_another_size_is_fixed(tmp_path):
    torch.manual_seed(5)
    exported = export_and_check(PinnedPooling().eval(), (1, 3, 64, 64), tmp_path / "pool.onnx", ["out"], opset=18,
                                dynamic=True, atol=FLOAT32_ATOL, metadata={"note": "x"})
    assert not exported.dynamic and exported.static_reason.startswith("the dynamic graph does not hold")
    assert list(exported.max_abs_error) == ["1x3x64x64"] and exported.max_abs_error["1x3x64x64"] < 1e-5
    import onnx

    model = onnx.load(exported.path)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 64, 64]
    assert {p.key: p.value for p in model.metadata_props}["note"] == "x"
    with pytest.raises(ExportCheckError, match="max abs error"):
        export_and_check(PinnedPooling().eval(), (1, 3, 64, 64), tmp_path / "strict.onnx", ["out"], opset=18,
                         dynamic=False, atol=0.0, metadata={})
    with pytest.raises(ValueError, match="opset 15"):
        export_and_check(PinnedPooling().eval(), (1, 3, 64, 64), tmp_path / "old.onnx", ["out"], opset=15,
                         dynamic=False, atol=1.0, metadata={})


def test_failed_dynamic_export_falls_back_to_the_fixed_size(tmp_path, monkeypatch):
    """When torch.export refuses the dynamic shapes, the graph is exported at the fixed size and says why."""
    export_for_real = torch.onnx.export

    def refuse_dynamic(*args, dynamic_shapes=None, **kwargs):
        if dynamic_shapes is not None:
            raise RuntimeError("export failed") from ValueError("Constraints violated (height_blocks)")
        return export_for_real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", refuse_dynamic)
    exported = export_and_check(nn.Hardswish(), (1, 3, 32, 64), tmp_path / "fixed.onnx", ["out"], opset=18,
                                dynamic=True, atol=FLOAT32_ATOL, metadata={})
    assert not exported.dynamic
    assert exported.static_reason == "no dynamic-size export: ValueError: Constraints violated (height_blocks)"
    assert list(exported.max_abs_error) == ["1x3x32x64"] and exported.max_abs_error["1x3x32x64"] < 1e-6


@pytest.mark.slow
def test_export_comer_t_segmentor_and_backbone(tmp_path):
    """`python -m comer.export ckpt_path=... backbone=comer_t` on one of our Lightning checkpoints: the
    segmentor's single 64x64 window and the backbone alone, each checked in onnxruntime (float32). The graphs
    are written as traced (export.optimize=false): onnxscript's optimiser, which the smaller exports above run,
    is two thirds of the export time of a whole ViT-CoMer."""
    overrides = ["backbone=comer_t", "task=synthetic_seg", "model.decode_head.channels=16",
                 "model.auxiliary_head.channels=8", "export.image_size=[64,64]", "export.dynamic_size=false",
                 "export.optimize=false"]
    cfg = compose_config("export", overrides + [f"ckpt_path={tmp_path / 'run.ckpt'}"], tmp_path)
    torch.manual_seed(6)
    segmentor = build_model(cfg)
    with torch.no_grad():  # trained-looking BatchNorm statistics and a non-zero CTI gate
        for name, value in segmentor.state_dict().items():
            if name.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", ".gamma")) or "cti_to_vit.gamma" in name:
                value.normal_(0, 0.1)
    state = {f"model.{k}": v for k, v in segmentor.state_dict().items()}
    torch.save({"pytorch-lightning_version": "2.6.6", "global_step": 1, "state_dict": state}, tmp_path / "run.ckpt")

    summary = export(cfg)
    out_dir = tmp_path / "outputs" / cfg.run_name / "run"
    assert json.loads((out_dir / "export.json").read_text()) == summary
    assert summary["optimized"] is False
    for name, outputs in (("segmentor", ["logits"]), ("backbone", ["res2", "res3", "res4", "res5"])):
        model = summary["models"][name]
        assert model["outputs"] == outputs and model["input_shape"] == [1, 3, 64, 64]
        assert (out_dir / f"{name}.onnx").is_file()
        error, = model["max_abs_error"].values()
        assert error < FLOAT32_ATOL and max(model["max_abs_reference"].values()) > 0.1, (name, model)
