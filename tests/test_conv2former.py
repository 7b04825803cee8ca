"""Conv2Former backbone: equal (float64, 1e-10) to a functional reading of official-key weights loaded through the
"conv2former" checkpoint format, parameter counts against the paper, input errors, and a few training steps of the
synthetic segmentation app and of Mask R-CNN."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from app_utils import CONFIG_DIR, TINY_SYNTHETIC, compose_config
from comer.app import train
from comer.backbones import Conv2Former, build_backbone
from comer.checkpoint import DEFAULT_ALLOW_MISSING, CheckpointKeyError, detect_format, load_pretrained
from comer.models import build_detector, detector_config, instantiate_detector
from test_mask_rcnn import CLASSES, LOSS_KEYS, NARROW, synthetic_batch

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
EPS = 1e-6  # every LayerNorm of the official model
BN_EPS = 1e-5  # nn.BatchNorm2d's default, the official stem's
HEAD_WIDTH = 1280  # the official classifier: 1x1 conv to 1280, GELU, LayerNorm, pooling, Linear
IMAGENET_CLASSES = 1000
TOLERANCE = 1e-10
VARIANTS = ["conv2former_n", "conv2former_t", "conv2former_s", "conv2former_b", "conv2former_l"]


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: oversubscribed intra-op threads make small models much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def official_state(dims, depths, mlp_ratio, kernel, generator) -> dict[str, torch.Tensor]:
    """Random float64 weights under the official HVision-NKU/Conv2Former names, classifier included."""
    def rand(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    def conv(prefix, out_ch, in_ch, k, groups=1, bias=True):
        state = {f"{prefix}.weight": rand(out_ch, in_ch // groups, k, k, scale=(in_ch // groups * k * k) ** -0.5)}
        return state | ({f"{prefix}.bias": rand(out_ch)} if bias else {})

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + rand(dim, scale=0.1), f"{prefix}.bias": rand(dim, scale=0.1)}

    def batch_norm(prefix, dim):
        variance = 0.5 + torch.rand(dim, generator=generator, dtype=torch.float64)
        return norm(prefix, dim) | {f"{prefix}.running_mean": rand(dim, scale=0.1), f"{prefix}.running_var": variance,
                                    f"{prefix}.num_batches_tracked": torch.tensor(100)}

    half = dims[0] // 2
    state = conv("downsample_layers.0.0", half, 3, 3, bias=False) | batch_norm("downsample_layers.0.2", half)
    state |= conv("downsample_layers.0.3", half, half, 3, bias=False) | batch_norm("downsample_layers.0.5", half)
    state |= conv("downsample_layers.0.6", dims[0], half, 2, bias=False)
    for i in range(1, 4):
        state |= norm(f"downsample_layers.{i}.0", dims[i - 1])
        state |= conv(f"downsample_layers.{i}.1", dims[i], dims[i - 1], 2)
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        hidden = dim * mlp_ratio
        for j in range(depth):
            b = f"stages.{i}.{j}"
            state |= norm(f"{b}.attn.norm", dim) | conv(f"{b}.attn.att.0", dim, dim, 1)
            state |= conv(f"{b}.attn.att.2", dim, dim, kernel, groups=dim)
            state |= conv(f"{b}.attn.v", dim, dim, 1) | conv(f"{b}.attn.proj", dim, dim, 1)
            state |= norm(f"{b}.mlp.norm", dim) | conv(f"{b}.mlp.fc1", hidden, dim, 1)
            state |= conv(f"{b}.mlp.pos", hidden, hidden, 3, groups=hidden) | conv(f"{b}.mlp.fc2", dim, hidden, 1)
            state[f"{b}.layer_scale_1"] = rand(dim, scale=0.5)
            state[f"{b}.layer_scale_2"] = rand(dim, scale=0.5)
    state |= conv("head.0", HEAD_WIDTH, dims[-1], 1) | norm("head.2", HEAD_WIDTH)
    state |= {"pred.weight": rand(IMAGENET_CLASSES, HEAD_WIDTH), "pred.bias": rand(IMAGENET_CLASSES)}
    return state


def channels_first_norm(x, weight, bias):
    """The official LayerNorm(data_format="channels_first"), written out."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * (x - mean) / torch.sqrt(var + EPS) + bias[:, None, None]


def functional_conv2former(sd, images, out_norms):
    """The official forward (eval mode) on the official names, then the given output norms per level."""
    def conv(x, prefix, **kwargs):
        return F.conv2d(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"), **kwargs)

    def bn(x, prefix):
        return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                            sd[f"{prefix}.bias"], training=False, eps=BN_EPS)

    def ln(x, prefix):
        return channels_first_norm(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    x = bn(F.gelu(conv(images, "downsample_layers.0.0", stride=2, padding=1)), "downsample_layers.0.2")
    x = bn(F.gelu(conv(x, "downsample_layers.0.3", padding=1)), "downsample_layers.0.5")
    x = conv(x, "downsample_layers.0.6", stride=2)
    outs = []
    for i in range(4):
        if i:
            x = conv(ln(x, f"downsample_layers.{i}.0"), f"downsample_layers.{i}.1", stride=2)
        j = 0
        while f"stages.{i}.{j}.layer_scale_1" in sd:
            b = f"stages.{i}.{j}"
            h = ln(x, f"{b}.attn.norm")
            dw = sd[f"{b}.attn.att.2.weight"]
            a = conv(F.gelu(conv(h, f"{b}.attn.att.0")), f"{b}.attn.att.2", padding=dw.shape[-1] // 2,
                     groups=dw.shape[0])
            x = x + sd[f"{b}.layer_scale_1"][:, None, None] * conv(a * conv(h, f"{b}.attn.v"), f"{b}.attn.proj")
            h = F.gelu(conv(ln(x, f"{b}.mlp.norm"), f"{b}.mlp.fc1"))
            h = h + F.gelu(conv(h, f"{b}.mlp.pos", padding=1, groups=h.shape[1]))
            x = x + sd[f"{b}.layer_scale_2"][:, None, None] * conv(h, f"{b}.mlp.fc2")
            j += 1
        outs.append(channels_first_norm(x, *out_norms[i]))
    return outs


def build_for_parity(name: str, **overrides):
    config = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "backbone" / f"{name}.yaml"), overrides)
    return build_backbone(name, drop_path_rate=0.0, **overrides).double().eval(), config


def test_matches_the_official_computation():
    backbone, config = build_for_parity("conv2former_n", depths=[1, 2, 2, 1])
    generator = torch.Generator().manual_seed(0)
    state = official_state(list(config.dims), list(config.depths), config.mlp_ratios[0], config.kernel_size, generator)
    assert detect_format(state) == "conv2former"
    report = load_pretrained(backbone, state)
    assert report.format == "conv2former"
    assert sorted(report.dropped) == ["head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight", "pred.bias",
                                      "pred.weight"]
    assert report.missing == [f"out_norms.{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    with torch.no_grad():  # the output norms ImageNet lacks: random too, read back for the reference
        for norm in backbone.out_norms:
            norm.weight.normal_(1.0, 0.1, generator=generator)
            norm.bias.normal_(0.0, 0.1, generator=generator)
    out_norms = [(norm.weight, norm.bias) for norm in backbone.out_norms]
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        outs, expected = backbone(images), functional_conv2former(state, images, out_norms)
    for level, want in zip(LEVELS, expected):
        assert outs[level].shape == want.shape
        assert (outs[level] - want).abs().max().item() <= TOLERANCE, level


def test_strict_loading_and_our_own_weights():
    backbone, config = build_for_parity("conv2former_n", depths=[1, 1, 1, 1])
    state = official_state(list(config.dims), list(config.depths), 4, 11, torch.Generator().manual_seed(0))
    with pytest.raises(CheckpointKeyError, match=r"stages\.2\.0\.mlp\.pos\.weight"):
        load_pretrained(backbone, {k: v for k, v in state.items() if k != "stages.2.0.mlp.pos.weight"})
    # an explicit allow-list replaces the format's default
    with pytest.raises(CheckpointKeyError, match=r"out_norms\.0\.weight"):
        load_pretrained(backbone, state, allow_missing=[])
    ours = backbone.state_dict()
    assert detect_format(ours) == "comer"
    fresh = build_backbone("conv2former_n", depths=[1, 1, 1, 1]).double()
    load_pretrained(fresh, ours)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ours.items())


def test_pretrain_yaml_lists_the_code_defaults():
    cfg = OmegaConf.load(CONFIG_DIR / "pretrain" / "conv2former.yaml")
    assert cfg.format == "conv2former" and cfg.path is None
    assert tuple(cfg.allow_missing) == DEFAULT_ALLOW_MISSING["conv2former"]


@pytest.mark.parametrize("name, millions", zip(VARIANTS, [15, 27, 50, 90, 199]))
def test_parameter_counts_match_the_paper(name, millions):
    """The paper's / README's ImageNet classifiers (to 1M): our backbone without its output norms plus the
    classifier (1x1 conv to 1280, LayerNorm, 1000-way Linear)."""
    with torch.device("meta"):
        backbone = build_backbone(name)
    width = backbone.dims[-1]
    out_norms = sum(p.numel() for p in backbone.out_norms.parameters())
    classifier = width * HEAD_WIDTH + HEAD_WIDTH + 2 * HEAD_WIDTH + HEAD_WIDTH * IMAGENET_CLASSES + IMAGENET_CLASSES
    total = sum(p.numel() for p in backbone.parameters()) - out_norms + classifier
    assert round(total / 1e6) == millions


def test_every_variant_declares_its_shapes_and_the_paper_layout():
    widths = {"n": 64, "t": 72, "s": 72, "b": 96, "l": 128}
    for name in VARIANTS:
        with torch.device("meta"):
            backbone = build_backbone(name)
        assert isinstance(backbone, Conv2Former)
        shapes = backbone.output_shape()
        assert [shapes[k].stride for k in LEVELS] == list(STRIDES)
        assert [shapes[k].channels for k in LEVELS] == [widths[name[-1]] * 2 ** i for i in range(4)]
        assert backbone.stages[0][0].attn.att[2].kernel_size == (11, 11)


def test_outputs_follow_the_declared_shapes_and_bad_input_is_named():
    backbone = build_backbone("conv2former_n", depths=[1, 1, 1, 1])
    outs = backbone(torch.randn(1, 3, 64, 96))
    for level, spec in backbone.output_shape().items():
        assert outs[level].shape == (1, spec.channels, 64 // spec.stride, 96 // spec.stride)
    with pytest.raises(ValueError, match=r"Conv2Former: image size 80x64 is not allowed: both sides must be multiples"):
        backbone(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match=r"Conv2Former: expected images \[B, 3, H, W\]"):
        backbone(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"unknown backbone 'conv2former_xl'"):
        build_backbone("conv2former_xl")
    with pytest.raises(ValueError, match=r"kernel_size must be odd, got 10"):
        build_backbone("conv2former_n", kernel_size=10)


def test_synthetic_segmentation_trains(tmp_path):
    cfg = compose_config("train", [*TINY_SYNTHETIC, "backbone=conv2former_n", "backbone.depths=[1,1,1,1]"], tmp_path)
    result = train(cfg)
    assert result["global_step"] == 2 and result["metrics"]["val/mIoU"] is not None


def test_mask_rcnn_training_step():
    # test_mask_rcnn's narrow heads (CPU speed); the recipe's own widths build in build_detector below.
    model = instantiate_detector(OmegaConf.merge(detector_config(CLASSES), NARROW),
                                 build_backbone("conv2former_n", depths=[1, 1, 1, 1]))
    with torch.device("meta"):
        recipe = build_detector("conv2former_n", num_classes=CLASSES)
    assert [conv.conv.in_channels for conv in recipe.neck.lateral_convs] == recipe.backbone.dims
    model.train()
    images, sizes, boxes, labels, masks = synthetic_batch()
    losses = model(images, sizes, boxes, labels, masks, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(losses[k]) for k in LOSS_KEYS)
    sum(losses[k] for k in LOSS_KEYS).backward()
    stem = model.backbone.downsample_layers[0][0].weight.grad
    assert stem is not None and torch.count_nonzero(stem) > 0
