"""nn.Module form of multi-scale deformable attention."""
from .ms_deform_attn import MSDeformAttn  # noqa: F401
