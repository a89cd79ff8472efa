"""Compiling the scan kernels before anything is timed: a JIT's first call costs seconds."""

from __future__ import annotations

import torch
from torch import Tensor

from starmamba.ops.conv import conv_silu
from starmamba.ops.scan import resolve_backend, selective_scan, selective_scan_tokens


def run_dtype(device: torch.device) -> torch.dtype:
    """The dtype a training step feeds the scan on ``device``: bfloat16 on CUDA, where training runs under
    bf16 autocast, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def warm_up(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
    """Compile the default backend's kernels for ``device`` (default: CUDA if there is one, else the CPU)
    and ``dtype`` (default: :func:`run_dtype`, what training feeds it) with tiny passes in the layouts the
    models use: a forward without gradients (evaluation's), forward + backward of the plain scan and of the
    4-scan mixer's path (convolution through two orders, token-major scan); returns the backend's name.
    Timed comparisons call it first, so that no run timed pays for the compilation."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or run_dtype(device)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    # Two of everything: numba compiles again for an array that a dimension of size 1 makes contiguous.
    u, delta, z = randn(2, 4, 3), randn(2, 4, 3), randn(2, 4, 3)
    # A, D and the step's bias stay float32, as models keep them.
    A = -torch.ones(4, 4, device=device)
    D, bias = torch.ones(4, device=device), torch.zeros(4, device=device)
    B, C = randn(2, 2, 4, 3), randn(2, 2, 4, 3)
    with torch.no_grad():
        selective_scan(u, delta, A, B, C, D, z, bias, True)
    u.requires_grad_()
    selective_scan(u, delta, A, B, C, D, z, bias, True).float().sum().backward()
    x = randn(2, 3, 2).requires_grad_()
    orders = torch.tensor([[0, 1, 2], [2, 1, 0]], device=device)
    tokens = conv_silu(x, orders, randn(2, 2, 4), randn(2, 2))
    dt, B, C = torch.matmul(tokens, randn(2, 2, 9)).split([1, 4, 4], dim=-1)
    y = selective_scan_tokens(tokens, torch.matmul(dt, randn(2, 1, 2)), A, B, C, D, bias, True)
    y.backward(torch.ones_like(y))
    return resolve_backend(None, device, dtype)
