"""BEiT / BEiTv2 checkpoints load strictly (relative position bias tables included) and our ViT then computes
what BEiT computes; ViT-CoMer-L on BEiTv2 (comer_l_beitv2) and its plain-ViT baseline."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from app_utils import compose_config
from comer import build_backbone
from comer.app.builders import check_config
from comer.checkpoint import (
    DEFAULT_ALLOW_MISSING,
    CheckpointFormatError,
    CheckpointKeyError,
    convert_backbone_state,
    load_pretrained,
)
from comer.layers.rel_pos_bias import relative_position_index_with_class_token, rel_pos_table_size
from test_rel_pos_bias import beit_bias_by_loops

CONF = Path(__file__).resolve().parent.parent / "conf"
PATCH, LN_EPS = 16, 1e-6
DIM, HEADS, DEPTH, MLP = 192, 3, 12, 768  # comer_t / vit_t geometry
PRETRAIN_SIZE = 64  # a 4x4 pretraining grid keeps the tables small: 7 * 7 + 3 rows
GRID = PRETRAIN_SIZE // PATCH
BEIT_GEOMETRY = dict(pretrain_img_size=PRETRAIN_SIZE, use_abs_pos_embed=False)
AROUND_VIT_PREFIXES = ("spm.", "level_embed", "interactions.", "up.", "out_norms.", "ups.", "norms.")
L_DIM, L_HEADS, L_DEPTH, L_GRID = 1024, 16, 24, 14  # BEiTv2-L/16 at 224


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- BEiT-format checkpoints with the release key names --------------------------------------------
def _block_shapes(prefix: str, dim: int, mlp: int, heads: int, grid: int | None) -> dict:
    """One BEiT block (modeling_finetune.Block): layer scale gamma_1/2, q/v biases, optionally its own table
    and index buffer."""
    shapes = {"gamma_1": (dim,), "gamma_2": (dim,), "norm1.weight": (dim,), "norm1.bias": (dim,),
              "attn.qkv.weight": (3 * dim, dim), "attn.q_bias": (dim,), "attn.v_bias": (dim,),
              "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
              "mlp.fc1.weight": (mlp, dim), "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (dim, mlp),
              "mlp.fc2.bias": (dim,)}
    if grid is not None:
        shapes["attn.relative_position_bias_table"] = (rel_pos_table_size((grid, grid)), heads)
        shapes["attn.relative_position_index"] = (grid * grid + 1, grid * grid + 1)
    return {f"{prefix}{k}": v for k, v in shapes.items()}


def beit_finetuned_shapes(dim=DIM, heads=HEADS, depth=DEPTH, mlp=MLP, grid=GRID, classes=1000) -> dict:
    """The layout of beit_*_pt22k_ft22k.pth / beitv2_*_pt1k_ft21k.pth (modeling_finetune.VisionTransformer with
    use_rel_pos_bias and mean pooling): a table per block, no absolute position embedding, fc_norm + head."""
    shapes = {"cls_token": (1, 1, dim), "patch_embed.proj.weight": (dim, 3, PATCH, PATCH),
              "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        shapes.update(_block_shapes(f"blocks.{i}.", dim, mlp, heads, grid))
    shapes.update({"fc_norm.weight": (dim,), "fc_norm.bias": (dim,), "head.weight": (classes, dim),
                   "head.bias": (classes,)})
    return shapes


def beitv2_pretraining_shapes(dim=DIM, heads=HEADS, depth=DEPTH, mlp=MLP, grid=GRID, vocab=8192,
                              head_layers=2) -> dict:
    """The layout of beitv2_*_pt1k.pth (modeling_pretrain.VisionTransformerForMaskedImageModelingCLS with
    use_shared_rel_pos_bias): one shared table, mask token, final norm, lm_head, the patch-aggregation blocks."""
    shapes = {"cls_token": (1, 1, dim), "mask_token": (1, 1, dim), "patch_embed.proj.weight": (dim, 3, PATCH, PATCH),
              "patch_embed.proj.bias": (dim,),
              "rel_pos_bias.relative_position_bias_table": (rel_pos_table_size((grid, grid)), heads),
              "rel_pos_bias.relative_position_index": (grid ** 2 + 1, grid ** 2 + 1)}
    for i in range(depth):
        shapes.update(_block_shapes(f"blocks.{i}.", dim, mlp, heads, None))
    for i in range(head_layers):
        shapes.update(_block_shapes(f"cls_pt_layers.{i}.", dim, mlp, heads, None))
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,), "lm_head.weight": (vocab, dim),
                   "lm_head.bias": (vocab,)})
    return shapes


def checkpoint_of(shapes: dict, seed: int, grid: int = GRID) -> dict:
    """Random weights (scales that keep 12 blocks tame; norms and layer scales around 1), BEiT's index buffers."""
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape in shapes.items():
        if key.endswith("relative_position_index"):
            model[key] = relative_position_index_with_class_token((grid, grid))
        elif key.endswith("relative_position_bias_table"):
            model[key] = torch.randn(shape, generator=g)
        else:
            one = key.endswith(("gamma_1", "gamma_2", "norm1.weight", "norm2.weight", "norm.weight"))
            model[key] = torch.randn(shape, generator=g) * (0.05 if key.startswith("patch_embed") else 0.1) + one
    return {"model": model}


# --- BEiT's forward, written out (float64) ---------------------------------------------------------
def beit_patch_tokens(state: dict, images: torch.Tensor, depth: int, heads: int, grid: int) -> torch.Tensor:
    """BEiT's blocks on the patch tokens (our ViT has no class token): x + gamma_1 * attn(norm1 x), then
    x + gamma_2 * mlp(norm2 x); attention softmax(q k^T / sqrt(d) + B) v with qkv bias [q_bias, 0, v_bias] and
    B the (dy, dx) rows of the block's own or the shared table. -> [B, h*w, D]."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    window = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    batch, tokens, dim = x.shape
    for i in range(depth):
        p = f"blocks.{i}."
        table = state.get(f"{p}attn.relative_position_bias_table",
                          state.get("rel_pos_bias.relative_position_bias_table"))
        y = F.layer_norm(x, (dim,), state[f"{p}norm1.weight"], state[f"{p}norm1.bias"], LN_EPS)
        q_bias, v_bias = state[f"{p}attn.q_bias"], state[f"{p}attn.v_bias"]
        qkv = y @ state[f"{p}attn.qkv.weight"].T + torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])
        q, k, v = qkv.view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + beit_bias_by_loops(table, (grid, grid), window)
        attn = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + state[f"{p}gamma_1"] * (attn @ state[f"{p}attn.proj.weight"].T + state[f"{p}attn.proj.bias"])
        y = F.layer_norm(x, (dim,), state[f"{p}norm2.weight"], state[f"{p}norm2.bias"], LN_EPS)
        y = F.gelu(y @ state[f"{p}mlp.fc1.weight"].T + state[f"{p}mlp.fc1.bias"])
        x = x + state[f"{p}gamma_2"] * (y @ state[f"{p}mlp.fc2.weight"].T + state[f"{p}mlp.fc2.bias"])
    return x


def _our_patch_tokens(backbone, images: torch.Tensor) -> torch.Tensor:
    vit = backbone.vit
    return vit.forward_features(images, [vit.depth - 1])[0].flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def comer_t_beit():
    prototype = build_backbone("comer_t", use_rel_pos_bias=True, **BEIT_GEOMETRY)
    return lambda: copy.deepcopy(prototype)


@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_beit_checkpoint_loads_strictly_and_reproduces_beit(comer_t_beit, size):
    """A fine-tuned BEiT checkpoint (per-block tables) into ViT-CoMer-T with BEiT's geometry: every ViT key
    comes from the checkpoint, only the release's classifier, class token and index buffers are dropped, and
    the ViT's tokens equal BEiT's to 1e-10 -- at the pretraining grid (4x4, tables as they are) and at 6x5
    (tables resized bicubically)."""
    backbone = comer_t_beit()
    checkpoint = checkpoint_of(beit_finetuned_shapes(), seed=0)
    report = load_pretrained(backbone, checkpoint)
    assert report.format == "beit" and report.notes == [] and report.resized == {}
    index_keys = {f"blocks.{i}.attn.relative_position_index" for i in range(DEPTH)}
    classifier = {"cls_token", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(report.dropped) == classifier | index_keys
    assert all(k.startswith(AROUND_VIT_PREFIXES) for k in report.missing) and report.missing
    loaded = backbone.state_dict()
    assert sorted(report.loaded) == sorted(k for k in loaded if k.startswith("vit."))
    assert torch.equal(loaded["vit.blocks.7.attn.relative_position_bias_table"],
                       checkpoint["model"]["blocks.7.attn.relative_position_bias_table"])
    assert torch.equal(loaded["vit.blocks.7.ls2.gamma"], checkpoint["model"]["blocks.7.gamma_2"])

    images = torch.randn(2, 3, *size, dtype=torch.float64)
    ours = _our_patch_tokens(backbone.double().eval(), images)
    expected = beit_patch_tokens(checkpoint["model"], images, DEPTH, HEADS, GRID)
    assert ours.shape == (2, (size[0] // PATCH) * (size[1] // PATCH), DIM)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


def test_beitv2_pretraining_checkpoint_with_shared_table():
    """A BEiTv2 pretraining checkpoint (one shared table, mask token, lm_head, two cls_pt blocks) into the
    plain-ViT pyramid with use_shared_rel_pos_bias: loads strictly, BEiT's tokens to 1e-10 at a 5x7 grid."""
    backbone = build_backbone("vit_t", use_shared_rel_pos_bias=True, **BEIT_GEOMETRY)
    checkpoint = checkpoint_of(beitv2_pretraining_shapes(), seed=1)
    report = load_pretrained(backbone, checkpoint)
    unused = {"cls_token", "mask_token", "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias",
              "rel_pos_bias.relative_position_index"}
    assert set(report.dropped) == unused | {k for k in checkpoint["model"] if k.startswith("cls_pt_layers.")}
    assert all(k.startswith(AROUND_VIT_PREFIXES) for k in report.missing)
    assert torch.equal(backbone.state_dict()["vit.rel_pos_bias.relative_position_bias_table"],
                       checkpoint["model"]["rel_pos_bias.relative_position_bias_table"])
    images = torch.randn(1, 3, 80, 112, dtype=torch.float64)
    torch.testing.assert_close(_our_patch_tokens(backbone.double().eval(), images),
                               beit_patch_tokens(checkpoint["model"], images, DEPTH, HEADS, GRID), rtol=0, atol=1e-10)


def test_mismatched_geometry_and_index_are_refused(comer_t_beit):
    """Tables into a ViT without relative position bias (and without its pos_embed) fail with the keys
    named; an index buffer that is not BEiT's layout for its table is refused before anything loads."""
    plain = build_backbone("comer_t", pretrain_img_size=PRETRAIN_SIZE)
    with pytest.raises(CheckpointKeyError,
                       match=r"(?s)12 checkpoint keys.*vit\.blocks\.0\.attn\.relative_position_bias_table"):
        load_pretrained(plain, checkpoint_of(beit_finetuned_shapes(), seed=2))
    checkpoint = checkpoint_of(beit_finetuned_shapes(), seed=2)
    checkpoint["model"]["blocks.3.attn.relative_position_index"] = checkpoint["model"][
        "blocks.3.attn.relative_position_index"].T.contiguous()
    with pytest.raises(CheckpointFormatError, match=r"blocks\.3\.attn\.relative_position_index \(17, 17\) is not"):
        load_pretrained(comer_t_beit(), checkpoint)
    del checkpoint["model"]["blocks.3.attn.relative_position_bias_table"]
    with pytest.raises(CheckpointFormatError, match=r"has no blocks\.3\.attn\.relative_position_bias_table"):
        load_pretrained(comer_t_beit(), checkpoint)


@pytest.mark.parametrize("name", ["beit", "beitv2"])
def test_pretrain_yaml_lists_the_code_defaults(name):
    cfg = OmegaConf.load(CONF / "pretrain" / f"{name}.yaml")
    assert cfg.format == "beit" and cfg.path is None
    assert tuple(cfg.allow_missing) == DEFAULT_ALLOW_MISSING["beit"]


# --- ViT-CoMer-L on BEiTv2-L -----------------------------------------------------------------------
def _on_meta(name: str):
    with torch.device("meta"):
        return build_backbone(name)


def _num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


COMER_L_BEITV2_PARAMS = 346_291_776  # stated in conf/backbone/comer_l_beitv2.yaml
COMER_L_BEITV2_VIT_PARAMS = 303_427_072


def test_comer_l_beitv2_parameter_count():
    """comer_l without its [1, 197, 1024] pos_embed plus 24 tables of (27 * 27 + 3) x 16; the plain-ViT
    baseline differs from vit_l the same way."""
    beit, plain = _on_meta("comer_l_beitv2"), _on_meta("comer_l")
    tables = L_DEPTH * (27 * 27 + 3) * L_HEADS
    assert _num_params(beit) == _num_params(plain) - (1 + L_GRID ** 2) * L_DIM + tables == COMER_L_BEITV2_PARAMS
    assert _num_params(beit.vit) == COMER_L_BEITV2_VIT_PARAMS
    assert _num_params(_on_meta("vit_l_beitv2")) == _num_params(_on_meta("vit_l")) - (1 + L_GRID ** 2) * L_DIM + tables
    assert beit.vit.pos_embed is None and beit.vit.blocks[23].attn.rel_pos_grid == (L_GRID, L_GRID)
    assert [stage.blocks for stage in beit.interactions] == [(0, 6), (6, 12), (12, 18), (18, 24)]


def test_beitv2_large_release_layout_loads_strictly_into_comer_l_beitv2():
    """The key names and shapes of beitv2_large_patch16_224_pt1k_ft21k.pth (zero-stride tensors, no memory)
    convert strictly onto comer_l_beitv2 (built on the meta device): every ViT key is provided, and the ViT's
    parameters are the release's less its classifier, class token and fc_norm, plus the zero k biases."""
    model = _on_meta("comer_l_beitv2")
    release = {key: relative_position_index_with_class_token((L_GRID, L_GRID)) if key.endswith("_index")
               else torch.zeros(()).expand(shape)
               for key, shape in beit_finetuned_shapes(L_DIM, L_HEADS, L_DEPTH, 4 * L_DIM, L_GRID, 21841).items()}
    full, report = convert_backbone_state(model.state_dict(), {"model": release})
    vit_keys = sorted(k for k in full if k.startswith("vit."))
    assert sorted(report.loaded) == vit_keys and all(k.startswith(AROUND_VIT_PREFIXES) for k in report.missing)
    used = sum(v.numel() for k, v in release.items()
               if not k.endswith("relative_position_index") and k.split(".")[0] not in ("cls_token", "fc_norm", "head"))
    assert used + L_DEPTH * L_DIM == COMER_L_BEITV2_VIT_PARAMS  # + the k biases BEiT does not store


def test_comer_l_beitv2_runs_on_cpu():
    torch.manual_seed(0)
    backbone = build_backbone("comer_l_beitv2").eval()
    with torch.no_grad():
        for table in (block.attn.relative_position_bias_table for block in backbone.vit.blocks):
            table.normal_()
        out = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, L_DIM, 16, 24), "res3": (1, L_DIM, 8, 12), "res4": (1, L_DIM, 4, 6), "res5": (1, L_DIM, 2, 3)}
    assert all(torch.isfinite(v).all() for v in out.values())


def test_beitv2_command_composes(tmp_path):
    """The README's command: comer_l_beitv2 with pretrain=beitv2 on ADE20K resolves (L's lr)."""
    weights = tmp_path / "beitv2_large_patch16_224_pt1k_ft21k.pth"
    weights.touch()
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_l_beitv2", "pretrain=beitv2",
                                   f"pretrain.path={weights}"], tmp_path)
    check_config(cfg)
    assert cfg.pretrain.format == "beit" and cfg.module.optimizer.lr == pytest.approx(2e-5)
    assert cfg.backbone.use_rel_pos_bias and not cfg.backbone.use_abs_pos_embed
