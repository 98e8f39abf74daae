"""Training add-ons, one module per paper (everything of it inside: flags, query groups, losses, layers).

Adding an add-on: its module here plus one import line below (``register_addon`` does the rest).
"""
from . import (  # noqa: F401  (register the add-ons in their fixed order)
    co_detr,  # noqa: F401  (Co-DETR: auxiliary heads on the memory, positive query groups)
    dn,
    hybrid,
    ms_detr,
    od,  # noqa: F401  (OD-DETR: online distillation from the EMA teacher)
    teach,  # noqa: F401  (Teach-DETR: teacher boxes as extra one-to-one targets)
)
from .base import (  # noqa: F401
    CAPABILITIES,
    AddOn,
    HostRequest,
    LossGroup,
    LossSpec,
    StepContext,
    loss_key,
    overrides,
    query_providers,
)
from .builder import build_addons, enabled_addons, evaluation_model, plan_addons  # noqa: F401
