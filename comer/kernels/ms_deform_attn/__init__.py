"""Multi-scale deformable attention: public entry point and its reference."""
from .reference import ms_deform_attn_reference
from .validation import check_inputs


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """[N, S, M, D] values sampled at [N, Lq, M, L, P, 2] locations -> [N, Lq, M*D].

    Dispatches to the fastest available implementation; until the Triton kernel lands this is
    the PyTorch reference.
    """
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "check_inputs"]
