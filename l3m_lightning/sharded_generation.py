"""Generation with sharded parameters: gather each block once per batch, not once per token.

Under FSDP2 every forward all-gathers each block's parameters and frees them afterwards. A decode
loop runs one forward per new token, so by default it would all-gather the whole model
``max_new_tokens`` times, in lockstep across ranks (``synced_gpus``). ``unsharded_for_generation``
instead gathers every block once, keeps the full parameters through the whole loop (no
collectives while decoding, so ranks stop independently), and reshards afterwards. It costs one
full copy of the parameters per rank while sampling; the generation micro-batch bounds the rest.

FSDP1 (``FSDPStrategy``) cannot run forward inside ``summon_full_params``; there generation keeps
the per-forward all-gathers and ``synced_gpus``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


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
