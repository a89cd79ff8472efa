"""The plain sequential selective-scan recurrence, for checking the fast backends."""

from __future__ import annotations

import torch
from torch import Tensor


def scan_reference(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t . h_t`` one step at a time.

    Shapes: u, dt (b, d, l); A (d, n); B, C (b, g, n, l) with g dividing d.
    Returns y (b, d, l) and the last state h_{l-1} (b, d, n). Autograd differentiates it as written.
    """
    dim = u.shape[1]
    groups = B.shape[1]
    A_g = A.view(groups, dim // groups, -1)
    # The state starts at zero: the first step multiplies its decay by 0 (no zeros of a batch size).
    h = None
    ys = []
    steps = zip(u.unbind(-1), dt.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True)
    for u_t, dt_t, B_t, C_t in steps:
        # -1 for the batch, never its size: an ONNX trace would keep a size as a constant.
        dt_t = dt_t.view(-1, groups, dim // groups, 1)
        u_t = u_t.view(-1, groups, dim // groups, 1)
        step = (dt_t * u_t) * B_t.unsqueeze(2)
        h = torch.exp(dt_t * A_g) * (0.0 if h is None else h) + step
        ys.append((h * C_t.unsqueeze(2)).sum(-1).flatten(1))
    return torch.stack(ys, dim=-1), h.flatten(1, 2)
