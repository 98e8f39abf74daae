"""Functional form of multi-scale deformable attention."""
from .ms_deform_attn_func import ms_deform_attn, ms_deform_attn_core_pytorch  # noqa: F401
