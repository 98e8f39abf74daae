"""Co-DETR (``--addons co_detr``): auxiliary heads on the encoder memory and their positives as query groups.

pyramid.py (memory -> pyramid), atss.py (ATSS head), rcnn.py (RPN + RoI head), queries.py (positive queries),
common.py (what a head returns), addon.py (the add-on).
"""
from .addon import CoDETR  # noqa: F401  (registers the add-on)
