"""Hungarian matcher between predictions and ground truth (scipy's linear_sum_assignment), and the staged
assigner protocol that lets the criterion match every layer and group with one device-to-host copy.

An assigner is any callable ``(outputs, targets) -> indices``. A *staged* assigner also has
``stages(outputs, targets)``: a generator that does its device work, yields the list of device tensors it
needs on the host, receives their host copies (``gen.send``), may yield again (MS-DETR: its random draws need
sizes read on the host), and finally returns the indices (``StopIteration.value``). ``run_stages`` advances
many such generators in lock-step, so each round costs ONE device-to-host copy (``to_host``) for all of
them; calling a staged assigner directly runs it alone. Stages must draw random numbers only after their
first yield's host copy, in the order the unbatched code draws them: the draws of generators advanced in a
fixed order then keep their order.
"""
from __future__ import annotations

from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]
Stages = Generator[list[Tensor], list[Tensor], Indices]
_ALIGN = 8  # bytes: every tensor starts at a multiple of the largest element size in the packed host buffer


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """numpy's dtype for a torch dtype, or None where numpy has none (bfloat16)."""
    if dtype not in _NUMPY_DTYPES:
        try:
            _NUMPY_DTYPES[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:
            _NUMPY_DTYPES[dtype] = None
    return _NUMPY_DTYPES[dtype]


_NUMPY_DTYPES: dict[torch.dtype, np.dtype | None] = {}


def to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Host copies of ``tensors`` (any dtypes and shapes, one device) made with ONE device-to-host copy.

    The tensors are concatenated flat per dtype, the per-dtype buffers packed as bytes into one (each padded to
    8 bytes), copied with one ``.cpu()`` (also on a CPU run, where it is a no-op, so that sync counts on the CPU
    are those of a GPU), and viewed back with their dtype and shape through numpy (bfloat16 through torch). Host
    work: about one operator per tensor and four per dtype (it was about seven per tensor; MS-DETR's assigner
    hands over ~100 tensors a step). An empty list copies nothing.
    """
    if not tensors:
        return []
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    parts, offsets, start = [], [0] * len(tensors), 0
    for members in groups.values():
        flat = [(t.detach() if t.requires_grad else t).reshape(-1) for t in (tensors[i] for i in members)]
        raw = (torch.cat(flat) if len(flat) > 1 else flat[0]).view(torch.uint8)
        for i in members:
            offsets[i] = start
            start += tensors[i].numel() * tensors[i].element_size()
        pad = -raw.numel() % _ALIGN
        parts += [raw, raw.new_zeros(pad)] if pad else [raw]
        start += pad
    host = torch.cat(parts).cpu()  # a copy also when one tensor is the whole buffer (cat always copies)
    buffer = host.numpy()
    out = []
    for t, offset in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        np_dtype = _numpy_dtype(t.dtype)
        if np_dtype is None:
            out.append(host[offset:offset + nbytes].view(t.dtype).view(t.shape))
        else:
            out.append(torch.from_numpy(buffer[offset:offset + nbytes].view(np_dtype).reshape(t.shape)))
    return out


def run_stages(stages: Sequence[Stages]) -> list[Indices]:
    """Run staged assigners in lock-step: per round, each generator (in order) runs to its next yield, then one
    ``to_host`` serves them all. Returns each generator's indices, in order."""
    rounds = lockstep(stages)
    reply = None
    while True:
        try:
            request = rounds.send(reply)
        except StopIteration as done:
            return done.value
        reply = to_host(request)


def lockstep(stages: Sequence[Stages]) -> Stages:
    """Several staged assignments run as one generator (each round's requests concatenated, the reply split back),
    so that a caller's ``run_stages`` serves them all with its one copy per round. Returns their results, in
    order (a generator whose stages returns a list of indices: one entry per stage)."""
    results: list[Any] = [None] * len(stages)
    replies: dict[int, list[Tensor] | None] = {i: None for i in range(len(stages))}
    while replies:
        requests: dict[int, list[Tensor]] = {}
        for i, reply in replies.items():
            try:
                requests[i] = stages[i].send(reply)
            except StopIteration as done:
                results[i] = done.value
        if not requests:
            break
        flat = yield [t for req in requests.values() for t in req]
        replies, start = {}, 0
        for i, req in requests.items():
            replies[i] = flat[start:start + len(req)]
            start += len(req)
    return results


def staged(assigner: object) -> Callable[..., Stages] | None:
    """The assigner's ``stages`` method, or None when it has none or when a subclass overrides the call
    (``forward`` / ``__call__``) below the class that defines ``stages`` (then only the call is trusted)."""
    fn = getattr(assigner, "stages", None)
    if fn is None:
        return None
    mro = type(assigner).__mro__
    call = "forward" if isinstance(assigner, nn.Module) else "__call__"
    depth = {name: next((i for i, c in enumerate(mro) if name in c.__dict__), len(mro)) for name in ("stages", call)}
    return fn if depth["stages"] <= depth[call] else None


def layer_staged(assigner: object) -> Callable[..., Generator[list[Tensor], list[Tensor], list[Indices]]] | None:
    """The assigner's ``layer_stages`` method (several prediction sets against the same targets at once), or None
    when it has none, when ``staged`` refuses it, or when a subclass overrides ``stages`` or ``costs`` below the
    class that defines ``layer_stages`` (then only the per-set stages are trusted)."""
    fn = getattr(assigner, "layer_stages", None)
    if fn is None or staged(assigner) is None:
        return None
    mro = type(assigner).__mro__
    depth = {name: next((i for i, c in enumerate(mro) if name in c.__dict__), len(mro))
             for name in ("layer_stages", "stages", "costs")}
    return fn if depth["layer_stages"] <= min(depth["stages"], depth["costs"]) else None


class Matched(list):
    """``Indices`` (per image (query indices, target indices), device views) with the flat device tensors the
    losses use, so that they need no per-image loop.

    Attributes:
        batch_idx, src_idx: [N] image and query of every pair (image by image, each in the assigner's order).
        tgt_idx: [N] target of every pair in the group's targets concatenated over images.
        lengths: [B] targets per image.
    """

    def __init__(self, pairs: Indices, rows: Tensor, lengths: Tensor, cache: dict[str, Tensor]) -> None:
        super().__init__(pairs)
        self.batch_idx, self.src_idx, _, self.tgt_idx = rows.unbind(0)
        self.lengths = lengths
        self._cache = cache  # shared by the layers of one group: its targets concatenated over images, per key

    def gather(self, targets: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
        """``targets[b][key][j]`` of every pair, in pair order (one gather from the concatenated targets)."""
        if key not in self._cache:
            self._cache[key] = torch.cat([t[key] for t in targets])
        return self._cache[key][self.tgt_idx]


def _host_rows(indices: Indices, offsets: np.ndarray) -> np.ndarray:
    """[4, N] int64: image, query, target (per image), target (concatenated) of every pair; host indices."""
    src = [s.numpy().astype(np.int64, copy=False) for s, _ in indices]
    tgt = [t.numpy().astype(np.int64, copy=False) for _, t in indices]
    batch = np.repeat(np.arange(len(src), dtype=np.int64), [len(x) for x in src])
    src_all = np.concatenate(src) if src else np.zeros(0, np.int64)
    tgt_all = np.concatenate(tgt) if tgt else np.zeros(0, np.int64)
    return np.stack([batch, src_all, tgt_all, tgt_all + offsets[batch]])


def _device_rows(indices: Indices, offsets: np.ndarray, device: torch.device) -> Tensor:
    """``_host_rows`` of indices already on the device (fixed indices: denoising), without a sync."""
    src = [s.to(device, torch.int64, non_blocking=True) for s, _ in indices]
    tgt = [t.to(device, torch.int64, non_blocking=True) for _, t in indices]
    batch = torch.cat([torch.full_like(x, b) for b, x in enumerate(src)])
    offset = torch.cat([torch.full_like(x, int(o)) for x, o in zip(tgt, offsets)])
    tgt_all = torch.cat(tgt)
    return torch.stack([batch, torch.cat(src), tgt_all, tgt_all + offset])


def _upload(arrays: Sequence[np.ndarray], device: torch.device) -> list[Tensor]:
    """Device copies of int64 host arrays with ONE non-blocking host-to-device copy (pinned on a GPU)."""
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    views, start = [], 0
    for a in arrays:
        views.append(flat[start:start + a.size].view(a.shape))
        start += a.size
    return views


def upload(groups: Sequence[tuple[Sequence[Mapping[str, Tensor]], Sequence[Indices]]],
           device: torch.device) -> list[list[Matched]]:
    """Every group's and layer's indices as ``Matched`` on ``device``, without a sync: host indices (the
    assigners') go in one non-blocking copy, device ones are flattened there; the same indices object on
    several layers (fixed indices) is flattened once.

    Args:
        groups: per group (its targets, its indices per layer).
    """
    arrays: list[np.ndarray] = []
    plans = []
    for targets, per_layer in groups:
        lengths = np.array([len(t["labels"]) for t in targets], dtype=np.int64)
        offsets = np.cumsum(lengths) - lengths
        lengths_at = len(arrays)
        arrays.append(lengths)
        unique: dict[int, tuple[int, Any, list[int]]] = {}
        for indices in per_layer:
            if id(indices) not in unique:
                if all(s.device.type == "cpu" and t.device.type == "cpu" for s, t in indices):
                    arrays.append(_host_rows(indices, offsets))
                    rows: Any = len(arrays) - 1
                else:
                    rows = _device_rows(indices, offsets, device)
                unique[id(indices)] = (len(unique), rows, [len(s) for s, _ in indices])
        plans.append((lengths_at, list(unique.values()), [unique[id(i)][0] for i in per_layer]))
    views = _upload(arrays, device) if arrays else []
    out = []
    for lengths_at, unique_rows, layer_entry in plans:
        cache: dict[str, Tensor] = {}
        built = []
        for _, rows, sizes in unique_rows:
            rows = views[rows] if isinstance(rows, int) else rows
            # per image (query, target) views: two splits (host work: 4 ops, not 4 per image)
            pairs = list(zip(rows[1].split(sizes), rows[2].split(sizes)))
            built.append(Matched(pairs, rows, views[lengths_at], cache))
        out.append([built[e] for e in layer_entry])
    return out


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal-loss matching cost [Q, G] of classifying each query as each target's class."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos[..., labels] - neg[..., labels]


def softmax_class_cost(logits: Tensor, labels: Tensor) -> Tensor:
    """DETR's matching cost [Q, G]: minus the softmax probability (over all K logits) of each target's class."""
    return -logits.softmax(-1)[..., labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU).

    With ``cls_loss="softmax"`` (DETR) the class cost is ``-softmax(logits)[:, label]`` instead of the focal cost.

    Costs are computed per image (no B x B cross terms) and moved to the CPU in one transfer.
    Non-finite costs (a diverged model) are replaced by a large finite value so matching never fails.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs.
        focal_alpha, focal_gamma: focal parameters of the class cost (the official code hard-codes 0.25, 2).
        cls_loss: "focal" (sigmoid logits) or "softmax" (DETR: the last logit is "no object").
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, cls_loss: str = "focal") -> None:
        super().__init__()
        if cls_loss not in ("focal", "softmax"):
            raise ValueError(f"cls_loss must be 'focal' or 'softmax', got {cls_loss!r}")
        self.cls_loss = cls_loss
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs can't be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.giou_eps = 0.0  # DAB-DETR, DN-DETR and DINO add 1e-6 to the GIoU's union and hull (their builders set it)

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Cost [..., Q, G]: logits [..., Q, K], boxes [..., Q, 4] cxcywh, targets [G], [G, 4] (one image, or a
        batch against all its targets; each entry's arithmetic is the same either way)."""
        cost_bbox = torch.cdist(boxes, tgt_boxes.expand(*boxes.shape[:-2], *tgt_boxes.shape), p=1)
        if self.cls_loss == "softmax":
            cost_class = softmax_class_cost(logits, tgt_labels)
        else:
            cost_class = focal_class_cost(logits, tgt_labels, self.focal_alpha, self.focal_gamma)
        # no validity check (it would sync): predictions are sigmoid boxes, targets were checked when loaded
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes), check=False,
                                         eps=self.giou_eps)
        c = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return c

    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        """Match every image.

        Args:
            outputs: ``pred_logits`` [B, Q, K] and ``pred_boxes`` [B, Q, 4] (cxcywh); optionally ``valid``
                [B, Q] bool: queries that may be matched (others only when fewer valid queries than targets).
            targets: per image ``labels`` [G_b] and ``boxes`` [G_b, 4] (cxcywh).

        Returns:
            Per image (query indices, target indices), int64 host tensors, of length min(Q, G_b).
        """
        return run_stages([self.stages(outputs, targets)])[0]

    def costs(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]],
              batched: bool | None = None) -> Tensor:
        """Every image's cost [Q, G_b] (images without targets skipped), flattened and concatenated (device).

        ``batched`` (default: on a GPU): the whole batch at once ([B, Q, sum G_b], a fixed number of kernels
        whatever B), then its B diagonal blocks gathered with an index built on the host (a non-blocking
        upload). Every entry's arithmetic is that of the per-image loop, but on the CPU vectorised
        transcendental functions round differently at the tail of a tensor than inside it, so there the
        per-image loop is kept (it gives the previous results bitwise; a GPU computes each element alike).
        """
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return outputs["pred_logits"].new_empty(0, dtype=torch.float)
        with torch.no_grad():
            # A diverged step may carry NaNs; matching must still succeed so the step can be skipped cleanly.
            logits = torch.nan_to_num(outputs["pred_logits"].float())
            boxes = torch.nan_to_num(outputs["pred_boxes"].float(), nan=0.5)
            valid = outputs.get("valid")
            if not (logits.device.type != "cpu" if batched is None else batched):
                costs = []
                for b, t in enumerate(targets):
                    if sizes[b]:
                        cost = self.cost_matrix(logits[b], boxes[b], t["labels"], t["boxes"].float())
                        if valid is not None:
                            cost = cost.masked_fill(~valid[b, :, None], 1e8)
                        costs.append(cost.flatten())
                return torch.cat(costs)
            return self._diagonal_costs(logits[None], boxes[None], None if valid is None else valid[None], targets,
                                        sizes)

    def _diagonal_costs(self, logits: Tensor, boxes: Tensor, valid: Tensor | None,
                        targets: Sequence[Mapping[str, Tensor]], sizes: Sequence[int]) -> Tensor:
        """The batched costs of L prediction sets: logits [L, B, Q, K], boxes [L, B, Q, 4], valid [L, B, Q] or None
        -> every set's and image's cost [Q, G_b] flattened, set by set (``costs``' order), computed as one
        [L, B, Q, sum G_b] matrix whose L x B diagonal blocks are gathered with one index uploaded from the host."""
        labels = torch.cat([t["labels"] for t in targets])
        cost = self.cost_matrix(logits, boxes, labels, torch.cat([t["boxes"] for t in targets]).float())
        if valid is not None:
            cost = cost.masked_fill(~valid[..., None], 1e8)
        sets, batch, q, total = cost.shape
        offsets = np.cumsum(sizes) - sizes
        blocks = [((s * batch + b) * q * total + np.arange(q)[:, None] * total + o + np.arange(g)[None]).ravel()
                  for s in range(sets) for b, (o, g) in enumerate(zip(offsets, sizes)) if g]
        return cost.flatten()[_upload([np.concatenate(blocks)], cost.device)[0]]

    def layer_costs(self, layers: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                    batched: bool | None = None) -> Tensor:
        """``costs`` of several prediction sets against the same targets (a group's decoder layers), concatenated
        set by set. ``batched`` (default: on a GPU): one cost computation for all sets when their shapes agree (a
        fixed number of kernels whatever the number of layers and images; every entry's arithmetic is the single
        call's); otherwise, and on the CPU, the single calls one after the other (there bitwise the previous
        results, see ``costs``)."""
        first = layers[0]
        if batched is None:
            batched = first["pred_logits"].device.type != "cpu"
        same = len({(o["pred_logits"].shape, o["pred_boxes"].shape, "valid" in o) for o in layers}) == 1
        if len(layers) == 1 or not batched or not same:
            flats = [self.costs(o, targets, batched) for o in layers]
            return flats[0] if len(flats) == 1 else torch.cat(flats)
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return first["pred_logits"].new_empty(0, dtype=torch.float)
        with torch.no_grad():
            logits = torch.nan_to_num(torch.stack([o["pred_logits"] for o in layers]).float())
            boxes = torch.nan_to_num(torch.stack([o["pred_boxes"] for o in layers]).float(), nan=0.5)
            valid = torch.stack([o["valid"] for o in layers]) if "valid" in first else None
            return self._diagonal_costs(logits, boxes, valid, targets, sizes)

    @staticmethod
    def _solve(flat: Tensor, q: int, targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        """Per image (query indices, target indices) from one prediction set's host costs (``costs``' layout)."""
        flat = torch.nan_to_num(flat, nan=1e8, posinf=1e8, neginf=-1e8).numpy()  # host: numpy slices, no dispatch
        indices, offset = [], 0
        for t in targets:
            g = len(t["labels"])
            if g == 0:
                indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            rows, cols = linear_sum_assignment(flat[offset:offset + q * g].reshape(q, g))
            offset += q * g
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def stages(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Stages:
        """Staged ``forward`` (module docstring): the costs on the device, one copy, scipy on the host."""
        (flat,) = yield [self.costs(outputs, targets)]
        return self._solve(flat, outputs["pred_logits"].shape[1], targets)

    def layer_stages(self, layers: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
                     ) -> Generator[list[Tensor], list[Tensor], list[Indices]]:
        """``stages`` of several prediction sets against the same targets (a group's layers) at once: their costs
        from ``layer_costs`` (on a GPU one computation for all of them), one copy, scipy per set and image.
        Returns the indices of every set, in order; each equals its own ``stages``' result."""
        (flat,) = yield [self.layer_costs(layers, targets)]
        sizes = [len(t["labels"]) for t in targets]
        out, start = [], 0
        for o in layers:
            q = o["pred_logits"].shape[1]
            out.append(self._solve(flat[start:start + q * sum(sizes)], q, targets))
            start += q * sum(sizes)
        return out


def build_matcher(args) -> HungarianMatcher:
    cls_loss = "softmax" if getattr(args, "cls_loss", "focal") == "softmax" else "focal"  # qfl matches as focal
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou, focal_alpha=0.25, cls_loss=cls_loss)
