"""The mixer's depthwise causal conv1d + SiLU, over several orders of the same tokens."""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from starmamba.ops.scan import resolve_backend


@functools.cache
def _numba_conv():
    return importlib.import_module("starmamba.ops.conv_numba").conv_silu_numba


def conv_silu(x: Tensor, orders: Tensor, weight: Tensor, bias: Tensor, backend: str | None = None) -> Tensor:
    """silu(depthwise causal conv1d) of the tokens x (b, l, d) read in each of K orders (K, l) (int64).

    weight (K, d, W), bias (K, d). Returns (K, b, l, d), direction-major so that each direction's
    tokens are one matrix for its projections: [k, :, t] is the output at the t-th token of order k.
    Where the scan backend (``backend`` as :func:`resolve_backend` resolves it) is numba, a numba
    kernel reads the tokens through the orders; otherwise reordered copies go through ``F.conv1d``.
    Computes in float32 at least, like the scan.
    """
    K, length = orders.shape
    if resolve_backend(backend, x.device, x.dtype) == "numba":
        dtype = torch.promote_types(x.dtype, torch.float32)
        return _numba_conv()(x.to(dtype), orders, weight.to(dtype), bias.to(dtype))
    dim, width = weight.shape[1:]
    ordered = x.index_select(1, orders.flatten()).unflatten(1, (K, length))  # (b, K, l, d)
    out = F.conv1d(ordered.permute(0, 1, 3, 2).flatten(1, 2), weight.flatten(0, 1).unsqueeze(1), bias.flatten(),
                   padding=width - 1, groups=K * dim)[..., :length]  # fmt: skip
    return F.silu(out).unflatten(1, (K, dim)).permute(1, 0, 3, 2).contiguous()
