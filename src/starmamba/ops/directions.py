"""``scan_directions``: the selective scans of a multi-direction mixer, back in sequence order, averaged and gated."""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from starmamba.ops.scan import resolve_backend, selective_scan_tokens


@functools.cache
def _numba_directions():
    return importlib.import_module("starmamba.ops.directions_numba").scan_directions_numba


def scan_directions(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    delta_bias: Tensor,
    orders: Tensor | None,
    z: Tensor,
    backend: str | None = None,
) -> Tensor:
    """silu(z) times the mean over directions k of the selective scan of direction k, in sequence order.

    Direction k reads the tokens in the order ``orders[k, 0]`` (its t-th token is sequence position
    orders[k, 0, t]; ``orders[k, 1]`` is the inverse order; ``None``: one direction, in sequence order)
    with steps softplus(delta + delta_bias). Shapes: u, delta (K, b, l, d), [k, :, t] the t-th token of
    direction k; B, C (K, b, l, n); A (K d, n), channel j of direction k at k d + j; D, delta_bias (K d,);
    orders (K, 2, l) int64; z (b, l, d).
    Returns (b, l, d) in z's dtype; the scans compute in float32 at least.

    Without gradients on the numba backend one kernel does it all (no per-direction outputs, no gather);
    otherwise :func:`selective_scan_tokens` runs every direction and a gather puts them back in order.
    """
    K, _, length, _ = u.shape
    if orders is not None and orders.shape != (K, 2, length):
        raise ValueError(f"orders must be (directions={K}, 2, length={length}), got {tuple(orders.shape)}")
    if orders is None and K != 1:
        raise ValueError(f"{K} directions need their orders")
    name = resolve_backend(backend, u.device, u.dtype)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, D, delta_bias, z))
    if name == "numba" and not wants_grad:
        dtype = torch.promote_types(u.dtype, torch.float32)
        order = torch.arange(length, device=u.device)[None] if orders is None else orders[:, 0]
        out = _numba_directions()(*(t.to(dtype) for t in (u, delta, A, B, C, D, delta_bias)), order, z.to(dtype))
        return out.to(z.dtype)
    y = selective_scan_tokens(u.transpose(0, 1), delta.transpose(0, 1), A, B.transpose(0, 1), C.transpose(0, 1),
                              D, delta_bias, delta_softplus=True, backend=name)  # fmt: skip
    if orders is None:
        out = y[:, 0]
    else:
        # Token p of direction k is at k l + inverse_k[p] of the flattened directions: one gather for all.
        inverse = orders[:, 1] + torch.arange(0, K * length, length, device=u.device)[:, None]
        out = y.flatten(1, 2).index_select(1, inverse.flatten()).unflatten(1, (K, length)).mean(1)
    return out.to(z.dtype) * F.silu(z)
