"""Count host-device synchronisations of a piece of code, on any device (CPU included).

On a GPU every operation below waits for the device (the host needs a value or a data-dependent shape); on
the CPU nothing waits, but the calls are the same, so counting them here tells what a GPU step would pay:

    with SyncCounter() as syncs:
        train_step()
    print(syncs.total, syncs.by_site())

Counted: ``.item()``, ``.tolist()``, ``.cpu()`` / ``.to("cpu")``, ``bool()`` / ``int()`` / ``float()`` of a tensor,
``.to()`` / ``.copy_()`` across devices, ``nonzero`` / ``argwhere`` / ``unique`` / ``masked_select`` /
``repeat_interleave`` with tensor repeats (data-dependent shapes), torchvision's ``nms`` (on a GPU it reads its
overlap mask on the host), and indexing or assignment with a boolean mask;
a host-to-device ``.to()`` / ``.copy_()`` with ``non_blocking=True`` is not a sync (it does not wait for the
device). ``.numpy()`` is not counted: it needs a host tensor, so the copy that made one was counted already. On the
CPU every tensor is a host tensor, so an operation on data that would already be on the host of a GPU run (say
``int()`` of an index scipy returned) is counted too: the figures are an upper bound of the GPU's.
Host-to-device copies do not exist on the CPU, but the blocking ones a GPU pays (each waits for the device:
``cudaStreamSynchronize``) are counted too, as ``upload NAME`` (also listed in ``SyncCounter.uploads``): a tensor
made from host data with an explicit ``device=`` (``torch.tensor(list, device=...)``), ``device_tensor.new_tensor(
data)``, and by provenance (below) ``host_tensor.to(device)`` / ``.cuda()`` and ``device_tensor.copy_(host_tensor)``
without ``non_blocking=True``.

Implicit uploads are found by provenance (``SyncCounter.host_meets_device``): a tensor is a host tensor when a GPU
run would make it on the host (a factory such as ``torch.arange`` / ``as_tensor`` / ``zeros`` without ``device=``,
``torch.from_numpy``, ``.cpu()``, or an operation on host tensors only); every other tensor is a device tensor
(parameters, the batch, what a factory makes with ``device=``, ``.to(device)``). An operation whose inputs mix a
host tensor of one or more dimensions (or a numpy array / list used as an index) with a device tensor is listed: on a
GPU an indexing operation then uploads the index with a blocking copy, and most others fail.
"""
from __future__ import annotations

import collections
import sys
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]

_ALWAYS = {"item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
           "unique", "unique_consecutive", "masked_select", "nonzero_static",
           "nms"}  # torchvision's NMS: its CUDA kernel copies the overlap mask to the host for the greedy pass


# torch factories that make a host tensor when called without ``device=`` (on a GPU run too)
_FACTORIES = {getattr(torch, n) for n in ("arange", "as_tensor", "tensor", "zeros", "ones", "full", "empty", "randperm",
                                          "rand", "randn", "randint", "linspace", "eye", "asarray", "zeros_like")
              if hasattr(torch, n)} - {getattr(torch, "zeros_like", None)}
_INDEXING = {"__getitem__", "__setitem__", "index_select", "index_put", "index_put_", "gather", "scatter", "scatter_",
             "scatter_add", "scatter_add_", "take", "take_along_dim", "index_add", "index_add_", "index_copy",
             "index_fill", "masked_fill", "where"}


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) argument."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _host_index(obj: Any) -> bool:
    """A numpy array or a list of ints used as an index (turned into a host tensor, then uploaded on a GPU)."""
    items = obj if isinstance(obj, tuple) else (obj,)
    return any(type(i).__module__ == "numpy" and getattr(i, "ndim", 0) > 0
               or isinstance(i, list) and i and all(isinstance(v, int) for v in i) for i in items)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


def _is_upload(name: str, args: tuple, kwargs: dict) -> bool:
    """A tensor made from host data (lists, numbers, arrays) with an explicit ``device=``: on a GPU a blocking
    host-to-device copy, which waits for the device like a sync (counted, and listed in ``SyncCounter.uploads``)."""
    return (name in ("tensor", "as_tensor") and kwargs.get("device") is not None and bool(args)
            and not torch.is_tensor(args[0]))


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _ALWAYS:
        return True
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
        return _has_bool_mask(args[1])
    if name in ("to", "copy_") and args and torch.is_tensor(args[0]):
        non_blocking = bool(kwargs.get("non_blocking")) or any(a is True for a in args[2:])
        if name == "copy_":  # dst.copy_(src): a non-blocking host-to-device copy does not wait for the device
            if len(args) < 2 or not torch.is_tensor(args[1]):
                return False
            src = args[1].device.type
            return src != args[0].device.type and not (non_blocking and src == "cpu")
        target = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
        src = args[0].device.type
        return any(torch.device(t).type != src for t in target) and not (non_blocking and src == "cpu")
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return torch.is_tensor(repeats)
    return False


_TORCH = Path(torch.__file__).resolve().parent
_DISPATCH = {"overrides.py", "_tensor.py", "functional.py", "sync_counter.py"}  # wrappers, not callers
_SYNC_FREE_ON_GPU = ("optim", "nn/utils", "amp", "autograd")  # torch code whose host paths are CPU-only


def _called_by_torch() -> bool:
    """Whether the call comes from torch's own Python code (optimizers, clip_grad_norm_, ...).

    Those are sync-free on a GPU by design (foreach kernels, host-side step counters) but take host paths on
    the CPU, so they are not counted.
    """
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if not (path.name in _DISPATCH and (_TORCH in path.parents or path.parent == ROOT / "util")):
            return any(_TORCH / part in path.parents for part in _SYNC_FREE_ON_GPU)
        frame = frame.f_back
    return False


class SyncCounter(TorchFunctionMode):
    """A torch-function mode that counts synchronising calls and where they come from.

    Attributes:
        total: number of synchronising calls.
        counts: per operation name.
        sites: per (file:line of the innermost frame inside this repository, operation).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self.uploads: collections.Counter[str] = collections.Counter()  # per site: see _is_upload
        self.host_meets_device: collections.Counter[str] = collections.Counter()  # per site and operation
        self._host: dict[int, weakref.ref] = {}  # id -> weak reference of the host tensors (module docstring)
        self._from_numpy: Callable | None = None

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, out: Any, host: bool) -> None:
        for t in _tensors(out):
            if host:
                self._host[id(t)] = weakref.ref(t, lambda _, key=id(t): self._host.pop(key, None))
            else:
                self._host.pop(id(t), None)

    def _is_host_upload(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Host data made into a device tensor with a blocking copy, found by provenance: ``device_tensor.new_tensor(
        data)``; ``host_tensor.to(device)`` / ``.cuda()`` and ``device_tensor.copy_(host_tensor)`` without
        ``non_blocking=True`` (on a GPU each waits for the device, like a sync)."""
        if not args or not torch.is_tensor(args[0]):
            return False
        if name == "new_tensor":
            return len(args) > 1 and not torch.is_tensor(args[1]) and not self._is_host(args[0])
        non_blocking = bool(kwargs.get("non_blocking")) or any(a is True for a in args[2:])
        if name in ("to", "cuda") and not non_blocking and self._is_host(args[0]):
            return name == "cuda" or any(isinstance(a, (str, torch.device)) for a in (*args[1:], kwargs.get("device")))
        if name == "copy_" and not non_blocking and len(args) > 1 and torch.is_tensor(args[1]):
            return self._is_host(args[1]) and not self._is_host(args[0])
        return False

    def _provenance(self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        """Mark ``out`` host or device; list an operation that mixes host and device tensors."""
        if name in ("cpu", "pin_memory", "numpy"):
            self._mark(out, True)
            return
        if name in ("to", "cuda") and (name == "cuda" or any(isinstance(a, (str, torch.device))
                                                             for a in (*args[1:], kwargs.get("device")))):
            self._mark(out, False)
            return
        inputs = _tensors(args) + _tensors(kwargs)
        if not inputs:
            self._mark(out, func in _FACTORIES and kwargs.get("device") is None)
            return
        host = [self._is_host(t) for t in inputs]
        mixed_index = name in _INDEXING and len(args) > 1 and _host_index(args[1])
        if all(host):
            self._mark(out, True)
        elif mixed_index or any(h and t.dim() > 0 for h, t in zip(host, inputs)):
            if not _called_by_torch():
                self.host_meets_device[f"{self._site()} {name}"] += 1
            self._mark(out, False)

    def __enter__(self) -> SyncCounter:
        counter = super().__enter__()
        self._from_numpy = torch.from_numpy  # not dispatched to torch-function modes: wrapped while counting
        original = self._from_numpy

        def from_numpy(array):
            t = original(array)
            self._mark(t, True)
            return t

        torch.from_numpy = from_numpy
        return counter

    def __exit__(self, *exc) -> None:
        torch.from_numpy = self._from_numpy
        self._host.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if _is_sync(name, args, kwargs) and not _called_by_torch():
            self.total += 1
            self.counts[name] += 1
            self.sites[f"{self._site()} {name}"] += 1
        elif (_is_upload(name, args, kwargs) or self._is_host_upload(name, args, kwargs)) and not _called_by_torch():
            # a blocking host-to-device copy: on a GPU it waits for the device (cudaStreamSynchronize)
            self.total += 1
            self.counts[f"upload {name}"] += 1
            self.sites[f"{self._site()} upload {name}"] += 1
            self.uploads[f"{self._site()} {name}"] += 1
        out = func(*args, **kwargs)
        self._provenance(func, name, args, kwargs, out)
        return out

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = Path(frame.filename)
            if ROOT in path.parents and path.name not in ("sync_counter.py", "gpu_paths.py"):
                return f"{path.relative_to(ROOT)}:{frame.lineno}"
        return "<outside the repository>"

    def by_site(self) -> list[tuple[str, int]]:
        """(site and operation, count), most frequent first."""
        return self.sites.most_common()
