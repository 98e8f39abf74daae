"""``--compile``: torch.compile of the parts that are the same every step (backbone, encoder and decoder layers).

The parts are compiled in place (``nn.Module.compile``): parameter names, state dicts, checkpoints and the EMA's
deep copy are unchanged, and the glue between them (matching, query groups, add-on hooks, losses) stays eager,
where data-dependent Python would break graphs. Compilation is lazy: the first call of each part compiles it
(seconds to minutes), image sizes that change between batches are traced as dynamic shapes after the first
recompile. Inductor draws dropout masks through torch's generator (``fallback_random``), so a compiled run draws
the same random numbers as an eager one; its kernels round differently (float-level differences). Off by default:
what it gains is measured by ``tools/gpu_bench.sh`` (README, Benchmarks).
"""
from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

STACKS = ("encoder", "decoder")  # a ModuleList named `layers` under one of these: each layer is a part


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the submodules ``--compile`` compiles: the CNN body or ViT blocks and every transformer layer."""
    names = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if name.endswith("backbone.0.body"):
            names.append(name)
        elif isinstance(module, nn.ModuleList) and (
                (leaf == "layers" and parent.rpartition(".")[2] in STACKS) or name.endswith("backbone.blocks")):
            names += [f"{name}.{i}" for i in range(len(module))]
    return names


def compile_model(model: nn.Module, mode: str = "default", backend: str = "inductor") -> list[str]:
    """Compile ``compiled_parts(model)`` in place; returns their names."""
    names = compiled_parts(model)
    if backend == "inductor":  # dropout masks from torch's generator, in eager order: the official random stream
        import torch._inductor.config
        torch._inductor.config.fallback_random = True
    modules = dict(model.named_modules())
    options = {} if mode == "default" else {"mode": mode}
    for name in names:
        modules[name].compile(backend=backend, **options)
    logger.info("--compile: %d parts (%s backend, mode %s): %s", len(names), backend, mode,
                ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    return names
