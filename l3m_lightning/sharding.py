"""Sharded parameters (FSDP1 ``FSDPStrategy``, FSDP2 ``ModelParallelStrategy``): shard, gather to generate, gather to export.

* ``shard_blocks``: FSDP2 — ``fully_shard`` every decoder block (the model's ``_no_split_modules``),
  then the root, so any Hugging Face causal LM is sharded per block.
* ``unsharded_for_generation``: gather each block once per batch, not once per token. Under FSDP2
  every forward all-gathers each block's parameters and frees them afterwards; a decode loop runs
  one forward per new token, so by default it would all-gather the whole model ``max_new_tokens``
  times, in lockstep across ranks (``synced_gpus``). Inside this context every block is gathered
  once and kept through the whole loop (no collectives while decoding, so ranks stop
  independently), then resharded. It costs one full copy of the parameters per rank while
  sampling; the generation micro-batch bounds the rest. FSDP1 cannot run forward inside
  ``summon_full_params``; there generation keeps the per-forward all-gathers and ``synced_gpus``.
* ``full_state_dict``: the policy's full (unsharded, CPU) state dict for export.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch


def fsdp1_root(trainer: Any | None) -> torch.nn.Module | None:
    """The ``FullyShardedDataParallel`` wrapping the LightningModule under ``FSDPStrategy``, else ``None``."""
    if trainer is None:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = trainer.strategy.model
    return root if isinstance(root, FullyShardedDataParallel) else None


def params_sharded(model: torch.nn.Module, trainer: Any | None) -> bool:
    """True under FSDP1/FSDP2 (one rank too): parameters must be gathered to generate or export."""
    from torch.distributed.tensor import DTensor

    return fsdp1_root(trainer) is not None or any(isinstance(p, DTensor) for p in model.parameters())


def shard_blocks(model: torch.nn.Module, mesh: Any, extra: Iterable[torch.nn.Module] = ()) -> None:
    """FSDP2: ``fully_shard`` each decoder block (``model._no_split_modules``), then the root, then each of ``extra``.

    Data parallelism only: a mesh with a ``tensor_parallel`` dimension larger than 1 is refused.
    """
    from torch.distributed.fsdp import fully_shard

    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError("L3MModule supports FSDP2 data parallelism only: set tensor_parallel_size=1")
    dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    for module in extra:  # e.g. the value head, so its gradients are reduced across ranks too
        fully_shard(module, mesh=dp_mesh)


def full_state_dict(model: torch.nn.Module, trainer: Any | None, prefix: str = "model.") -> dict[str, torch.Tensor] | None:
    """``model``'s full (unsharded, CPU) state dict under FSDP1/FSDP2, else ``None`` (use the module's own).

    Collective under FSDP: every rank calls it. Under FSDP1 the wrapper holds the whole
    LightningModule, whose keys for ``model`` start with ``prefix``.
    """
    if not params_sharded(model, trainer):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    root = fsdp1_root(trainer)
    if root is not None:
        full = get_model_state_dict(root, options=options)
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    return get_model_state_dict(model, options=options)


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``fully_shard`` was applied to (empty when the model is not FSDP2-sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def unsharded_for_generation(model: torch.nn.Module) -> Iterator[bool]:
    """Inside: every FSDP2 module all-gathered once and kept so; yields whether that happened.

    Yields False (nothing changed: forwards keep all-gathering, ranks must decode in lockstep)
    when the model is not FSDP2-sharded or this torch lacks the FSDP2 internals used to restore
    each module's reshard-after-forward setting exactly.
    """
    modules = fsdp2_modules(model)
    try:
        states = [m._get_fsdp_state() for m in modules]
        if states:
            states[0]._lazy_init()  # the root decides its own reshard setting on first use; settle it first
        saved = [(st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups]) for st in states]
    except AttributeError:
        modules = []
    if not modules:
        yield False
        return
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in modules:
            m.unshard()
        yield True
    finally:
        for m, st, (auto, infos) in zip(modules, states, saved):
            st._auto_reshard_after_forward = auto
            for group, info in zip(st._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info
            m.reshard()
