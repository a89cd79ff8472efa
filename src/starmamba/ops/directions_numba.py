"""The 4-scan mixer's inference pass on a CPU in one numba kernel: every direction's selective scan,
written straight into sequence order, summed, averaged and gated.

Without gradients nothing needs the directions' outputs one by one, so a task (a batch element and a
block of channels) runs its directions one after another and adds each step's output into the
token's row of the result: no (K, b, l, d) output, no gather back into sequence order, no separate
mean and gate. The steps' softplus is computed as each step is read, not in a chunk buffer as the
training kernel does for its backward pass. Indexing follows ``scan_numba`` (slices per row).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from starmamba.ops.scan_numba import _JIT, _np, _parallel, fast_exp, fast_log1p

# Channels per task. A task's states and decay rates, 2 x d_state x BLOCK floats (24 KB), stay in a
# core's L1 cache; a longer inner loop than the training kernel's 64 halves the per-step overhead
# (measured at the classifier's 197 tokens: 20 ms at 192 against 27 ms at 64 for MambaMLP-base's).
BLOCK = 192


@numba.njit(**_JIT)
def _directions_forward(lo, hi, block, u, delta, bias, A, B, C, D, orders, z, out):
    """Tasks lo..hi-1: out (b, l, d) = silu(z) / K * sum over directions k of the scan of direction k,
    its t-th output added at sequence position orders[k, t].

    u, delta (K, b, l, d); B, C (K, b, l, n); A (K d, n); D, bias (K d,); orders (K, l); z (b, l, d).
    """
    K, _, length, dim = u.shape
    d_state = A.shape[1]
    zero, one = u.dtype.type(0), u.dtype.type(1)
    blocks = -(-dim // block)
    At, h = np.empty((d_state, block), u.dtype), np.empty((d_state, block), u.dtype)
    dt, dtu, y = np.empty(block, u.dtype), np.empty(block, u.dtype), np.empty(block, u.dtype)
    for task in range(lo, hi):
        b, j0 = task // blocks, (task % blocks) * block
        nd = min(block, dim - j0)
        for k in range(K):
            c0 = k * dim + j0
            bias_k, D_k = bias[c0 : c0 + nd], D[c0 : c0 + nd]
            for n in range(d_state):
                for j in range(nd):
                    At[n, j] = A[c0 + j, n]
                    h[n, j] = zero
            for t in range(length):
                delta_t, u_t = delta[k, b, t, j0 : j0 + nd], u[k, b, t, j0 : j0 + nd]
                for j in range(nd):
                    # softplus(x) = max(x, 0) + log(1 + e^-|x|): no overflow.
                    x = delta_t[j] + bias_k[j]
                    step = max(x, zero) + fast_log1p(fast_exp(-abs(x)))
                    dt[j] = step
                    dtu[j] = step * u_t[j]
                    y[j] = D_k[j] * u_t[j]
                B_t, C_t = B[k, b, t], C[k, b, t]
                for n in range(d_state):
                    bn, cn = B_t[n], C_t[n]
                    for j in range(nd):
                        hv = fast_exp(dt[j] * At[n, j]) * h[n, j] + dtu[j] * bn
                        h[n, j] = hv
                        y[j] += cn * hv
                row = out[b, orders[k, t], j0 : j0 + nd]
                if k == 0:
                    for j in range(nd):
                        row[j] = y[j]
                else:
                    for j in range(nd):
                        row[j] += y[j]
        scale = one / K
        for t in range(length):
            z_t, row = z[b, t, j0 : j0 + nd], out[b, t, j0 : j0 + nd]
            for j in range(nd):
                zv = z_t[j]
                row[j] *= scale * zv / (one + fast_exp(-zv))


def _block(dim: int, batch: int) -> int:
    """Channels per task: at most BLOCK, and small enough that every thread gets two tasks, a multiple of 16."""
    per_row = max(-(-dim // BLOCK), -(-2 * torch.get_num_threads() // batch))
    per_block = -(-dim // per_row)
    return min(dim, -(-per_block // 16) * 16)


def scan_directions_numba(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor, orders: Tensor, z: Tensor
) -> Tensor:
    """The forward pass of :func:`starmamba.ops.directions.scan_directions`, without gradients; shapes as
    there, every tensor of u's dtype (float32 or float64). Returns (b, l, d)."""
    _, batch, length, dim = u.shape
    out = u.new_empty(batch, length, dim)
    block = _block(dim, batch)
    tasks = batch * -(-dim // block)
    _parallel(_directions_forward, tasks, block,
              *map(_np, (u, delta, delta_bias.contiguous(), A.contiguous(), B, C, D.contiguous(), orders.contiguous(),
                         z, out)))  # fmt: skip
    return out
