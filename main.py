"""Train and evaluate DETR-family detectors (Deformable-DETR command lines work as written).

    python main.py --coco_path data/coco --output_dir exps/r50 [--with_box_refine --two_stage] ...
    python main.py ... --eval --resume exps/r50/checkpoint.pth

Mistakes in the input stop the run before any work with one line on stderr and no traceback: exit
status 2 for flags (FlagError), 1 for data and files (annotation files, checkpoints, a full disk).
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import logging
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

import datasets
from datasets.coco import AnnotationError
from datasets.seeded import SeededDataset
from engine import NonFiniteLossError, evaluate, train_one_epoch
from flags import FlagError, describe_model_defaults, finalize_args, get_args_parser, validate_args
from models import build_model
from models.addons import evaluation_model
from util.checkpoint import (
    TRAINING_STATE,
    CheckpointError,
    DiskFullError,
    find_start_checkpoint,
    flag_differences,
    load_fitting_weights,
    optimizer_mismatch,
    read_log,  # noqa: F401  (main.read_log: scripts and tests)
    reconcile_log,
    save_atomic,
    save_checkpoints,
    set_rng_state,
)
from util.ema import load_ema_weights, start_ema
from util.instability import InstabilityProbe
from util.logger import check_tensorboard, describe_run, open_tensorboard, save_args, setup_logging, write_epoch
from util.lr_schedule import build_lr_scheduler, load_schedule_state, restart_schedule
from util.misc import collate_fn, get_rank, get_world_size, init_distributed_mode, is_main_process
from util.optim import build_optimizer, use_fused
from util.validation import validate_run

logger = logging.getLogger("detr")

# Parser groups whose flags do not shape the model (the rest are compared with a checkpoint's on resume).
RUN_GROUPS = ("options", "positional arguments", "optimisation", "data", "input sizes")
# Errors in the user's data and files: cli() exits with their message and status 1.
INPUT_ERRORS = (AnnotationError, CheckpointError, DiskFullError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError, PermissionError)


def match_name_keywords(name: str, keywords: list[str]) -> bool:
    return any(k in name for k in keywords)


def param_groups(model: torch.nn.Module, args: Any) -> list[dict]:
    """The official three groups: default lr, backbone lr, linear-projection lr (lr * mult).

    A model with ``no_weight_decay_names()`` (YOLOS) gets a fourth group: those parameters at lr without weight
    decay, as its official optimizer.
    """
    no_decay = model.no_weight_decay_names() if hasattr(model, "no_weight_decay_names") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in no_decay]
    backbone = [p for n, p in named if match_name_keywords(n, args.lr_backbone_names)]
    proj = [p for n, p in named if match_name_keywords(n, args.lr_linear_proj_names)]
    rest = [p for n, p in named if not match_name_keywords(n, args.lr_backbone_names)
            and not match_name_keywords(n, args.lr_linear_proj_names)]
    groups = [{"params": rest, "lr": args.lr}, {"params": backbone, "lr": args.lr_backbone},
              {"params": proj, "lr": args.lr * args.lr_linear_proj_mult}]
    if no_decay:
        groups.append({"params": [p for n, p in model.named_parameters() if p.requires_grad and n in no_decay],
                       "lr": args.lr, "weight_decay": 0.0})
    return groups


def build_loaders(args: Any, dataset_train: Any, dataset_val: Any) -> tuple[DataLoader | None, DataLoader, Any]:
    """Loaders whose sample order and augmentation depend only on (seed, epoch): exact resume.

    The training order comes from a seeded DistributedSampler (also in one process, with one replica),
    each sample's augmentation from (seed, epoch, index) (datasets/seeded.py).
    """
    world, rank = get_world_size(), get_rank()
    common = {"collate_fn": collate_fn, "num_workers": args.num_workers, "pin_memory": args.device != "cpu"}
    # Own generators: creating a loader iterator must not consume the global RNG (dropout), or an
    # evaluation between two epochs would change the next epoch of an uninterrupted run.
    gen_train = torch.Generator().manual_seed(args.seed * 1000 + rank)
    gen_val = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)
    loader_train = sampler_train = None
    if dataset_train is not None:
        if len(dataset_train) < args.batch_size * world:
            raise FlagError(f"--batch_size {args.batch_size} x {world} process(es) is more than the "
                            f"{len(dataset_train)} training images: lower --batch_size")
        sampler_train = DistributedSampler(SeededDataset(dataset_train, args.seed), num_replicas=world, rank=rank,
                                           shuffle=True, seed=args.seed)
        batch_sampler = BatchSampler(sampler_train, args.batch_size, drop_last=True)
        loader_train = DataLoader(sampler_train.dataset, batch_sampler=batch_sampler, generator=gen_train, **common)
    if args.distributed:
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_val = SequentialSampler(dataset_val)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False, generator=gen_val,
                            **common)
    return loader_train, loader_val, sampler_train


def model_flag_names() -> list[str]:
    """Flags that shape the model, the matcher or the losses (every parser group but the run and data ones)."""
    return [a.dest for g in get_args_parser()._action_groups if not (g.title or "").startswith(RUN_GROUPS)
            for a in g._group_actions]


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, args: Any,
                       saved_args: dict[str, Any]) -> None:
    """Load a checkpoint's weights; a checkpoint of another model is refused unless --resume_weights_only.

    Official names this project keeps elsewhere are mapped by the model's own load hooks
    (models/addons/builder.py), so official checkpoints load without missing keys.

    Raises:
        FlagError: keys are missing, unexpected or of another shape (named, with the model flags that differ from
            the checkpoint's) and --resume_weights_only is not given; the run stops before it uses the model.
    """
    missing, unexpected, shapes = load_fitting_weights(model, state)
    differ = flag_differences(saved_args, vars(args), model_flag_names())
    if not (missing or unexpected or shapes):
        if differ:
            logger.info("resume: model flags that differ from %s (its weights all fit): %s", source, "; ".join(differ))
        return
    found = "; ".join(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in (
        ("key(s) missing from it", missing), ("unexpected key(s)", unexpected), ("key(s) of another shape", shapes))
        if keys)
    flags = "; ".join(differ[:8]) + (f"; and {len(differ) - 8} more" if len(differ) > 8 else "") if differ else "none"
    if not args.resume_weights_only:
        raise FlagError(f"checkpoint {source} is of another model: {found}. Model flags that differ from the "
                        f"checkpoint's: {flags}. Give the checkpoint's flags to resume it, or --resume_weights_only to "
                        "load the weights that fit and start a new optimizer and schedule")
    logger.warning("--resume_weights_only: %s is of another model: %s; model flags that differ: %s. The rest keeps "
                   "its initialisation", source, found, flags)


def resume(args: Any, ckpt: dict | None, source: str, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any,
           scaler: Any, addons: list) -> dict | None:
    """Load the start checkpoint: weights, and (when training) the optimiser, schedule and RNG states.

    Returns the checkpoint when training state was restored (None for weights only or nothing).

    Raises:
        FlagError: a checkpoint of another model or optimizer (see :func:`load_model_weights`); the run stops
            before the model is used.
    """
    if ckpt is None:
        return None
    logger.info("resuming from %s (epoch %s)", source, ckpt.get("epoch"))
    saved = ckpt.get("args") or {}
    weights_only = args.eval or args.resume_weights_only or not all(k in ckpt for k in TRAINING_STATE)
    load_model_weights(model, ckpt["model"], source, args, saved)  # raises (the run stops) for another model
    if not weights_only:
        problem = optimizer_mismatch(ckpt["optimizer"], optimizer)
        if problem is None and "sgd" in saved and saved["sgd"] != args.sgd:
            problem = f"it was trained with {'SGD' if saved['sgd'] else 'AdamW'} (--sgd {saved['sgd']})"
        if problem is not None:
            differ = flag_differences(saved, vars(args), model_flag_names() + ["lr_backbone", "lr_backbone_names",
                                                                               "lr_linear_proj_names", "sgd"])
            raise FlagError(f"checkpoint {source} cannot continue this run: {problem}; flags that differ from the "
                            f"checkpoint's: {'; '.join(differ) or 'none'}. Give the checkpoint's flags, or "
                            "--resume_weights_only to load its weights and start a new optimizer and schedule")
    if weights_only:
        if args.resume_weights_only and not args.eval:
            logger.info("--resume_weights_only: weights of %s loaded; optimizer, schedule and epochs start anew",
                        source)
        return None
    saved_sched = saved.get("sched", "step") if saved else args.sched  # checkpoints before --sched: StepLR
    if saved_sched != args.sched:
        raise FlagError(f"checkpoint {source} was trained with --sched {saved_sched}, this run has --sched "
                        f"{args.sched}: give --sched {saved_sched}, or --resume_weights_only to start a new schedule")
    optimizer.load_state_dict(ckpt["optimizer"])
    load_schedule_state(lr_scheduler, optimizer, ckpt["lr_scheduler"], ckpt["epoch"])
    keys = ("lr", "lr_backbone", "lr_drop", "epochs", "min_lr", "warmup_lr", "warmup_epochs")
    changed = [k for k in keys if k in saved and saved[k] != getattr(args, k)]
    # Official (Deformable-DETR --resume): the command line's lr and lr_drop override the checkpoint's;
    # --schedule_from_checkpoint keeps the checkpoint's (this project's opt-in).
    if not args.schedule_from_checkpoint and (changed or args.schedule_from_args):
        restart_schedule(args, optimizer, lr_scheduler, [g["lr"] for g in param_groups(model, args)])
        logger.info("resume: schedule taken from the command line (as the official --resume): lr %g, lr_drop %d "
                    "(--schedule_from_checkpoint keeps the checkpoint's)", args.lr, args.lr_drop)
    elif changed:
        logger.warning("resume: the checkpoint's schedule is used (--schedule_from_checkpoint); these flags differ "
                       "from it and are ignored for the schedule: %s",
                       ", ".join(f"{k}={getattr(args, k)} (checkpoint {saved[k]})" for k in changed))
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    for addon in addons:
        if f"addons/{addon.name}" in ckpt:
            addon.load_state_dict(ckpt[f"addons/{addon.name}"])
    rng = ckpt.get("rng")
    if isinstance(rng, list) and len(rng) > get_rank():
        set_rng_state(rng[get_rank()])
    args.start_epoch = ckpt["epoch"] + 1
    return ckpt


def evaluate_models(run_eval: Callable[[torch.nn.Module], tuple[dict, Any]], models: dict[str, Any],
                    files: dict[str, Path | None]) -> dict[str, Any]:
    """Evaluate each model of ``models`` (prefix -> model or None) with ``run_eval``.

    Returns:
        every statistic as ``{prefix}_{name}`` (``test_*`` for the model, ``test_ema_*`` for the EMA); rank 0 also
        saves each evaluator's COCOeval arrays to ``files[prefix]`` when given.
    """
    stats: dict[str, Any] = {}
    for prefix, net in models.items():
        if net is None:
            continue
        test_stats, coco_evaluator = run_eval(net)
        stats.update({f"{prefix}_{k}": v for k, v in test_stats.items()})
        path = files.get(prefix)
        if path is not None and is_main_process():
            path.parent.mkdir(exist_ok=True)
            save_atomic(coco_evaluator.coco_eval["bbox"].eval, path)
    return stats


def check_device(args: Any) -> None:
    """--device cuda falls back to cpu without CUDA (documented); a device that is absent is refused."""
    kind = torch.device(args.device)
    if kind.type == "cuda" and not torch.cuda.is_available():
        logger.warning("--device %s requested but CUDA is not available; using cpu (pass --device cpu to say so, "
                       "or install a CUDA build of torch to use the GPU)", args.device)
        args.device = "cpu"
        if args.msda_impl == "cuda":
            raise FlagError("--msda_impl cuda needs CUDA, which is not available here: use --msda_impl auto")
    elif kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise FlagError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif kind.type not in ("cpu", "cuda"):
        backend = getattr(torch, kind.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise FlagError(f"--device {args.device}: no {kind.type} device is available here; use cpu or cuda")


def check_num_classes(args: Any, given: bool, splits: list[Any]) -> None:
    """Every label of the data must be below --num_classes (else the matcher fails with an IndexError).

    Raises:
        FlagError: naming the annotation file, its largest label and --num_classes.
    """
    for dataset in splits:
        while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        table = getattr(dataset, "category_ids", None)  # --contiguous_classes: labels 0..C-1
        ids = [a["category_id"] for a in dataset.coco.anns.values() if not a.get("iscrowd", 0)]
        if not ids:
            continue
        top = len(table) - 1 if table is not None else max(ids)
        if top < args.num_classes:
            continue
        kind = "contiguous class indexes" if table is not None else "raw category ids"
        fix = ("pass --num_classes {n} or more, or leave it out (max category id + 1 of the training file)" if given
               else "the training file's max category id + 1 gives {c}: pass --num_classes {n} or more")
        raise FlagError(f"--num_classes {args.num_classes} is too small for {dataset.ann_file}: its labels go up to "
                        f"{top} (labels are the {kind}), so at least {top + 1} class logits are needed: "
                        + fix.format(n=top + 1, c=args.num_classes))


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run training (or --eval). Returns the last epoch's log entry.

    Raises:
        FlagError: an impossible flag value or combination (``validate_args``), before anything is built; --eval
            with nothing to evaluate, a fresh start over an earlier run, --num_classes below the data's labels, a
            checkpoint of another model.
        AnnotationError, CheckpointError, FileNotFoundError: unusable data or files (named in the message).
        DiskFullError: no space to save a checkpoint (the previous one is kept).
    """
    validate_args(args)
    validate_run(args)
    check_tensorboard(args.tensorboard, args.output_dir)
    init_distributed_mode(args)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup_logging(args.output_dir, get_rank())
    check_device(args)
    device = torch.device(args.device)
    start_ckpt, start_source = find_start_checkpoint(args)
    seed = args.seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    dataset_val = datasets.build_dataset("val", args)
    dataset_train = None if args.eval else datasets.build_dataset("train", args)
    given = args.num_classes is not None
    if not given:
        args.num_classes = datasets.num_classes_for(args, dataset_train)
    check_num_classes(args, given, [d for d in (dataset_train, dataset_val) if d is not None])
    if is_main_process():  # every flag: output_dir/args.json (the log gets a summary once the model is built)
        save_args(args, args.output_dir)
    logger.info("%s", describe_model_defaults(args))

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_params)
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_train = None if dataset_train is None else len(dataset_train)
    for line in describe_run(args, [a.name for a in criterion.addons], num_train, len(dataset_val)):
        logger.info("%s", line)
    logger.info("number of params: %d", n_parameters)

    loader_train, loader_val, sampler_train = build_loaders(args, dataset_train, dataset_val)
    groups = param_groups(model_without_ddp, args)
    optimizer = build_optimizer(groups, args)
    lr_scheduler = build_lr_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == "fp16" else None
    addons = criterion.addons
    base_ds = datasets.get_coco_api_from_dataset(dataset_val)
    ckpt = resume(args, start_ckpt, start_source, model_without_ddp, optimizer, lr_scheduler, scaler, addons)
    use_fused(optimizer, args.fused_optimizer)  # a resumed optimizer state brings its checkpoint's implementation
    # The EMA follows the model and its add-ons as resumed (never wrapped by DDP); the probe draws no RNG.
    ema = start_ema(args, model_without_ddp, start_ckpt, start_source, restored=ckpt is not None)
    probe = InstabilityProbe.from_args(args, dataset_train, criterion.matcher, device)
    if probe is not None and ckpt is not None and "instability" in ckpt:
        probe.load_state_dict(ckpt["instability"])
    if args.eval and args.eval_ema:
        load_ema_weights(model_without_ddp, start_ckpt, start_source)
    del start_ckpt
    run_eval = partial(evaluate, criterion=criterion, postprocessors=postprocessors, data_loader=loader_val,
                       base_ds=base_ds, device=device, amp=args.amp, amp_dtype=args.amp_dtype,
                       print_freq=args.print_freq)
    ema_model = None if ema is None else ema.module
    if ckpt is not None:
        reconcile_log(args, ckpt, lambda: evaluate_models(run_eval, {"test": evaluation_model(model, addons),
                                                                     "test_ema": ema_model}, {}))
        del ckpt
    if args.eval:  # --eval_ema: the model holds the EMA weights
        prefix = "test_ema" if args.eval_ema else "test"
        return evaluate_models(run_eval, {prefix: model if args.eval_ema else evaluation_model(model, addons)},
                               {prefix: Path(args.output_dir) / "eval.pth" if args.output_dir else None})

    if args.start_epoch >= args.epochs:
        logger.warning("nothing to train: the run starts at epoch %d and --epochs is %d (a finished run: raise "
                       "--epochs to train longer)", args.start_epoch, args.epochs)
    logger.info("Start training")
    tb_writer = open_tensorboard(args.output_dir) if args.tensorboard and is_main_process() else None
    start_time = time.time()
    log_stats: dict[str, Any] = {}
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch)
        sampler_train.dataset.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm, addons=addons,
            scaler=scaler, amp=args.amp, amp_dtype=args.amp_dtype, print_freq=args.print_freq,
            max_iters=args.max_iters_per_epoch, max_nonfinite_steps=args.max_nonfinite_steps,
            global_step=epoch * len(loader_train), tb_writer=tb_writer, ema=ema)
        lr_scheduler.step()
        # Before the checkpoint: it keeps this epoch's assignments (the next epoch compares with them).
        instability = {} if probe is None else probe.step({"instability": model_without_ddp,
                                                           "instability_ema": ema_model})
        extra = {**({} if ema is None else ema.state_dict()),
                 **({} if probe is None else {"instability": probe.state_dict()})}
        save_checkpoints(args, epoch, model_without_ddp, optimizer, lr_scheduler, scaler, addons, train_stats,
                         extra)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters, **instability}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            out = Path(args.output_dir) / "eval" if args.output_dir else None
            log_stats.update(evaluate_models(run_eval, {"test": evaluation_model(model, addons), "test_ema": ema_model},
                                             {} if out is None else {
                "test": out / "latest.pth", "test_ema": out / "latest_ema.pth"}))
        if args.output_dir and is_main_process():
            with (Path(args.output_dir) / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
        if tb_writer is not None:
            write_epoch(tb_writer, log_stats, epoch)
    if tb_writer is not None:
        tb_writer.close()
    total_time = time.time() - start_time
    logger.info("Training time %s", datetime.timedelta(seconds=int(total_time)))
    return log_stats


def cli() -> None:
    """Command-line entry: a mistake in the input exits with a one-line message and no traceback, status 2 for
    flags (as argparse's own errors) and 1 for data and files; a non-finite-loss stop exits with status 1."""
    args = finalize_args(get_args_parser().parse_args())
    try:
        main(args)
    except FlagError as e:
        _fail(str(e), 2)
    except NonFiniteLossError as e:
        logger.error("training stopped: %s", e)
        raise SystemExit(1) from None
    except INPUT_ERRORS as e:
        _fail(str(e), 1)
    except OSError as e:  # the machine's files: a full disk, a read-only file system, ...
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _fail(f"no space left on the device while writing {e.filename or 'a file'}; free some space and continue "
                  "with --auto_resume", 1)
        if not e.filename:
            raise
        _fail(f"{e.filename}: {e.strerror or e}", 1)


def _fail(message: str, status: int) -> None:
    """One line on stderr (and in train.log when it is open), then exit with ``status``."""
    message = " ".join(message.split())
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (message,), None))
    raise SystemExit(status) from None


if __name__ == "__main__":
    cli()
