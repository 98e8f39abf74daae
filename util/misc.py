"""Batching (NestedTensor), small tensor helpers and the distributed helpers.

The distributed layer is plain torch.distributed: the process group is initialised from the
environment that torchrun / Slurm set, and every helper degrades to a no-op in a single process.
"""
from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
@dataclass
class NestedTensor:
    """A zero-padded image batch and its padding mask.

    Attributes:
        tensors: [B, C, H, W] images padded at the bottom/right to the batch maximum.
        mask: [B, H, W] bool, True on padded pixels.
        sizes: the images' unpadded (h, w) as Python ints, when the batch was built from them (what the mask says,
            readable without a host-device synchronisation); None otherwise.
    """

    tensors: Tensor
    mask: Tensor
    sizes: tuple[tuple[int, int], ...] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NestedTensor:
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking), self.sizes)

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask


def nested_tensor_from_tensor_list(tensors: Sequence[Tensor], size_divisibility: int = 1) -> NestedTensor:
    """Pad a list of [C, H_i, W_i] images into a NestedTensor (no rounding by default, as official)."""
    if len(tensors) == 0:
        raise ValueError("nested_tensor_from_tensor_list: empty list of images")
    if any(t.dim() != 3 for t in tensors):
        raise ValueError("nested_tensor_from_tensor_list: every image must be [C, H, W]")
    c = tensors[0].shape[0]
    h = max(t.shape[1] for t in tensors)
    w = max(t.shape[2] for t in tensors)
    if size_divisibility > 1:
        h = (h + size_divisibility - 1) // size_divisibility * size_divisibility
        w = (w + size_divisibility - 1) // size_divisibility * size_divisibility
    ref = tensors[0]
    batch = torch.zeros((len(tensors), c, h, w), dtype=ref.dtype, device=ref.device)
    mask = torch.ones((len(tensors), h, w), dtype=torch.bool, device=ref.device)
    for img, pad_img, m in zip(tensors, batch, mask):
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(batch, mask, tuple((int(t.shape[1]), int(t.shape[2])) for t in tensors))


def collate_fn(batch: list[tuple[Tensor, dict]]) -> tuple[NestedTensor, tuple[dict, ...]]:
    """DataLoader collate: (images, targets) -> (NestedTensor, tuple of target dicts)."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(images), targets


def host_tensor_to(values: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.as_tensor(values, dtype=dtype, device=device)`` without a host-device synchronisation: built on
    the host, pinned on a GPU and copied asynchronously (a pageable blocking copy waits for the stream)."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Clamped logit: log(max(x, eps) / max(1 - x, eps)) with x clamped to [0, 1]."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# --------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _slurm_first_host() -> str:
    """First host of the Slurm allocation (the rendezvous address of a srun-launched job)."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        raise RuntimeError("Slurm multi-task run without MASTER_ADDR or SLURM_JOB_NODELIST")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise RuntimeError(f"cannot resolve the first host of {nodes!r} with scontrol ({e}); set MASTER_ADDR") from e


def init_distributed_mode(args: Any) -> None:
    """Initialise the process group from the environment (torchrun or Slurm).

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` and
    ``args.dist_backend`` (nccl on CUDA, gloo otherwise). A single process needs nothing.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        ngpus = max(torch.cuda.device_count(), 1)
        args.gpu = int(os.environ.get("SLURM_LOCALID", args.rank % ngpus))
        os.environ.setdefault("RANK", str(args.rank))
        os.environ.setdefault("WORLD_SIZE", str(args.world_size))
        os.environ.setdefault("LOCAL_RANK", str(args.gpu))
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _slurm_first_host()
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.distributed = True
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    logger.info("distributed init (rank %d / %d, backend %s)", args.rank, args.world_size, args.dist_backend)
    dist.init_process_group(backend=args.dist_backend, init_method="env://", world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(minutes=30))
    dist.barrier()


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of a tensor over processes (identity in a single process)."""
    if get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather any picklable object from every process (a one-element list in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_dict(values: dict[str, Tensor], average: bool = True) -> dict[str, Tensor]:
    """All-reduce a dict of scalar tensors in ONE collective; keys are sorted so every rank agrees."""
    world_size = get_world_size()
    if world_size < 2 or not values:
        return values
    with torch.no_grad():
        names = sorted(values.keys())
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))
