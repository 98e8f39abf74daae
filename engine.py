"""train_one_epoch() and evaluate(): one pass over the data, with add-on hooks around each step."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from datasets import label_category_ids
from datasets.coco_eval import CocoEvaluator, labels_to_category_ids
from models.addons import AddOn, StepContext, overrides, query_providers
from models.matcher import to_host
from util.ema import ModelEMA
from util.logger import MetricLogger, SmoothedValue, write_scalars
from util.misc import reduce_dict

logger = logging.getLogger("detr")


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


def autocast(device: torch.device, amp: bool, amp_dtype: str) -> contextlib.AbstractContextManager:
    """Autocast context for --amp (bf16 or fp16); a no-op otherwise."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp_dtype == "bf16" else torch.float16)


def to_device(samples: Any, targets: Sequence[dict], device: torch.device) -> tuple[Any, list[dict]]:
    non_blocking = device.type == "cuda"
    samples = samples.to(device, non_blocking=non_blocking)
    targets = [{k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return samples, targets


def _query_providers(addons: Sequence[AddOn], ctx: StepContext) -> list:
    """Kept for scripts and tests that drive the query groups by hand (models/addons/base.py)."""
    return query_providers(addons, ctx)


def _log_grad_norm(metric_logger: MetricLogger, tb_writer: Any, step: int, value: float) -> None:
    metric_logger.update(grad_norm=value)
    if tb_writer is not None:
        write_scalars(tb_writer, "iter", {"grad_norm": value}, step)


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, max_norm: float = 0.0, *, addons: Sequence[AddOn] = (),
                    scaler: torch.amp.GradScaler | None = None, amp: bool = False, amp_dtype: str = "bf16",
                    print_freq: int = 10, max_iters: int = 0, max_nonfinite_steps: int = 10,
                    global_step: int = 0, tb_writer: Any = None, ema: ModelEMA | None = None) -> dict[str, float]:
    """Train for one epoch.

    A step whose (all-reduced) loss is not finite is skipped and logged with the offending terms;
    ``max_nonfinite_steps`` consecutive ones raise NonFiniteLossError (the last checkpoint stays intact).
    Every ``print_freq`` iterations one short progress line is logged (util/logger.py ``MetricLogger.summary``);
    ``tb_writer`` (a TensorBoard SummaryWriter, rank 0 only) gets ``iter/loss``, ``iter/lr``, ``iter/grad_norm``
    and every weighted term as ``iter_terms/<key>`` at each step.

    With ``ema`` (util/ema.py), every step's ``StepContext.ema`` is the EMA model and each optimizer step is
    followed by ``ema.update(model)``, then the add-ons' ``after_step``; a skipped step (non-finite loss, or
    an fp16 step the GradScaler skipped for inf/NaN gradients) leaves the EMA as it is.

    Returns:
        Global averages of every logged meter (``loss``, weighted ``loss_*``, ``*_unscaled``, ``lr``,
        ``grad_norm``, ``class_error``, ``nonfinite_steps``).
    """
    model.train()
    criterion.train()
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    metric_logger.add_meter("grad_norm", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    total = len(data_loader) if not max_iters else min(max_iters, len(data_loader))
    weight_dict = criterion.weight_dict
    nonfinite_in_a_row, nonfinite_total = 0, 0
    # fp16 with EMA: a step the GradScaler skipped lowers its scale (one read of the scale per step).
    scale = scaler.get_scale() if scaler is not None and ema is not None else 0.0
    # A step's grad norm is read with the next step's losses (one sync per step), or at once on a step that
    # prints a progress line; (step, norm) not yet read:
    unread_norm: tuple[int, torch.Tensor] | None = None
    for i, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]",
                                                                   total)):
        if max_iters and i >= max_iters:
            break
        samples, targets = to_device(samples, targets, device)
        ctx = StepContext(images=samples, targets=targets, epoch=epoch, step=global_step + i,
                          ema=None if ema is None else ema.module)
        with autocast(device, amp, amp_dtype):
            # The official calling convention: in training mode the model runs the query groups of the
            # add-ons it was built with (denoising needs the targets), and the criterion their losses.
            for addon in addons:
                if overrides(addon, "before_forward"):
                    addon.before_forward(model, ctx)
            outputs = model(samples, targets, ctx=ctx)
        loss_dict = criterion(outputs, targets, ctx=ctx)  # losses are computed in fp32
        losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

        reduced = reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        names = sorted(reduced)
        norm = [] if unread_norm is None else [unread_norm[1].detach().float().reshape(()).to(device,
                                                                                             non_blocking=True)]
        values = torch.stack([sum(scaled.values())] + [reduced[k] for k in names] + norm).tolist()  # one sync
        if unread_norm is not None:
            _log_grad_norm(metric_logger, tb_writer, unread_norm[0], values.pop())
            unread_norm = None
        loss_value, logged = values[0], dict(zip(names, values[1:]))

        if not math.isfinite(loss_value):
            nonfinite_in_a_row += 1
            nonfinite_total += 1
            bad = sorted(k for k, v in logged.items() if not math.isfinite(v))
            logger.warning("epoch %d iter %d: non-finite loss %s (terms: %s); step skipped (%d in a row)",
                           epoch, i, loss_value, ", ".join(bad) or "the weighted sum", nonfinite_in_a_row)
            optimizer.zero_grad(set_to_none=True)
            if nonfinite_in_a_row >= max_nonfinite_steps:
                raise NonFiniteLossError(f"{nonfinite_in_a_row} consecutive non-finite losses at epoch {epoch} "
                                         f"iter {i} (terms: {', '.join(bad)}); stopping, the last checkpoint is "
                                         f"intact")
            continue
        nonfinite_in_a_row = 0

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.unscale_(optimizer)
        else:
            losses.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        stepped = True
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                new_scale = scaler.get_scale()
                stepped, scale = new_scale >= scale, new_scale
        else:
            optimizer.step()
        if ema is not None and stepped:
            ema.update(model)
        for addon in addons:
            addon.after_step(model, ctx)

        weighted = {k: logged[k] * weight_dict[k] for k in logged if k in weight_dict}
        metric_logger.update(loss=loss_value, **weighted, **{f"{k}_unscaled": v for k, v in logged.items()})
        if "class_error" in logged:
            metric_logger.update(class_error=logged["class_error"])
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        if i % print_freq == 0 or i == total - 1:  # this step prints its grad norm (util/logger.py log_every)
            _log_grad_norm(metric_logger, tb_writer, global_step + i, float(grad_norm))
        else:
            unread_norm = (global_step + i, grad_norm)
        if tb_writer is not None:
            step = global_step + i
            write_scalars(tb_writer, "iter", {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}, step)
            write_scalars(tb_writer, "iter_terms", weighted, step)
    if unread_norm is not None:
        _log_grad_norm(metric_logger, tb_writer, unread_norm[0], float(unread_norm[1]))
    metric_logger.synchronize_between_processes()
    logger.info("Averaged stats: %s", metric_logger.summary(averaged=True))
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["nonfinite_steps"] = nonfinite_total
    if metric_logger.iter_time is not None:  # seconds per iteration, and the part spent waiting for data
        stats["iter_time"] = metric_logger.iter_time.global_avg
        stats["data_time"] = metric_logger.data_time.global_avg
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: dict, data_loader: Iterable, base_ds: Any,
             device: torch.device, *, amp: bool = False, amp_dtype: str = "bf16", print_freq: int = 10,
             compute_losses: bool = True) -> tuple[dict[str, Any], CocoEvaluator]:
    """COCO evaluation (never with add-on queries). Returns (stats incl. ``coco_eval_bbox``, evaluator).

    With a ``--contiguous_classes`` data set (labels 0..C-1), predicted labels are mapped back to the
    annotation file's category ids before they reach the evaluator.
    """
    model.eval()
    criterion.eval()
    metric_logger = MetricLogger()
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",))
    category_ids = label_category_ids(getattr(data_loader, "dataset", None))
    table = None if category_ids is None else torch.tensor(category_ids, dtype=torch.int64)
    weight_dict = criterion.weight_dict
    fields = ("scores", "labels", "boxes")
    for samples, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        samples, targets = to_device(samples, targets, device)
        with autocast(device, amp, amp_dtype):
            outputs = model(samples)
        values, weighted, reduced = [], [], {}
        if compute_losses:
            reduced = reduce_dict(criterion(outputs, targets))
            weighted = [k for k in reduced if k in weight_dict]
            total = sum(reduced[k] * weight_dict[k] for k in weighted)
            total = total if torch.is_tensor(total) else torch.zeros((), device=device)
            values = [torch.stack([total] + [reduced[k] * weight_dict[k] for k in weighted] + list(reduced.values()))]
        orig_target_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_target_sizes)
        # the batch's loss values, image ids and detections in ONE device-to-host copy (was a float() per loss
        # term, an item() per image and three copies per image)
        ids = torch.stack([t["image_id"].reshape(()) for t in targets])
        host = to_host(values + [ids] + [r[k] for r in results for k in fields])
        if compute_losses:
            floats = host.pop(0).numpy().tolist()  # numpy: host data (a tensor's tolist reads like a sync)
            metric_logger.update(loss=floats[0], **dict(zip(weighted, floats[1:1 + len(weighted)])),
                                 **{f"{k}_unscaled": v for k, v in zip(reduced, floats[1 + len(weighted):])})
        image_ids, host = host[0].numpy().tolist(), host[1:]
        results = [{k: host[3 * i + j].numpy() for j, k in enumerate(fields)} for i in range(len(results))]
        if table is not None:
            results = [labels_to_category_ids(r, table) for r in results]
        coco_evaluator.update(dict(zip(image_ids, results)))
    metric_logger.synchronize_between_processes()
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    stats: dict[str, Any] = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    return stats, coco_evaluator
