"""Which scaled-dot-product-attention kernels the policy's passes may use: not cuDNN's, by default.

On Hopper GPUs PyTorch prefers cuDNN's attention, which builds an execution plan for every new shape
(hundreds of milliseconds of host time each; cf. pytorch/pytorch#155958, meta-pytorch/torchtune#1652). An RL step
meets new shapes all the time: each decode step's key length, each batch's prompt and response lengths.
On one H200 (2026-11-29, ``bench/fresh_shapes.py``, a 122M Llama in bfloat16, 16 prompts x 4 samples x 64
tokens) sampling a batch of unseen shapes took 3.5-4.9 s against 0.45-0.8 s for the same batch again, and
``aten::_cudnn_attention_forward`` held 4.8 s of host time in one step's profile. Flash and memory-efficient
attention build nothing per shape. ``policy.cudnn_attention: true`` lets SDPA pick cuDNN again (for shapes
that repeat).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def attention_kernels(cudnn: bool) -> AbstractContextManager:
    """A context in which SDPA picks among the kernels enabled now, less cuDNN's unless ``cudnn``; restored on exit.

    The switches are process-wide; ``sdpa_kernel`` sets and restores them. A no-op when ``cudnn`` is
    allowed or already off.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if cudnn or not torch.backends.cuda.cudnn_sdp_enabled():
        return nullcontext()
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled()}
    return sdpa_kernel([backend for backend, on in enabled.items() if on])
