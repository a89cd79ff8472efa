"""The Mamba (v1) token mixer of MambaMLP, with one causal scan or four scan directions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from starmamba.ops.conv import conv_silu
from starmamba.ops.directions import scan_directions


class ScanDirection(nn.Module):
    """What one scan direction owns: causal depthwise conv, x/dt projections, A (as A_log) and D."""

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.dt_rank = dt_rank or math.ceil(d_inner / 16)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        # S4D-real: A = -(1..d_state) for every channel, kept as a log in fp32.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        with torch.no_grad():
            std = self.dt_rank**-0.5
            self.dt_proj.weight.uniform_(-std, std)
            # Steps log-uniform in [dt_min, dt_max], stored through the inverse of softplus.
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class MambaMixer(nn.Module):
    """Mamba mixer: shared in/out projections around ``scans`` directions, gated by silu(z).

    ``forward`` takes (b, l, dim) and, with more than one scan, ``orders`` (scans - 1, 2, l): the
    order and inverse order of every direction after the first, which runs in sequence order. The
    directions' outputs are put back in sequence order, averaged, gated and projected: ARM's "v3"
    mixer when there are four. All directions run as one convolution that reads the tokens through
    each order, one batched x_proj and one dt_proj matmul, and one :func:`scan_directions` over their
    stacked channels (B and C grouped per direction), which costs a CPU one sequential pass, not four.
    """

    def __init__(self, dim: int, scans: int = 1, expand: int = 1, d_state: int = 16, d_conv: int = 4) -> None:
        super().__init__()
        d_inner = expand * dim
        self.d_inner, self.d_state = d_inner, d_state
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.directions = nn.ModuleList(ScanDirection(d_inner, d_state, d_conv) for _ in range(scans))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def _stacked(self, name: str) -> Tensor:
        """One parameter of every direction, stacked: e.g. x_proj.weight -> (scans, out, in)."""
        return torch.stack([direction.get_parameter(name) for direction in self.directions])

    def forward(self, x: Tensor, orders: Tensor | None = None) -> Tensor:
        scans, (batch, length) = len(self.directions), x.shape[:2]
        if scans > 1 and (orders is None or orders.shape != (scans - 1, 2, length)):
            raise ValueError(f"a {scans}-scan mixer needs orders of shape ({scans - 1}, 2, {length})")
        x, z = self.in_proj(x).chunk(2, dim=-1)
        forward_order = torch.arange(length, device=x.device).expand(1, 2, length)
        every_order = torch.cat([forward_order, orders]) if scans > 1 else None  # (scans, 2, l)
        # Every direction reads the tokens through its order: u is direction-major (scans, b, l, d), each
        # direction's tokens in its order, so that its projections are one matrix product per direction.
        u = conv_silu(x, forward_order[:, 0] if every_order is None else every_order[:, 0],
                      self._stacked("conv1d.weight").squeeze(2), self._stacked("conv1d.bias"))  # fmt: skip
        x_dbl = torch.bmm(u.flatten(1, 2), self._stacked("x_proj.weight").transpose(1, 2))
        dt, B, C = x_dbl.split([self.directions[0].dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.bmm(dt, self._stacked("dt_proj.weight").transpose(1, 2))
        out = scan_directions(
            u,
            delta.view_as(u),
            -torch.exp(self._stacked("A_log").float()).flatten(0, 1),
            B.unflatten(1, (batch, length)),
            C.unflatten(1, (batch, length)),
            self._stacked("D").float().flatten(),
            self._stacked("dt_proj.bias").float().flatten(),
            every_order,
            z,
        )
        return self.out_proj(out)


def scan_orders(rows: int, cols: int, cls_index: int | None) -> Tensor:
    """(3, 2, l) orders and inverses of the scans after row-major forward, over a row-major grid.

    They are row-major backward, column-major forward and column-major backward. The column scans
    transpose only the patch grid: a class token at ``cls_index`` keeps its place in the sequence.
    """
    patches = rows * cols
    length = patches + (cls_index is not None)
    # Sequence position of every patch, when the class token sits at cls_index.
    seq_pos = torch.arange(patches)
    if cls_index is not None:
        seq_pos = seq_pos + (seq_pos >= cls_index).long()
    column_major = seq_pos.view(rows, cols).t().flatten()
    if cls_index is not None:
        column_major = torch.cat([column_major[:cls_index], torch.tensor([cls_index]), column_major[cls_index:]])
    orders = [torch.arange(length).flip(0), column_major, column_major.flip(0)]
    return torch.stack([torch.stack([order, torch.argsort(order)]) for order in orders])
