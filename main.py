"""Train and evaluate DETR-family detectors (Deformable-DETR command lines work as written).

    python main.py --coco_path data/coco --output_dir exps/r50 [--with_box_refine --two_stage] ...
    python main.py ... --eval --resume exps/r50/checkpoint.pth
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

import datasets
from datasets.seeded import SeededDataset
from engine import NonFiniteLossError, evaluate, train_one_epoch
from flags import FlagError, describe_model_defaults, finalize_args, get_args_parser, validate_args
from models import build_model
from models.addons import evaluation_model
from util.checkpoint import find_resume_checkpoint, load_checkpoint, rng_state, save_atomic, set_rng_state
from util.logger import check_tensorboard, describe_run, open_tensorboard, save_args, setup_logging, write_epoch
from util.misc import all_gather_object, collate_fn, get_rank, get_world_size, init_distributed_mode, is_main_process

logger = logging.getLogger("detr")


def match_name_keywords(name: str, keywords: list[str]) -> bool:
    return any(k in name for k in keywords)


def param_groups(model: torch.nn.Module, args: Any) -> list[dict]:
    """The official three groups: default lr, backbone lr, linear-projection lr (lr * mult)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if match_name_keywords(n, args.lr_backbone_names)]
    proj = [p for n, p in named if match_name_keywords(n, args.lr_linear_proj_names)]
    rest = [p for n, p in named if not match_name_keywords(n, args.lr_backbone_names)
            and not match_name_keywords(n, args.lr_linear_proj_names)]
    return [{"params": rest, "lr": args.lr}, {"params": backbone, "lr": args.lr_backbone},
            {"params": proj, "lr": args.lr * args.lr_linear_proj_mult}]


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
            raise ValueError(f"the training set has {len(dataset_train)} images, fewer than --batch_size "
                             f"{args.batch_size} x {world} processes")
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


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict non-strictly (as official --resume), reporting what did not match.

    Official names this project keeps elsewhere are mapped by the model's own load hooks
    (models/addon_builder.py), so official checkpoints also load with a plain strict load_state_dict.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(("total_params", "total_ops"))]
    if missing:
        logger.warning("%s: missing keys: %s", source, missing)
    if unexpected:
        logger.warning("%s: unexpected keys: %s", source, unexpected)


def resume(args: Any, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, scaler: Any,
           addons: list) -> dict | None:
    """--resume / --auto_resume: weights, and (when training) the optimiser, schedule and RNG states.

    Returns the checkpoint when training state was restored (None for weights only or nothing).
    """
    ckpt, source = None, args.resume
    if args.auto_resume and args.output_dir:
        found = find_resume_checkpoint(args.output_dir)
        if found is not None:
            source, ckpt = str(found[0]), found[1]
    if ckpt is None and args.resume:
        ckpt = load_checkpoint(args.resume)
    if ckpt is None:
        return None
    logger.info("resuming from %s (epoch %s)", source, ckpt.get("epoch"))
    load_model_weights(model, ckpt["model"], source)
    if args.eval or not all(k in ckpt for k in ("optimizer", "lr_scheduler", "epoch")):
        return None
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    saved = ckpt.get("args") or {}
    if args.schedule_from_args:
        base_lrs = [g["lr"] for g in param_groups(model, args)]
        lr_scheduler.step_size = args.lr_drop
        lr_scheduler.base_lrs = base_lrs
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * lr_scheduler.gamma ** (lr_scheduler.last_epoch // args.lr_drop)
        logger.info("resume: schedule taken from the command line (--schedule_from_args): lr %g, lr_drop %d",
                    args.lr, args.lr_drop)
    else:
        changed = [k for k in ("lr", "lr_backbone", "lr_drop", "epochs") if k in saved and saved[k] != getattr(args, k)]
        if changed:
            logger.warning("resume: the checkpoint's schedule is used; these flags differ from it and are ignored "
                           "for the schedule: %s (pass --schedule_from_args to use the command line)",
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


def save_checkpoints(args: Any, epoch: int, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any,
                     scaler: Any, addons: list, train_stats: dict) -> None:
    """checkpoint.pth every epoch; checkpoint{epoch:04}.pth before each lr drop, every --save_every, and last."""
    rngs = all_gather_object(rng_state())  # every rank's RNG, for exact resume
    if not is_main_process() or not args.output_dir:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": vars(args), "rng": rngs,
             "train_stats": train_stats}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    for addon in addons:
        state[f"addons/{addon.name}"] = addon.state_dict()
    out = Path(args.output_dir)
    save_atomic(state, out / "checkpoint.pth")
    if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
        save_atomic(state, out / f"checkpoint{epoch:04}.pth")


def read_log(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_log(output_dir: str, entries: list[dict]) -> None:
    """Rewrite log.txt atomically (used when resume has to drop or add an epoch's line)."""
    path = Path(output_dir) / "log.txt"
    tmp = path.with_name("log.txt.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
    os.replace(tmp, path)


def reconcile_log(args: Any, ckpt: dict, evaluate_fn: Any) -> None:
    """Make log.txt end at the resumed checkpoint's epoch.

    Lines of later epochs (a newer checkpoint was corrupt) are dropped; if the run died between writing
    the checkpoint and its log line, the line is rebuilt from the checkpoint's train stats and an
    evaluation of the resumed weights (on every rank: evaluation is collective).
    """
    if not args.output_dir:
        return
    epoch = ckpt["epoch"]
    kept, missing = [], False
    if is_main_process():
        entries = read_log(args.output_dir)
        kept = [e for e in entries if e.get("epoch", -1) <= epoch]
        missing = "train_stats" in ckpt and not (kept and kept[-1].get("epoch") == epoch)
        if len(kept) != len(entries):
            logger.warning("resume: dropping log.txt lines after epoch %d", epoch)
            write_log(args.output_dir, kept)
    if not all_gather_object(missing)[0]:
        return
    logger.warning("resume: log.txt has no line for epoch %d; evaluating the checkpoint to write it", epoch)
    test_stats = evaluate_fn()
    if is_main_process():
        entry = {**{f"train_{k}": v for k, v in ckpt["train_stats"].items()}, "epoch": epoch}
        entry.update({f"test_{k}": v for k, v in test_stats.items()})
        write_log(args.output_dir, kept + [entry])


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run training (or --eval). Returns the last epoch's log entry.

    Raises:
        FlagError: an impossible flag value or combination (``validate_args``), before anything is built.
    """
    validate_args(args)
    check_tensorboard(args.tensorboard, args.output_dir)
    init_distributed_mode(args)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup_logging(args.output_dir, get_rank())
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("--device %s requested but CUDA is not available; using cpu (pass --device cpu to say so, "
                       "or install a CUDA build of torch to use the GPU)", args.device)
        args.device = "cpu"
    device = torch.device(args.device)
    seed = args.seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    dataset_val = datasets.build_dataset("val", args)
    dataset_train = None if args.eval else datasets.build_dataset("train", args)
    if args.num_classes is None:
        args.num_classes = datasets.num_classes_for(args, dataset_train)
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
    if args.sgd:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == "fp16" else None
    addons = criterion.addons
    base_ds = datasets.get_coco_api_from_dataset(dataset_val)
    ckpt = resume(args, model_without_ddp, optimizer, lr_scheduler, scaler, addons)
    eval_kwargs = {"amp": args.amp, "amp_dtype": args.amp_dtype, "print_freq": args.print_freq}
    if ckpt is not None:
        reconcile_log(args, ckpt, lambda: evaluate(evaluation_model(model, addons), criterion, postprocessors,
                                                   loader_val, base_ds, device, **eval_kwargs)[0])
        del ckpt
    if args.eval:
        test_stats, coco_evaluator = evaluate(evaluation_model(model, addons), criterion, postprocessors,
                                              loader_val, base_ds, device, **eval_kwargs)
        if args.output_dir and is_main_process():
            save_atomic(coco_evaluator.coco_eval["bbox"].eval, Path(args.output_dir) / "eval.pth")
        return {f"test_{k}": v for k, v in test_stats.items()}

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
            global_step=epoch * len(loader_train), tb_writer=tb_writer)
        lr_scheduler.step()
        save_checkpoints(args, epoch, model_without_ddp, optimizer, lr_scheduler, scaler, addons, train_stats)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test_stats, coco_evaluator = evaluate(evaluation_model(model, addons), criterion, postprocessors,
                                                  loader_val, base_ds, device, **eval_kwargs)
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()})
            if args.output_dir and is_main_process():
                (Path(args.output_dir) / "eval").mkdir(exist_ok=True)
                save_atomic(coco_evaluator.coco_eval["bbox"].eval, Path(args.output_dir) / "eval" / "latest.pth")
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
    """Command-line entry: an impossible flag exits with status 2 and a one-line message (as argparse's own
    errors), a non-finite-loss stop with status 1 and a message; neither with a traceback."""
    args = finalize_args(get_args_parser().parse_args())
    try:
        main(args)
    except FlagError as e:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {e}\n")
        raise SystemExit(2) from None
    except NonFiniteLossError as e:
        logger.error("training stopped: %s", e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli()
