"""Multi-scale deformable attention: one op, several implementations behind one function."""
from .functions.ms_deform_attn_func import ms_deform_attn, ms_deform_attn_core_pytorch  # noqa: F401
from .modules.ms_deform_attn import MSDeformAttn  # noqa: F401
