"""COCO box evaluation with pycocotools, gathered once across processes.

Plays the role of fundamentalvision/Deformable-DETR ``datasets/coco_eval.py`` (from DETR) with the
same public calls (``update``, ``synchronize_between_processes``, ``accumulate``, ``summarize``,
``coco_eval[iou_type].stats``), written anew. Instead of evaluating every batch and merging
per-image results, detections are kept per image id, gathered once, and evaluated once; an image
seen twice (the distributed sampler pads the last batch with repeats) counts once, so the result
equals a single-process evaluation.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.misc import all_gather_object

logger = logging.getLogger(__name__)

SUPPORTED_IOU_TYPES = ("bbox",)


def _as_list(values: Any) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    return np.asarray(values).tolist()


def to_coco_detections(image_id: int, prediction: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One image's predictions -> COCO result dicts.

    Args:
        image_id: COCO image id.
        prediction: ``scores`` [K], ``labels`` [K] (category ids), ``boxes`` [K, 4] xyxy in pixels
            of the original image (tensors, arrays or lists).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
    """
    scores, labels, boxes = (_as_list(prediction[k]) for k in ("scores", "labels", "boxes"))
    return [{"image_id": int(image_id), "category_id": int(label),
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)}
            for score, label, (x0, y0, x1, y1) in zip(scores, labels, boxes)]


def labels_to_category_ids(prediction: Mapping[str, Any], table: torch.Tensor) -> dict[str, Any]:
    """One image's predictions with labels 0..C-1 mapped to the annotation file's category ids.

    Used with ``--contiguous_classes``. Predictions of labels beyond the table (a class head set
    larger than C with ``--num_classes``) are dropped: no category of the file has them, and COCO
    evaluation would ignore them anyway.

    Args:
        prediction: ``scores`` [K], ``labels`` [K] (int64, 0..), ``boxes`` [K, 4]: tensors, or numpy arrays.
        table: int64 [C], ``table[label]`` = category id.

    Returns:
        A new dict with the same keys, ``labels`` holding category ids.
    """
    labels = prediction["labels"]
    keep = labels < len(table)
    arrays = not torch.is_tensor(labels)  # numpy host copies (the evaluation loop's)
    mapped = {k: v[keep] if (isinstance(v, np.ndarray) if arrays else torch.is_tensor(v)) and len(v) == len(labels)
              else v for k, v in prediction.items()}
    mapped["labels"] = table.numpy()[labels[keep]] if arrays else table.to(labels.device)[labels[keep]]
    return mapped


def load_detections(coco_gt: COCO, detections: list[dict[str, Any]]) -> COCO:
    """A pycocotools results index over ``coco_gt``'s images; also valid with no detections."""
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(detections)
    # loadRes indexes detections[0], so an empty result set is built by hand.
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


class CocoEvaluator:
    """Collects detections and computes COCO AP with pycocotools.

    Args:
        coco_gt: ground-truth index (see ``datasets.get_coco_api_from_dataset``).
        iou_types: evaluation types; only "bbox" is supported.

    Attributes:
        coco_eval: iou type -> ``COCOeval``; after :meth:`summarize`, ``coco_eval["bbox"].stats``
            holds the 12 numbers (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl).
        img_ids: ids of the images evaluated so far, sorted.
    """

    def __init__(self, coco_gt: COCO, iou_types: Iterable[str] = ("bbox",)) -> None:
        self.iou_types = tuple(iou_types)
        unsupported = [t for t in self.iou_types if t not in SUPPORTED_IOU_TYPES]
        if unsupported:
            raise ValueError(f"CocoEvaluator: unsupported iou type(s) {unsupported}; supported: {SUPPORTED_IOU_TYPES}")
        self.coco_gt = coco_gt
        self.coco_eval = {t: COCOeval(cocoGt=coco_gt, iouType=t) for t in self.iou_types}
        self._detections: dict[int, list[dict[str, Any]]] = {}

    @property
    def img_ids(self) -> list[int]:
        return sorted(self._detections)

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        """Add predictions ``{image_id: {"scores", "labels", "boxes" (xyxy pixels)}}``.

        An image with no detections still counts as evaluated (its objects are all misses).
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            self._detections[image_id] = to_coco_detections(image_id, prediction)

    def synchronize_between_processes(self) -> None:
        """Gather every process's detections (one collective); repeated image ids count once."""
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in all_gather_object(self._detections):
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        self._detections = merged

    def accumulate(self) -> None:
        """Run pycocotools' per-image evaluation and accumulation (quietly)."""
        img_ids = self.img_ids
        if not img_ids:
            logger.warning("CocoEvaluator: no image was evaluated; every metric will read -1")
        detections = [d for i in img_ids for d in self._detections[i]]
        for coco_eval in self.coco_eval.values():
            coco_eval.cocoDt = load_detections(self.coco_gt, detections)
            coco_eval.params.imgIds = img_ids
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.evaluate()
                coco_eval.accumulate()

    def summarize(self) -> None:
        """Print pycocotools' 12-line summary per iou type and fill ``coco_eval[t].stats``."""
        for iou_type, coco_eval in self.coco_eval.items():
            logger.info("IoU metric: %s", iou_type)
            coco_eval.summarize()
