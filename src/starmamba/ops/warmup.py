"""Compiling the scan kernels before anything is timed: a JIT's first call costs seconds."""

from __future__ import annotations

import torch
from torch import Tensor

from starmamba.ops.conv import conv_silu
from starmamba.ops.directions import scan_directions
from starmamba.ops.scan import resolve_backend, selective_scan


def run_dtype(device: torch.device) -> torch.dtype:
    """The dtype a training step feeds the scan on ``device``: bfloat16 on CUDA, where training runs under
    bf16 autocast, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def warm_up(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
    """Compile the default backend's kernels for ``device`` (default: CUDA if there is one, else the CPU)
    and ``dtype`` (default: :func:`run_dtype`, what training feeds it) with tiny passes in the layouts the
    models use: forward without gradients (evaluation's) and forward + backward of the plain scan and of
    the multi-direction mixer's path (convolution through two orders, the directions' scans); returns the
    backend's name.
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
    # The mixer's path with one direction (STAR's) and several: (K, b, l, d) tokens, transposed to
    # (b, K, l, d) for the training kernel, are contiguous only for K = 1.
    for orders in (None, torch.tensor([[[0, 1, 2], [0, 1, 2]], [[2, 1, 0], [2, 1, 0]]], device=device)):
        K = 1 if orders is None else len(orders)
        x = randn(2, 3, 2).requires_grad_()
        order = torch.arange(3, device=device)[None] if orders is None else orders[:, 0]
        tokens = conv_silu(x, order, randn(K, 2, 4), randn(K, 2))  # (K, b, l, d), as the mixer has them
        dt, B, C = torch.bmm(tokens.flatten(1, 2), randn(K, 2, 9)).split([1, 4, 4], dim=-1)
        delta = torch.bmm(dt, randn(K, 1, 2)).view_as(tokens)
        B, C, z = B.unflatten(1, (2, 3)), C.unflatten(1, (2, 3)), randn(2, 3, 4)[..., 2:]  # z: in_proj's second half
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                out = scan_directions(tokens, delta, A[: 2 * K], B, C, D[: 2 * K], bias[: 2 * K], orders, z)
        out.backward(torch.ones_like(out))
    return resolve_backend(None, device, dtype)
