"""Hot ops, each beside its pure-PyTorch reference."""
from .ms_deform_attn import (
    get_ms_deform_attn_impl,
    ms_deform_attn,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
    set_ms_deform_attn_impl,
)

__all__ = [
    "get_ms_deform_attn_impl", "ms_deform_attn", "ms_deform_attn_reference", "ms_deform_attn_triton",
    "set_ms_deform_attn_impl",
]
