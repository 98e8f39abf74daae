"""Criterion: SetCriterion and the switchable training add-ons (one file each)."""
from . import hybrid, ms_detr  # noqa: F401  (register the one-to-many add-ons)
from .base import AddOn, LossGroup, LossSpec, ModelOptions, StepContext, loss_key, query_providers  # noqa: F401
from .denoising import Denoising, DenoisingConfig, DenoisingQueries  # noqa: F401  (registers the "dn" add-on)
from .set_criterion import SetCriterion, main_coefs, sigmoid_focal_loss  # noqa: F401
