"""Input checks shared by every multi-scale deformable attention path.

`check_shapes` only reads shapes, dtypes and devices (safe under torch.compile tracing);
`check_level_layout` reads the values of spatial_shapes / level_start_index: one host sync the first
time a pair of tensors is seen, none afterwards (see `_CheckedLayouts`); `check_inputs` runs both.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or devices do not fit together."""
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_level_layout(value, spatial_shapes, level_start_index)


def check_shapes(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    same_dtype: bool = True,
) -> None:
    """Ranks, shapes, dtypes and devices. With same_dtype=False the three float inputs may have
    different float dtypes (the autocast policy of `ms_deform_attn`)."""
    ranks = {"value": (value, 4), "spatial_shapes": (spatial_shapes, 2), "level_start_index": (level_start_index, 1),
             "sampling_locations": (sampling_locations, 6), "attention_weights": (attention_weights, 5)}
    for name, (tensor, rank) in ranks.items():
        if tensor.dim() != rank:
            raise ValueError(f"ms_deform_attn: {name} must have rank {rank}, got shape {tuple(tensor.shape)}")
    batch, num_values, heads, _ = value.shape
    loc_batch, num_queries, loc_heads, num_levels, num_points, two = sampling_locations.shape
    if two != 2:
        raise ValueError(f"ms_deform_attn: sampling_locations last dim must be 2 (x, y), got {two}")
    if (loc_batch, loc_heads) != (batch, heads):
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} in batch/heads")
    expected_weights = (batch, num_queries, heads, num_levels, num_points)
    if tuple(attention_weights.shape) != expected_weights:
        raise ValueError(
            f"ms_deform_attn: attention_weights must have shape {expected_weights}, got {tuple(attention_weights.shape)}")
    if spatial_shapes.shape != (num_levels, 2) or level_start_index.shape != (num_levels,):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [{num_levels}, 2] and level_start_index [{num_levels}], got "
            f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise ValueError("ms_deform_attn: spatial_shapes and level_start_index must be int64 tensors")
    float_inputs = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    dtypes = {name: t.dtype for name, t in float_inputs.items()}
    for name, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"ms_deform_attn: {name} must be one of {FLOAT_DTYPES}, got {dtype}")
    if same_dtype and len(set(dtypes.values())) != 1:
        raise ValueError(f"ms_deform_attn: value, sampling_locations and attention_weights need one dtype, got {dtypes}")
    devices = {name: t.device for name, t in {**float_inputs, "spatial_shapes": spatial_shapes,
                                                "level_start_index": level_start_index}.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"ms_deform_attn: all inputs must be on one device, got {devices}")


class _CheckedLayouts:
    """Remembers (spatial_shapes, level_start_index, S) triples that passed `check_level_layout`.

    A model passes the same two small tensors to every attention call of a forward pass (ViT-CoMer: 12+),
    so checking their values once instead of on every call removes a GPU -> host sync per call. An entry
    is keyed by the two tensors' identities and is valid while both are alive (weak references) and
    unmodified (their version counters; inference-mode tensors have none and are matched by identity).
    """

    MAX_ENTRIES = 64

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()

    @staticmethod
    def _state(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> tuple:
        return tuple(None if t.is_inference() else t._version for t in (spatial_shapes, level_start_index))

    def contains(self, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_values: int) -> bool:
        entry = self._entries.get((id(spatial_shapes), id(level_start_index), num_values))
        if entry is None:
            return False
        shapes_ref, starts_ref, state = entry
        return (shapes_ref() is spatial_shapes and starts_ref() is level_start_index
                and state == self._state(spatial_shapes, level_start_index))

    def add(self, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_values: int) -> None:
        key = (id(spatial_shapes), id(level_start_index), num_values)
        forget = lambda _ref, entries=self._entries: entries.pop(key, None)  # noqa: E731
        self._entries[key] = (weakref.ref(spatial_shapes, forget), weakref.ref(level_start_index, forget),
                              self._state(spatial_shapes, level_start_index))
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)


_checked_layouts = _CheckedLayouts()


def check_level_layout(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> None:
    """spatial_shapes must cover value's S tokens and level_start_index must be their running offsets.

    The values are read once per (spatial_shapes, level_start_index) pair, with one host sync."""
    num_values = value.shape[1]
    if _checked_layouts.contains(spatial_shapes, level_start_index, num_values):
        return
    level_sizes = spatial_shapes.prod(dim=1)
    expected_starts = torch.cat([level_sizes.new_zeros(1), level_sizes.cumsum(0)[:-1]])
    valid = ((spatial_shapes > 0).all() & (level_sizes.sum() == num_values)
             & (expected_starts == level_start_index).all())
    if not bool(valid):  # the one sync; the messages below may read more
        _raise_layout_error(num_values, spatial_shapes, level_start_index, level_sizes, expected_starts)
    _checked_layouts.add(spatial_shapes, level_start_index, num_values)


def _raise_layout_error(num_values: int, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                        level_sizes: torch.Tensor, expected_starts: torch.Tensor) -> None:
    if bool((spatial_shapes <= 0).any()):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive (H, W) pairs, got {spatial_shapes.tolist()}")
    total = int(level_sizes.sum())
    if total != num_values:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {spatial_shapes.tolist()} cover {total} tokens but value has {num_values}")
    raise ValueError(
        f"ms_deform_attn: level_start_index {level_start_index.tolist()} does not match spatial_shapes "
        f"(expected {expected_starts.tolist()})")
