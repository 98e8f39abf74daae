"""Teacher boxes (Teach-DETR): read detection files, hold them compactly, attach them to training targets.

Two file formats are read (auto-detected from the first byte), and written by :func:`write_teacher_file`:

* ``released``: the format of the Teach-DETR code, one JSON object mapping an image id *as a string*
  to a list of detections ``{"bbox": [x, y, w, h], "category_id": c, "score": s}`` (other keys ignored);
* ``coco``: the COCO results format, a list of ``{"image_id", "bbox", "category_id", "score"}``
  (pycocotools ``loadRes``, MMDetection ``--format-only``, Detectron2 ``coco_instances_results.json``).

Boxes are COCO ``[x, y, w, h]`` pixels of the image as stored (the frame of the annotation file's boxes).

Memory. A plain ``json.load`` of COCO train2017 with two teachers (12 M boxes) builds several GB of
Python objects. The file is instead read in pieces of about :data:`PIECE_BYTES` cut at element
boundaries, each piece decoded (with ``orjson`` when it is installed, else ``json``) and turned into numpy
arrays at once, so the Python objects alive at any time are those of one piece. The result is CSR:
concatenated ``float32`` boxes and scores, ``int64`` labels, ``int8`` teacher indexes and per-image offsets
(about 29 bytes a box).

Bad entries (malformed, non-finite or degenerate box, unknown image id, unknown category, box wholly
outside its image) are dropped and counted, one log line per file. A file that is not JSON or in neither
format raises :class:`TeacherFileError` naming the file (main.py exits with its message, status 1).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import PIL.Image
import torch

try:  # optional: 3-4x faster decoding, same values; the standard json module otherwise
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

from .coco import AnnotationError
from .teacher_merge import MERGED_KEY, TeacherMerge, merge_image
from .transforms import add_box_set

logger = logging.getLogger(__name__)

PIECE_BYTES = 16 << 20  # bytes of JSON decoded at once
FORMATS = ("released", "coco")
BAD_KINDS = {  # kind -> what the log line says, in the order entries are checked
    "malformed": "malformed (not an object, or bbox/category_id/score/image id missing or of the wrong type)",
    "non_finite": "non-finite box or score",
    "degenerate": "zero or negative width/height",
    "unknown_image": "unknown image id",
    "unknown_category": "unknown category id",
    "outside": "box wholly outside its image",
}
EXT_FIELDS = ("ext_labels", "ext_scores", "ext_teacher")
# An element boundary: the end of one element, the separator, the start of the next (group 1 ends the piece,
# group 2 starts the rest). coco: between two detections; released: between two images' lists.
_BOUNDARY = {"coco": re.compile(rb"(\})\s*,\s*(\{)"),
             "released": re.compile(rb"(\])\s*,\s*(\"-?\d+\"\s*:\s*\[)")}


class TeacherFileError(AnnotationError):
    """A teacher-box file that cannot be read: missing, not JSON, or in neither format (the message names it)."""


@dataclass
class Detections:
    """Flat detections of one file (or several), file order kept.

    Attributes:
        image_ids: int64 [N].
        boxes: float32 [N, 4] COCO ``[x, y, w, h]`` pixels.
        category_ids: int64 [N] as in the file.
        scores: float32 [N].
        malformed: number of entries that could not be read (already left out).
        entry_ids: int64 [E] sorted ids of the images the file has an entry for, whatever became of the entry's
            detections (released format: every key holding a list, an empty one included; coco format: every
            image id of a readable detection); None: not known (the images of ``image_ids``). The released merge
            counts the teachers with an entry (datasets/teacher_merge.py). Kept as it is by :meth:`take`.
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray
    malformed: int = 0
    entry_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def take(self, keep: np.ndarray) -> Detections:
        return Detections(self.image_ids[keep], self.boxes[keep], self.category_ids[keep], self.scores[keep],
                          self.malformed, self.entry_ids)

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        if not parts:
            return cls.empty()
        entries = [p.entry_ids for p in parts if p.entry_ids is not None]
        return cls(np.concatenate([p.image_ids for p in parts]), np.concatenate([p.boxes for p in parts]),
                   np.concatenate([p.category_ids for p in parts]), np.concatenate([p.scores for p in parts]),
                   sum(p.malformed for p in parts), np.unique(np.concatenate(entries)) if entries else None)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                   np.zeros(0, np.float32))


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """``released`` (a JSON object) or ``coco`` (a JSON list), from the first non-blank byte.

    Raises:
        TeacherFileError: missing file, a folder, or a file that starts with neither ``{`` nor ``[``.
    """
    path = Path(path)
    if path.is_dir():
        raise TeacherFileError(f"teacher file {path} is a folder; give the JSON file of detections")
    if not path.is_file():
        raise TeacherFileError(f"teacher file {path} not found")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head:
            more = f.read(1 << 16)
            if not more:
                break
            head = more.lstrip()
    if head[:1] == b"{":
        return "released"
    if head[:1] == b"[":
        return "coco"
    raise TeacherFileError(f"teacher file {path} is not JSON detections: it starts with {head[:20]!r}; expected "
                           "an object {image id: [{bbox, category_id, score}, ...]} (Teach-DETR's format) or a "
                           "COCO results list [{image_id, bbox, category_id, score}, ...]")


def _pieces(path: Path, fmt: str, piece_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, text) of consecutive pieces of the elements between the outer brackets."""
    boundary = _BOUNDARY[fmt]
    with open(path, "rb") as f:
        buf = b""
        while not buf:  # past leading blanks (detect_format found the bracket)
            buf = f.read(piece_bytes).lstrip()
        offset = f.tell() - len(buf) + 1
        buf, eof = buf[1:], False  # past the opening bracket
        while True:
            while not eof and len(buf) < piece_bytes:
                more = f.read(piece_bytes)
                eof = not more
                buf += more
            match = boundary.search(buf, min(len(buf), piece_bytes) // 2) if not eof else None
            while match is None and not eof:  # one element longer than a piece: read on
                more = f.read(piece_bytes)
                eof = not more
                start = max(0, len(buf) - 64)
                buf += more
                match = boundary.search(buf, start) if not eof else None
            if match is None:
                yield offset, buf
                return
            yield offset, buf[:match.end(1)]
            offset += match.start(2)
            buf = buf[match.start(2):]


def _decode_piece(path: Path, fmt: str, offset: int, text: bytes, last: bool) -> Any:
    closer = b"}" if fmt == "released" else b"]"
    body = text.rstrip()
    if last:
        if not body.endswith(closer):
            raise TeacherFileError(f"teacher file {path} is not valid JSON: it ends without the closing "
                                   f"{closer.decode()!r} (a truncated file?)")
        body = body[:-1]
    wrapped = (b"{" if fmt == "released" else b"[") + body + closer
    if orjson is not None:
        try:
            return orjson.loads(wrapped)
        except orjson.JSONDecodeError:
            pass  # NaN/Infinity (Python's json writes them), or an error that json's message describes
    try:
        return json.loads(wrapped)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = offset + max(getattr(err, "pos", 1) - 1, 0)
        raise TeacherFileError(f"teacher file {path} is not valid JSON near byte {where}: "
                               f"{getattr(err, 'msg', err)}") from None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _careful(image_ids: list, dets: list) -> Detections:
    """Entry by entry: malformed ones are counted and left out."""
    rows, bad = [], 0
    for image_id, det in zip(image_ids, dets):
        image_id = _int_id(image_id)
        bbox = det.get("bbox") if isinstance(det, dict) else None
        cat = _int_id(det.get("category_id")) if isinstance(det, dict) else None
        score = _number(det.get("score")) if isinstance(det, dict) else None
        box = [_number(v) for v in bbox] if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else [None]
        if image_id is None or cat is None or score is None or None in box:
            bad += 1
            continue
        rows.append((image_id, box, cat, score))
    if not rows:
        empty = Detections.empty()
        empty.malformed = bad
        return empty
    ids, boxes, cats, scores = zip(*rows)
    return Detections(np.array(ids, np.int64), np.array(boxes, np.float64).astype(np.float32),
                      np.array(cats, np.int64), np.array(scores, np.float64).astype(np.float32), bad)


def _to_arrays(image_ids: list, dets: list) -> Detections:
    """Lists of image ids and detection dicts -> arrays; the careful path when any entry is odd."""
    try:
        ids = np.array(image_ids, dtype=np.int64)
        boxes = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(len(dets), 4)
        cats = np.array([d["category_id"] for d in dets], dtype=np.int64)
        scores = np.array([d["score"] for d in dets], dtype=np.float64)
        types_ok = all(type(i) is int for i in image_ids) and all(type(d["category_id"]) is int for d in dets)
    except (KeyError, TypeError, ValueError, OverflowError):
        types_ok = False
    if not types_ok or scores.dtype != np.float64 or boxes.dtype != np.float64:
        return _careful(image_ids, dets)
    return Detections(ids, boxes.astype(np.float32), cats, scores.astype(np.float32))


def _piece_detections(path: Path, fmt: str, data: Any) -> Detections:
    if fmt == "coco":
        if not all(isinstance(d, dict) for d in data):
            return _careful([d.get("image_id") if isinstance(d, dict) else None for d in data], data)
        return _to_arrays([d.get("image_id") for d in data], data)
    image_ids, dets, entries, bad = [], [], [], 0
    for key, value in data.items():
        if not isinstance(value, list):
            bad += 1
            continue
        image_id = _int_id(key)
        if image_id is not None:
            entries.append(image_id)
        image_ids.extend([key if image_id is None else image_id] * len(value))
        dets.extend(value)
    out = _to_arrays(image_ids, dets) if all(isinstance(d, dict) for d in dets) else _careful(image_ids, dets)
    out.malformed += bad
    out.entry_ids = np.unique(np.asarray(entries, dtype=np.int64))
    return out


def read_teacher_file(path: str | os.PathLike, piece_bytes: int = PIECE_BYTES) -> Detections:
    """Read a teacher file of either format into flat arrays (file order), in pieces (bounded memory).

    Entries that cannot be read (see :data:`BAD_KINDS` ``malformed``) are counted in ``malformed``.
    Non-finite and degenerate boxes are kept here (see :func:`check_detections`). ``entry_ids`` is filled.

    Raises:
        TeacherFileError: the file is missing, not JSON, truncated, or in neither format (message names it).
    """
    path = Path(path)
    fmt = detect_format(path)
    parts = []
    pieces = _pieces(path, fmt, piece_bytes)
    current = next(pieces, None)
    while current is not None:
        following = next(pieces, None)
        data = _decode_piece(path, fmt, current[0], current[1], last=following is None)
        if fmt == "released" and not parts and data and not any(_int_id(k) is not None for k in data):
            raise TeacherFileError(f"teacher file {path} is a JSON object whose keys are not image ids (e.g. "
                                   f"{next(iter(data))!r}); expected {{image id: [{{bbox, category_id, score}}, "
                                   "...]} (Teach-DETR's format) or a COCO results list")
        parts.append(_piece_detections(path, fmt, data))
        del data  # before the next piece is decoded
        current = following
    dets = Detections.concat(parts)
    if fmt == "coco":
        dets.entry_ids = np.unique(dets.image_ids)
    return dets


# ------------------------------------------------------------------------------------------------
# checking, compact storage, attaching to targets
# ------------------------------------------------------------------------------------------------
def check_detections(dets: Detections, image_ids: np.ndarray | None = None, sizes: np.ndarray | None = None,
                     category_ids: np.ndarray | None = None) -> tuple[Detections, Counter]:
    """Drop bad entries; count each under its first problem (kinds of :data:`BAD_KINDS`).

    Args:
        dets: detections as read.
        image_ids: sorted int64 [I] ids of the data set's images, or None (no image check).
        sizes: int64 [I, 2] (width, height) of those images as read, or None (no ``outside`` check). A box is
            wholly outside when clamping it to its image leaves no area (the training targets' rule).
        category_ids: the category ids known to the data set, or None (no category check).

    Returns:
        (kept detections, Counter of dropped entries per kind, ``malformed`` included).
    """
    counts: Counter = Counter({"malformed": dets.malformed})
    bad = np.zeros(len(dets), dtype=bool)

    def mark(kind: str, mask: np.ndarray) -> None:
        new = mask & ~bad
        counts[kind] = int(new.sum())
        bad[new] = True

    boxes = dets.boxes
    mark("non_finite", ~(np.isfinite(boxes).all(axis=1) & np.isfinite(dets.scores)))
    with np.errstate(invalid="ignore"):
        mark("degenerate", ~((boxes[:, 2] > 0) & (boxes[:, 3] > 0)))
    row = None
    if image_ids is not None:
        row = np.searchsorted(image_ids, dets.image_ids).clip(max=max(len(image_ids) - 1, 0))
        found = image_ids[row] == dets.image_ids if len(image_ids) else np.zeros(len(dets), dtype=bool)
        mark("unknown_image", ~found)
    if category_ids is not None:
        mark("unknown_category", ~np.isin(dets.category_ids, np.asarray(category_ids, dtype=np.int64)))
    if row is not None and sizes is not None and len(image_ids):
        size = sizes.astype(np.float32)[row]
        with np.errstate(invalid="ignore", over="ignore"):
            x0 = np.clip(boxes[:, 0], 0, size[:, 0])
            y0 = np.clip(boxes[:, 1], 0, size[:, 1])
            x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, size[:, 0])
            y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, size[:, 1])
            mark("outside", ~((x1 > x0) & (y1 > y0)))
    kept = dets.take(~bad)
    kept.malformed = 0
    return kept, counts


def describe_dropped(counts: Counter) -> str:
    """``3 unknown image id, 1 non-finite box or score`` (kinds with a count only), or ``none``."""
    parts = [f"{counts[k]} {BAD_KINDS[k].split(' (')[0]}" for k in BAD_KINDS if counts.get(k)]
    return ", ".join(parts) or "none"


class TeacherBoxes:
    """Every teacher's boxes of a data set in CSR form, and the ``extra_box_sets`` hook that attaches them.

    Storage (N boxes of all teachers, I images with at least one box): ``image_ids`` int64 [I] sorted,
    ``offsets`` int64 [I + 1], and per box ``boxes`` float32 [N, 4] COCO ``[x, y, w, h]`` pixels, ``labels``
    int64 [N] (the data set's label space), ``scores`` float32 [N], ``teacher`` int8 [N] (index in ``names``).
    Within an image, boxes come teacher by teacher, each in its file's order. ``entries``: per teacher, the
    sorted int64 ids of the images its file has an entry for (None: the images it has boxes on).
    ``category_ids``: label -> category id (``--contiguous_classes``), or None (labels are the category ids).

    Called as ``target = teacher_boxes(pil_image, target)`` (before the transforms), it adds the box set
    ``ext_boxes`` [T, 4] (xyxy pixels, clamped to the image, empty boxes dropped, as the ground truth) with
    ``ext_labels`` int64 [T], ``ext_scores`` float32 [T], ``ext_teacher`` int64 [T]; T may be 0.

    * ``merge`` None (``--ensemble_mode parallel``): every teacher's boxes, unmerged.
    * ``merge`` given (merged mode, the default): the released merge of datasets/teacher_merge.py on those boxes
      (class-aware NMS on the category ids, ranked by score + teacher weight, first floor(N / T); the whole-image
      dummy box, teacher -1, when no teacher has an entry), and ``target["ext_merged"] = True`` (Python bool,
      :data:`MERGED_KEY`): the Teach-DETR add-on then uses the boxes as they are.

    It draws no random numbers. Plain numpy arrays: DataLoader workers share them (copy-on-write pages stay clean).
    """

    def __init__(self, names: Sequence[str], image_ids: np.ndarray, offsets: np.ndarray, boxes: np.ndarray,
                 labels: np.ndarray, scores: np.ndarray, teacher: np.ndarray,
                 entries: Sequence[np.ndarray] | None = None, merge: TeacherMerge | None = None,
                 category_ids: np.ndarray | None = None) -> None:
        self.names = list(names)
        self.image_ids, self.offsets = image_ids, offsets
        self.boxes, self.labels, self.scores, self.teacher = boxes, labels, scores, teacher
        self.entries = None if entries is None else [np.asarray(e, dtype=np.int64) for e in entries]
        self.merge, self.category_ids = merge, category_ids
        if merge is not None and len(merge.weights) != len(self.names):
            raise ValueError(f"{len(merge.weights)} teacher weight(s) for {len(self.names)} teacher(s)")

    @classmethod
    def from_detections(cls, names: Sequence[str], per_teacher: Sequence[Detections],
                        labels: Sequence[np.ndarray] | None = None, merge: TeacherMerge | None = None,
                        category_ids: np.ndarray | None = None) -> TeacherBoxes:
        """Concatenate the teachers (index = position) and sort stably by image id.

        Args:
            names: teacher names.
            per_teacher: each teacher's checked detections (their ``entry_ids``, or else image ids, give
                ``entries``).
            labels: each teacher's labels (int64 [N_t]); None: the category ids.
            merge, category_ids: see the class.
        """
        labels = [d.category_ids for d in per_teacher] if labels is None else list(labels)
        entries = [np.unique(d.image_ids) if d.entry_ids is None else d.entry_ids for d in per_teacher]
        ids = np.concatenate([d.image_ids for d in per_teacher] + [np.zeros(0, np.int64)])
        position = np.empty(len(ids), dtype=np.int64)  # sorted position of every input row
        position[np.argsort(ids, kind="stable")] = np.arange(len(ids))
        ids[position] = ids.copy()
        image_ids, starts = np.unique(ids, return_index=True)
        del ids
        offsets = np.append(starts, position.size).astype(np.int64)

        def scatter(parts: list[np.ndarray], dtype: type, width: tuple[int, ...] = ()) -> np.ndarray:
            out, lo = np.empty((position.size, *width), dtype=dtype), 0  # no concatenated copy (memory)
            for part in parts:
                out[position[lo:lo + len(part)]] = part
                lo += len(part)
            return out

        return cls(names, image_ids, offsets, scatter([d.boxes for d in per_teacher], np.float32, (4,)),
                   scatter(labels, np.int64), scatter([d.scores for d in per_teacher], np.float32),
                   scatter([np.full(len(d), i, np.int8) for i, d in enumerate(per_teacher)], np.int8),
                   entries, merge, category_ids)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays."""
        return sum(a.nbytes for a in (self.image_ids, self.offsets, self.boxes, self.labels, self.scores,
                                      self.teacher, *(self.entries or ())))

    def rows(self, image_id: int) -> slice:
        """The rows of one image (an empty slice when it has no box)."""
        i = int(np.searchsorted(self.image_ids, image_id))
        if i < len(self.image_ids) and self.image_ids[i] == image_id:
            return slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return slice(0, 0)

    def teachers_with_entry(self, image_id: int) -> int:
        """How many teachers' files have an entry for the image (T of the merge's floor(N / T))."""
        if self.entries is None:
            return len(np.unique(self.teacher[self.rows(image_id)]))
        return sum(int(i < len(e) and e[i] == image_id) for e in self.entries
                   for i in [int(np.searchsorted(e, image_id))])

    def __call__(self, image: PIL.Image.Image, target: dict[str, Any]) -> dict[str, Any]:
        image_id = int(target["image_id"])
        rows = self.rows(image_id)
        boxes = torch.from_numpy(self.boxes[rows].copy()).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        w, h = image.size
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        labels = torch.from_numpy(self.labels[rows].astype(np.int64))[keep]
        scores = torch.from_numpy(self.scores[rows].astype(np.float32))[keep]
        teacher = torch.from_numpy(self.teacher[rows].astype(np.int64))[keep]
        boxes = boxes[keep]
        if self.merge is None:
            return add_box_set(target, "ext_boxes", boxes,
                               {"ext_labels": labels, "ext_scores": scores, "ext_teacher": teacher})
        classes = labels if self.category_ids is None else torch.from_numpy(self.category_ids)[labels]
        boxes, labels, scores, teacher = merge_image(boxes, labels, scores, teacher, classes,
                                                     self.teachers_with_entry(image_id), (w, h), self.merge)
        target = add_box_set(target, "ext_boxes", boxes,
                             {"ext_labels": labels, "ext_scores": scores, "ext_teacher": teacher})
        return {**target, MERGED_KEY: True}


def load_teacher_boxes(files: Mapping[str, str | os.PathLike], image_ids: Sequence[int],
                       sizes: np.ndarray | None = None, category_ids: Sequence[int] | None = None,
                       label_table: Sequence[int] | None = None, source: str = "",
                       merge: TeacherMerge | None = None) -> TeacherBoxes:
    """Read, check and index every teacher file (once, in the main process); one log line per file.

    Args:
        files: teacher name -> file (insertion order = teacher index).
        image_ids: ids of the data set's images.
        sizes: int [I, 2] (width, height) of those images in ``image_ids`` order, or None.
        category_ids: category ids known to the data set (others are dropped), or None.
        label_table: label -> category id (``--contiguous_classes``): labels become indexes in it; None: the
            labels are the category ids.
        source: the data set, for the log.
        merge: merged mode's settings (:class:`TeacherBoxes`), or None (parallel mode: unmerged boxes).

    Raises:
        TeacherFileError: a file is missing, not JSON or in neither format.
    """
    ids = np.asarray(list(image_ids), dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    sizes = None if sizes is None else np.asarray(sizes, dtype=np.int64).reshape(-1, 2)[order]
    known = np.asarray(sorted(label_table if label_table is not None else category_ids or []), dtype=np.int64) \
        if (label_table is not None or category_ids is not None) else None
    if len(files) > np.iinfo(np.int8).max:
        raise ValueError(f"at most {np.iinfo(np.int8).max} teachers (teacher indexes are int8)")
    per_teacher, labels = [], []
    for name, path in files.items():
        dets = read_teacher_file(path)
        total = len(dets) + dets.malformed
        kept, counts = check_detections(dets, ids, sizes, known)
        del dets  # before the next file is read
        if kept.entry_ids is not None:  # only the data set's images matter
            kept.entry_ids = np.intersect1d(kept.entry_ids, ids)
        per_teacher.append(kept)
        labels.append(kept.category_ids if label_table is None
                      else np.searchsorted(np.asarray(label_table, np.int64), kept.category_ids))
        covered = len(np.unique(kept.image_ids))
        dropped = sum(counts.values())
        log = logger.warning if dropped else logger.info
        log("teacher %r (%s): %d box(es) kept of %d entries, on %d of %d image(s)%s; dropped: %s", name, path,
            len(kept), total, covered, len(ids), f" of {source}" if source else "", describe_dropped(counts))
    table = None if label_table is None else np.asarray(label_table, dtype=np.int64)
    return TeacherBoxes.from_detections(list(files), per_teacher, labels, merge, table)


def teacher_boxes_for_dataset(files: Mapping[str, str | os.PathLike], dataset: Any,
                              merge: TeacherMerge | None = None) -> TeacherBoxes:
    """:func:`load_teacher_boxes` for a :class:`datasets.coco.CocoDetection` (its images, sizes, categories and,
    with ``--contiguous_classes``, its label table); ``merge``: merged mode's settings, None: unmerged."""
    imgs = dataset.coco.imgs
    sizes = np.array([(imgs[i].get("width", math.inf), imgs[i].get("height", math.inf)) for i in dataset.ids],
                     dtype=np.float64)
    sizes = None if not np.isfinite(sizes).all() else sizes.astype(np.int64)
    table = getattr(dataset, "category_ids", None)
    return load_teacher_boxes(files, dataset.ids, sizes, category_ids=sorted(dataset.coco.cats),
                              label_table=table, source=str(getattr(dataset, "ann_file", "")), merge=merge)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _group_batches(ids: np.ndarray, boxes_per_batch: int) -> Iterator[tuple[int, int]]:
    """[start, end) row ranges of about ``boxes_per_batch`` rows that never split an image's rows."""
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
    ends = np.append(starts[1:], len(ids))
    lo = 0
    while lo < len(ids):
        hi = int(ends[min(np.searchsorted(ends, lo + boxes_per_batch, side="left"), len(ends) - 1)])
        yield lo, hi
        lo = hi


# One detection; %r of a float is its shortest repr, as json writes it.
_RELEASED_ROW = '{"bbox": [%r, %r, %r, %r], "category_id": %d, "score": %r}'
_COCO_ROW = '{"image_id": %d, "bbox": [%r, %r, %r, %r], "category_id": %d, "score": %r}'


def write_teacher_file(path: str | os.PathLike, dets: Detections, fmt: str = "released") -> None:
    """Write detections as a teacher file (``released`` or ``coco``), sorted by image id (file order kept within
    an image), atomically (``NAME.tmp`` then a rename). float32 values are written exactly (float64 repr).

    Non-finite values must be dropped before (JSON has no NaN); see :func:`check_detections`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown teacher file format {fmt!r}; expected one of {FORMATS}")
    path = Path(path)
    order = np.argsort(dets.image_ids, kind="stable")
    ids = dets.image_ids[order]
    tmp = path.with_name(path.name + ".tmp")
    first = True
    with open(tmp, "w") as f:
        f.write("{" if fmt == "released" else "[")
        for lo, hi in _group_batches(ids, 1 << 17):
            rows = order[lo:hi]
            cols = (ids[lo:hi].tolist(), dets.boxes[rows].astype(np.float64).tolist(),
                    dets.category_ids[rows].tolist(), dets.scores[rows].astype(np.float64).tolist())
            if fmt == "coco":
                text = ", ".join(_COCO_ROW % (i, *b, c, s) for i, b, c, s in zip(*cols))
            else:
                per_image: dict[int, list] = {}
                for i, b, c, s in zip(*cols):
                    per_image.setdefault(i, []).append(_RELEASED_ROW % (*b, c, s))
                text = ", ".join(f'"{i}": [{", ".join(v)}]' for i, v in per_image.items())
            f.write(("" if first else ", ") + text)
            first = False
        f.write("}" if fmt == "released" else "]")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
