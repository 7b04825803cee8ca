"""An independent, functional re-statement of the official ViT-CoMer backbone forward.

Written from the official code (Traffic-X/ViT-CoMer: segmentation/mmseg_custom/models/backbones/
{vit_comer.py, comer_modules.py}, detection/mmdet_custom/models/backbones/{vit_comer.py,
comer_modules.py, base/vit.py}) in plain ``torch.nn.functional``. It reads a state dict with the
OFFICIAL parameter names (``backbone.`` prefix already stripped) and never imports ``comer``, so it is
an independent check of both the backbone modules and the checkpoint name conversion.

What the two official flavours share and where they differ:
- segmentation: the ViT output after EVERY stage is added to the outputs (x4, x2, x1, x0.5);
- detection: the FINAL ViT output is added at all four scales; windowed attention (official zero
  padding: q, k, v are projected, then zero-padded to a multiple of the window on the bottom/right;
  padded keys stay in the softmax with logit 0 and value 0).
Everything else (MRFP hidden width, ConvFFN width, cnn feature interaction, number of extra CTIs,
deformable value width) is read off the state dict's shapes and keys.

As in the official code, the deformable reference points are built in float32 (then cast), also in
float64 runs: a float64 run is the official forward with every other operation in float64.

Also here: a builder of random state dicts with the official names and shapes, read from the key
manifests ``official_vit_comer_<variant>_keys.tsv`` (random, non-trivial values everywhere: layer
scales, CTI gammas, BN statistics, sampling offsets that reach outside the feature maps).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-6  # official norm_layer = partial(nn.LayerNorm, eps=1e-6) everywhere
BATCH_NORM_EPS = 1e-5  # nn.BatchNorm2d / SyncBatchNorm default
PATCH_SIZE = 16
FLAVOURS = ("segmentation", "detection")
# Level strides of the CNN token sequence c, in the order the official code concatenates them.
TOKEN_LEVEL_STRIDES = (8, 16, 32)
VIT_LEVEL = 1  # index of the 1/16 level in c (the one the ViT tokens are added to)


@dataclass(frozen=True)
class OracleConfig:
    """The numbers the official state dict does not carry (everything else is read off its shapes)."""

    num_heads: int
    deform_heads: int
    n_points: int
    pretrain_size: int
    flavour: str
    interaction_indexes: tuple[tuple[int, int], ...]
    window_blocks: tuple[int, ...] = ()
    window_size: int = 14

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour={self.flavour!r}; allowed: {FLAVOURS}")


# Official configs of the released models (backbone part).
OFFICIAL_CONFIGS = {
    "t": OracleConfig(num_heads=3, deform_heads=6, n_points=4, pretrain_size=224, flavour="segmentation",
                      interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "s": OracleConfig(num_heads=6, deform_heads=6, n_points=4, pretrain_size=224, flavour="segmentation",
                      interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "b": OracleConfig(num_heads=12, deform_heads=12, n_points=4, pretrain_size=224, flavour="segmentation",
                      interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "s_det": OracleConfig(num_heads=6, deform_heads=6, n_points=4, pretrain_size=592, flavour="detection",
                          interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11)),
                          window_blocks=(0, 1, 3, 4, 6, 7, 9, 10), window_size=14),
    "b_det": OracleConfig(num_heads=12, deform_heads=12, n_points=4, pretrain_size=592, flavour="detection",
                          interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11)),
                          window_blocks=(0, 1, 3, 4, 6, 7, 9, 10), window_size=14),
}


# ----------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------
def _linear(sd, prefix, x):
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


def _layer_norm(sd, prefix, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], LAYER_NORM_EPS)


def _batch_norm(sd, prefix, x):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=BATCH_NORM_EPS)


def _tokens_to_map(tokens, height, width):
    """[B, H*W, C] -> [B, C, H, W]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def _map_to_tokens(feature):
    return feature.flatten(2).transpose(1, 2)


def _level_shapes(grid_h, grid_w):
    """(H, W) of the three token levels of c, given the 1/16 grid."""
    image_h, image_w = grid_h * PATCH_SIZE, grid_w * PATCH_SIZE
    return [(image_h // s, image_w // s) for s in TOKEN_LEVEL_STRIDES]


def _split_levels(tokens, shapes):
    return list(tokens.split([h * w for h, w in shapes], dim=1))


def _add_to_vit_level(c, x, shapes):
    levels = _split_levels(c, shapes)
    levels[VIT_LEVEL] = levels[VIT_LEVEL] + x
    return torch.cat(levels, dim=1)


# ----------------------------------------------------------------------------------------------
# plain ViT
# ----------------------------------------------------------------------------------------------
def _global_attention(q, k, v):
    """q, k, v: [..., heads, tokens, head_dim]."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return logits.softmax(-1) @ v


def _attention(sd, prefix, x, grid_h, grid_w, num_heads, window):
    batch, tokens, dim = x.shape
    head_dim = dim // num_heads
    qkv = _linear(sd, f"{prefix}.qkv", x)  # [B, N, 3C], channel order (3, heads, head_dim)
    if window is None:
        q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = _global_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
    else:
        # Official: project, zero-pad the projected map bottom/right, split into windows, no mask.
        pad_h = math.ceil(grid_h / window) * window
        pad_w = math.ceil(grid_w / window) * window
        grid = qkv.reshape(batch, grid_h, grid_w, 3 * dim)
        grid = F.pad(grid, (0, 0, 0, pad_w - grid_w, 0, pad_h - grid_h))
        rows, cols = pad_h // window, pad_w // window
        windows = grid.reshape(batch, rows, window, cols, window, 3, num_heads, head_dim)
        # -> [3, B, rows, cols, heads, window*window, head_dim]
        windows = windows.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(
            3, batch, rows, cols, num_heads, window * window, head_dim)
        q, k, v = windows
        out = _global_attention(q, k, v)  # [B, rows, cols, heads, w*w, hd]
        out = out.reshape(batch, rows, cols, num_heads, window, window, head_dim)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, pad_h, pad_w, dim)
        out = out[:, :grid_h, :grid_w].reshape(batch, tokens, dim)
    return _linear(sd, f"{prefix}.proj", out)


def _vit_block(sd, prefix, x, grid_h, grid_w, num_heads, window):
    attn = _attention(sd, f"{prefix}.attn", _layer_norm(sd, f"{prefix}.norm1", x), grid_h, grid_w, num_heads, window)
    x = x + sd[f"{prefix}.gamma1"] * attn
    hidden = F.gelu(_linear(sd, f"{prefix}.mlp.fc1", _layer_norm(sd, f"{prefix}.norm2", x)))
    return x + sd[f"{prefix}.gamma2"] * _linear(sd, f"{prefix}.mlp.fc2", hidden)


def _position_embedding(sd, pretrain_size, grid_h, grid_w):
    pos = sd["pos_embed"][:, 1:]  # class-token slot dropped
    side = pretrain_size // PATCH_SIZE
    pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return _map_to_tokens(pos)


# ----------------------------------------------------------------------------------------------
# CNN branch
# ----------------------------------------------------------------------------------------------
def _conv_bn_relu(sd, conv, norm, x, stride):
    x = F.conv2d(x, sd[f"{conv}.weight"], None, stride=stride, padding=1)
    return F.relu(_batch_norm(sd, norm, x))


def _spm(sd, images):
    c1 = _conv_bn_relu(sd, "spm.stem.0", "spm.stem.1", images, 2)
    c1 = _conv_bn_relu(sd, "spm.stem.3", "spm.stem.4", c1, 1)
    c1 = _conv_bn_relu(sd, "spm.stem.6", "spm.stem.7", c1, 1)
    c1 = F.max_pool2d(c1, kernel_size=3, stride=2, padding=1)
    c2 = _conv_bn_relu(sd, "spm.conv2.0", "spm.conv2.1", c1, 2)
    c3 = _conv_bn_relu(sd, "spm.conv3.0", "spm.conv3.1", c2, 2)
    c4 = _conv_bn_relu(sd, "spm.conv4.0", "spm.conv4.1", c3, 2)
    return [F.conv2d(c, sd[f"spm.fc{i}.weight"], sd[f"spm.fc{i}.bias"]) for i, c in enumerate((c1, c2, c3, c4), 1)]


def _depthwise(sd, prefix, x):
    weight = sd[f"{prefix}.weight"]
    return F.conv2d(x, weight, sd[f"{prefix}.bias"], padding=weight.shape[-1] // 2, groups=x.shape[1])


def _conv_ffn(sd, prefix, x, shapes):
    hidden = _linear(sd, f"{prefix}.fc1", x)
    levels = [_map_to_tokens(_depthwise(sd, f"{prefix}.dwconv.dwconv", _tokens_to_map(t, h, w)))
              for t, (h, w) in zip(_split_levels(hidden, shapes), shapes)]
    return _linear(sd, f"{prefix}.fc2", F.gelu(torch.cat(levels, dim=1)))


def _mrfp(sd, prefix, c, shapes):
    hidden = _linear(sd, f"{prefix}.fc1", c)
    half = hidden.shape[-1] // 2
    levels = []
    for level, (tokens, (h, w)) in enumerate(zip(_split_levels(hidden, shapes), shapes)):
        fmap = _tokens_to_map(tokens, h, w)
        # official: dwconv{2l+1} (3x3) on the first half of the channels, dwconv{2l+2} (5x5) on the rest
        parts = [_depthwise(sd, f"{prefix}.dwconv.dwconv{2 * level + 1}", fmap[:, :half]),
                 _depthwise(sd, f"{prefix}.dwconv.dwconv{2 * level + 2}", fmap[:, half:])]
        fmap = F.gelu(_batch_norm(sd, f"{prefix}.dwconv.bn{level + 1}", torch.cat(parts, dim=1)))
        levels.append(_map_to_tokens(fmap))
    return _linear(sd, f"{prefix}.fc2", F.gelu(torch.cat(levels, dim=1)))


# ----------------------------------------------------------------------------------------------
# multi-scale deformable attention (Deformable DETR / ViT-Adapter MSDeformAttn)
# ----------------------------------------------------------------------------------------------
REFERENCE_POINT_DTYPE = torch.float32  # official get_reference_points: linspace(..., dtype=torch.float32)


def _reference_points(shapes, dtype, device):
    """Pixel centres of every level, normalised to [0, 1], (x, y): [1, sum(HW), 2]."""
    points = []
    for h, w in shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=REFERENCE_POINT_DTYPE, device=device) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=REFERENCE_POINT_DTYPE, device=device) / w
        points.append(torch.stack([xs.repeat(h), ys.repeat_interleave(w)], dim=-1))
    return torch.cat(points, dim=0)[None].to(dtype)


def _ms_deform_attn(sd, prefix, query, feat, shapes, num_heads, n_points):
    batch, num_queries, _ = query.shape
    num_levels = len(shapes)
    value = _linear(sd, f"{prefix}.value_proj", feat)
    head_dim = value.shape[-1] // num_heads
    offsets = _linear(sd, f"{prefix}.sampling_offsets", query).reshape(
        batch, num_queries, num_heads, num_levels, n_points, 2)
    weights = _linear(sd, f"{prefix}.attention_weights", query).reshape(
        batch, num_queries, num_heads, num_levels * n_points).softmax(-1).reshape(
        batch, num_queries, num_heads, num_levels, n_points)
    reference = _reference_points(shapes, query.dtype, query.device)  # [1, Lq, 2]
    out = query.new_zeros(batch, num_heads, head_dim, num_queries)
    for level, (values, (h, w)) in enumerate(zip(_split_levels(value, shapes), shapes)):
        # pixel coordinates of the samples, align_corners=False: x_pix = x_norm * W - 0.5
        scale = torch.tensor([w, h], dtype=query.dtype, device=query.device)
        location = reference[:, :, None, None, :] + offsets[:, :, :, level] / scale  # [B, Lq, M, P, 2]
        grid = 2 * location - 1
        grid = grid.permute(0, 2, 1, 3, 4).reshape(batch * num_heads, num_queries, n_points, 2)
        fmap = values.reshape(batch, h, w, num_heads, head_dim).permute(0, 3, 4, 1, 2).reshape(
            batch * num_heads, head_dim, h, w)
        sampled = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.reshape(batch, num_heads, head_dim, num_queries, n_points)
        level_weights = weights[:, :, :, level].permute(0, 2, 1, 3)[:, :, None]  # [B, M, 1, Lq, P]
        out = out + (sampled * level_weights).sum(-1)
    out = out.reshape(batch, num_heads * head_dim, num_queries).transpose(1, 2)
    return _linear(sd, f"{prefix}.output_proj", out)


# ----------------------------------------------------------------------------------------------
# CTI blocks
# ----------------------------------------------------------------------------------------------
def _cti_to_vit(sd, prefix, x, c, shapes, cfg):
    grid_h, grid_w = shapes[VIT_LEVEL]
    attn = _ms_deform_attn(sd, f"{prefix}.attn", _layer_norm(sd, f"{prefix}.query_norm", c),
                           _layer_norm(sd, f"{prefix}.feat_norm", c), shapes, cfg.deform_heads, cfg.n_points)
    attn = attn + _conv_ffn(sd, f"{prefix}.ffn", _layer_norm(sd, f"{prefix}.ffn_norm", attn), shapes)
    fine, middle, coarse = [_tokens_to_map(t, h, w) for t, (h, w) in zip(_split_levels(attn, shapes), shapes)]
    fine = F.interpolate(fine, scale_factor=0.5, mode="bilinear", align_corners=False)
    coarse = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    assert middle.shape[-2:] == (grid_h, grid_w)
    return x + sd[f"{prefix}.gamma"] * _map_to_tokens(fine + middle + coarse)


def _multiscale_extractor(sd, prefix, query, feat, shapes, cfg):
    """Official MultiscaleExtractor ("cfinter"): query + attn, then + ConvFFN."""
    query = query + _ms_deform_attn(sd, f"{prefix}.attn", _layer_norm(sd, f"{prefix}.query_norm", query),
                                    _layer_norm(sd, f"{prefix}.feat_norm", feat), shapes, cfg.deform_heads,
                                    cfg.n_points)
    if f"{prefix}.ffn.fc1.weight" in sd:
        query = query + _conv_ffn(sd, f"{prefix}.ffn", _layer_norm(sd, f"{prefix}.ffn_norm", query), shapes)
    return query


def _cnn_interaction(sd, prefix, c, shapes, cfg):
    if f"{prefix}.cfinter.query_norm.weight" not in sd:
        return c
    # outer norms: the query_norm output is both the residual and (inner-normed) the query
    return _multiscale_extractor(sd, f"{prefix}.cfinter", _layer_norm(sd, f"{prefix}.query_norm", c),
                                 _layer_norm(sd, f"{prefix}.feat_norm", c), shapes, cfg)


def _cti_to_cnn(sd, prefix, x, c, shapes, cfg):
    return _cnn_interaction(sd, prefix, _add_to_vit_level(c, x, shapes), shapes, cfg)


def _extra_cti(sd, prefix, x, c, shapes, cfg):
    c = _add_to_vit_level(c, x, shapes)
    if f"{prefix}.ffn.fc1.weight" in sd:
        c = c + _conv_ffn(sd, f"{prefix}.ffn", _layer_norm(sd, f"{prefix}.ffn_norm", c), shapes)
    return _cnn_interaction(sd, prefix, c, shapes, cfg)


def _count(sd, pattern):
    found = {int(m.group(1)) for key in sd for m in [re.match(pattern, key)] if m}
    return max(found) + 1 if found else 0


# ----------------------------------------------------------------------------------------------
# the backbone
# ----------------------------------------------------------------------------------------------
def official_forward(state_dict: dict[str, torch.Tensor], images: torch.Tensor, cfg: OracleConfig):
    """Official ViT-CoMer backbone forward (eval mode) -> [f1, f2, f3, f4] at strides 4, 8, 16, 32.

    ``state_dict`` uses the official names without the ``backbone.`` prefix; its tensors must have the
    dtype of ``images``.
    """
    sd = state_dict
    _, _, image_h, image_w = images.shape
    if image_h % 32 or image_w % 32:
        raise ValueError(f"image size {image_h}x{image_w} must be divisible by 32")
    depth = _count(sd, r"blocks\.(\d+)\.")
    covered = [i for start, end in cfg.interaction_indexes for i in range(start, end + 1)]
    if covered != list(range(depth)):
        raise ValueError(f"interaction_indexes {cfg.interaction_indexes} do not cover blocks 0..{depth - 1}")
    grid_h, grid_w = image_h // PATCH_SIZE, image_w // PATCH_SIZE
    shapes = _level_shapes(grid_h, grid_w)

    c1, c2, c3, c4 = _spm(sd, images)
    c = torch.cat([_map_to_tokens(level) + sd["level_embed"][i] for i, level in enumerate((c2, c3, c4))], dim=1)

    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH_SIZE)
    x = _map_to_tokens(x) + _position_embedding(sd, cfg.pretrain_size, grid_h, grid_w)

    stage_outputs = []
    for stage, (start, end) in enumerate(cfg.interaction_indexes):
        prefix = f"interactions.{stage}"
        c = _mrfp(sd, f"{prefix}.mrfp", c, shapes)
        c = _add_to_vit_level(c, x, shapes)
        x = _cti_to_vit(sd, f"{prefix}.cti_tov", x, c, shapes, cfg)
        for block in range(start, end + 1):
            window = cfg.window_size if block in cfg.window_blocks else None
            x = _vit_block(sd, f"blocks.{block}", x, grid_h, grid_w, cfg.num_heads, window)
        c = _cti_to_cnn(sd, f"{prefix}.cti_toc", x, c, shapes, cfg)
        for extra in range(_count(sd, rf"{re.escape(prefix)}\.extra_CTIs\.(\d+)\.")):
            c = _extra_cti(sd, f"{prefix}.extra_CTIs.{extra}", x, c, shapes, cfg)
        stage_outputs.append(_tokens_to_map(x, grid_h, grid_w))

    c2, c3, c4 = [_tokens_to_map(t, h, w) for t, (h, w) in zip(_split_levels(c, shapes), shapes)]
    c1 = c1 + F.conv_transpose2d(c2, sd["up.weight"], sd["up.bias"], stride=2)
    vit = stage_outputs if cfg.flavour == "segmentation" else [stage_outputs[-1]] * 4
    scales = (4, 2, 1, 0.5)
    outputs = []
    for level, (feature, vit_feature, scale) in enumerate(zip((c1, c2, c3, c4), vit, scales)):
        if scale != 1:
            vit_feature = F.interpolate(vit_feature, scale_factor=scale, mode="bilinear", align_corners=False)
        outputs.append(_batch_norm(sd, f"norm{level + 1}", feature + vit_feature))
    return outputs


# ----------------------------------------------------------------------------------------------
# random official state dicts from the key manifests
# ----------------------------------------------------------------------------------------------
MANIFEST_DIR = Path(__file__).resolve().parent / "data" / "official_keys"  # copies of ../shared/reference


def reference_dir() -> Path:
    """Where the official key/shape manifests live (official_vit_comer_<variant>_keys.tsv)."""
    return MANIFEST_DIR


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    shape: tuple[int, ...]
    kind: str  # param | buffer


def read_manifest(variant: str) -> list[ManifestEntry]:
    path = reference_dir() / f"official_vit_comer_{variant}_keys.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found (variants: t, s, b, s_det, b_det)")
    entries = []
    for line in path.read_text().splitlines()[1:]:
        key, shape, kind = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
        entries.append(ManifestEntry(key, dims, kind))
    return entries


@dataclass
class RandomScales:
    """Spreads of the random values (chosen so activations stay O(1) through 12 blocks)."""

    norm_weight: float = 0.2
    bias: float = 0.1
    layer_scale: float = 0.5
    cti_gamma: float = 0.5
    offset_bias: float = 2.0  # pixels: many samples land between pixels and some outside the map
    embed: float = 0.2
    running_mean: float = 0.2
    running_var: tuple[float, float] = field(default=(0.5, 1.5))


def _random_value(key: str, shape, generator, scales: RandomScales):
    name = key.rsplit(".", 1)[-1]
    randn = lambda: torch.randn(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    if name == "num_batches_tracked":
        return torch.tensor(0, dtype=torch.long)
    if name == "running_var":
        low, high = scales.running_var
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
    if name == "running_mean":
        return scales.running_mean * randn()
    if name in ("gamma1", "gamma2"):
        return 1 + scales.layer_scale * randn()
    if name == "gamma":
        return scales.cti_gamma * randn()
    if name in ("pos_embed", "level_embed"):
        return scales.embed * randn()
    if name == "bias":
        return (scales.offset_bias if "sampling_offsets" in key else scales.bias) * randn()
    if len(shape) == 1:  # LayerNorm / BatchNorm weight
        return 1 + scales.norm_weight * randn()
    fan_in = math.prod(shape[1:])
    if key.endswith("up.weight"):  # ConvTranspose2d: [in, out, k, k]
        fan_in = shape[0]
    return randn() / math.sqrt(fan_in)


def random_official_state_dict(variant: str, seed: int = 0, dtype=torch.float64,
                               scales: RandomScales | None = None) -> dict[str, torch.Tensor]:
    """A random mmseg/mmdet-style backbone state dict (keys ``backbone.*``) for ``variant``."""
    scales = scales or RandomScales()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for entry in read_manifest(variant):
        value = _random_value(entry.key, entry.shape, generator, scales)
        state[entry.key] = value if value.dtype == torch.long else value.to(dtype)
    return state


@functools.lru_cache(maxsize=4)
def _cached_state_dict(variant: str, seed: int, dtype) -> dict[str, torch.Tensor]:
    return random_official_state_dict(variant, seed, dtype)


def cached_official_state_dict(variant: str, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """`random_official_state_dict`, generated once per process (a new dict of the same tensors:
    callers may add or delete keys, never modify tensors in place)."""
    return dict(_cached_state_dict(variant, seed, dtype))


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
