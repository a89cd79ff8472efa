"""Exact selective scan for CPUs: sequential in cache-sized chunks, recomputed in the backward pass.

On a few cores a parallel (Blelloch) scan does twice the work of the plain recurrence and a
log-space "cumsum ratio" trick overflows at realistic step sizes, so this backend runs the
recurrence itself, one fused multiply-add per step over a chunk held in cache. Like the CUDA
kernel it keeps only the state entering each chunk for the backward pass and recomputes the rest,
which keeps the extra memory at a few chunk-sized buffers whatever the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 64


def scan_chunked(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`starmamba.ops.scan_reference.scan_reference`.

    Shapes: u, dt (b, d, l); A (d, n); B, C (b, g, n, l). Returns y (b, d, l) and the last state
    (b, d, n); gradients flow to every input and through the last state too.
    """
    return _ChunkedScan.apply(u, dt, A, B, C, chunk)


def _time_major(x: Tensor, t0: int, t1: int, groups: int) -> Tensor:
    """(b, d, l) -> (t, b, g, d/g, 1) view of steps t0..t1."""
    batch, dim, _ = x.shape
    return x[:, :, t0:t1].permute(2, 0, 1).reshape(t1 - t0, batch, groups, dim // groups, 1)


def _state_row(M: Tensor, t0: int, t1: int) -> Tensor:
    """(b, g, n, l) -> (t, b, g, 1, n) view, to broadcast over the channels of a group."""
    return M[..., t0:t1].permute(3, 0, 1, 2).unsqueeze(3)


def _state_col(M: Tensor, t0: int, t1: int) -> Tensor:
    """(b, g, n, l) -> (t, b, g, n, 1) view, for contracting the state dimension with matmul."""
    return M[..., t0:t1].permute(3, 0, 1, 2).unsqueeze(4)


def _from_time_major(x: Tensor, out: Tensor, t0: int, t1: int) -> None:
    """Write a (t, b, g, d/g[, 1]) chunk into steps t0..t1 of out (b, d, l)."""
    out[:, :, t0:t1] = x.reshape(t1 - t0, out.shape[0], out.shape[1]).permute(1, 2, 0)


def _discretise(u_t: Tensor, dt_t: Tensor, A_g: Tensor, B_row: Tensor, dA: Tensor, hs: Tensor) -> None:
    """Fill dA = exp(dt A) and hs = dt u B for one chunk, all (t, b, g, d/g, n)."""
    torch.mul(dt_t, A_g, out=dA).exp_()
    torch.mul(dt_t * u_t, B_row, out=hs)


def _recur(dA: Tensor, hs: Tensor, h0: Tensor) -> None:
    """In place: hs[t] = dA[t] * h[t-1] + hs[t], with h[-1] = h0."""
    prev = h0
    for a, cur in zip(dA.unbind(0), hs.unbind(0), strict=True):
        cur.addcmul_(a, prev)
        prev = cur


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, chunk):
        batch, dim, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        A_g = A.view(1, 1, groups, dim // groups, d_state)
        starts = list(range(0, length, chunk))
        buf_shape = (min(chunk, length), batch, groups, dim // groups, d_state)
        dA_buf, hs_buf = u.new_empty(buf_shape), u.new_empty(buf_shape)
        entering = u.new_empty((len(starts), *buf_shape[1:]))
        y = u.new_empty(batch, dim, length)
        h = u.new_zeros(buf_shape[1:])
        for k, t0 in enumerate(starts):
            t1 = min(t0 + chunk, length)
            dA, hs = dA_buf[: t1 - t0], hs_buf[: t1 - t0]
            entering[k] = h
            _discretise(
                _time_major(u, t0, t1, groups),
                _time_major(dt, t0, t1, groups),
                A_g,
                _state_row(B, t0, t1),
                dA,
                hs,
            )
            _recur(dA, hs, entering[k])
            _from_time_major(torch.matmul(hs, _state_col(C, t0, t1)), y, t0, t1)
            h = hs[-1]  # copied into entering[k + 1] before the buffers are reused
        ctx.save_for_backward(u, dt, A, B, C, entering)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return y, h.clone().reshape(batch, dim, d_state)

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, dt, A, B, C, entering = ctx.saved_tensors
        chunk = ctx.chunk
        batch, dim, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        A_g = A.view(1, 1, groups, dim // groups, d_state)
        if grad_y is None:
            grad_y = u.new_zeros(batch, dim, length)
        buf_shape = (min(chunk, length), batch, groups, dim // groups, d_state)
        dA_buf, hs_buf, lam_buf, m_buf = (u.new_empty(buf_shape) for _ in range(4))
        grad_u, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A_g[0, 0])
        # Gradient reaching the state after the last step of the chunk from later steps.
        carry = None if grad_last is None else grad_last.reshape(buf_shape[1:])
        for k in reversed(range(len(entering))):
            t0 = k * chunk
            t1 = min(t0 + chunk, length)
            steps = t1 - t0
            dA, hs, lam, m = dA_buf[:steps], hs_buf[:steps], lam_buf[:steps], m_buf[:steps]
            u_t, dt_t = _time_major(u, t0, t1, groups), _time_major(dt, t0, t1, groups)
            B_row, C_row = _state_row(B, t0, t1), _state_row(C, t0, t1)
            gy_t = _time_major(grad_y, t0, t1, groups)
            _discretise(u_t, dt_t, A_g, B_row, dA, hs)
            _recur(dA, hs, entering[k])

            # lam[t] = dLoss/dh[t] = gy[t] C[t] + dA[t+1] lam[t+1], run backwards in time.
            torch.mul(gy_t, C_row, out=lam)
            lam_steps, dA_steps = lam.unbind(0), dA.unbind(0)
            if carry is not None:
                lam_steps[-1].add_(carry)
            for t in range(steps - 2, -1, -1):
                lam_steps[t].addcmul_(dA_steps[t + 1], lam_steps[t + 1])
            carry = dA_steps[0] * lam_steps[0]

            # Through dA[t] = exp(dt[t] A): m = lam[t] * h[t-1] * dA[t].
            torch.mul(lam, dA, out=m)
            m[0].mul_(entering[k])
            m[1:].mul_(hs[:-1])
            lam_B = torch.matmul(lam, _state_col(B, t0, t1))
            _from_time_major(lam_B * dt_t, grad_u, t0, t1)
            _from_time_major((m * A_g).sum(-1, keepdim=True) + lam_B * u_t, grad_dt, t0, t1)
            grad_A += (m * dt_t).sum(dim=(0, 1))
            grad_B[..., t0:t1] = torch.matmul((dt_t * u_t).transpose(-1, -2), lam).squeeze(3).permute(1, 2, 3, 0)
            grad_C[..., t0:t1] = torch.matmul(gy_t.transpose(-1, -2), hs).squeeze(3).permute(1, 2, 3, 0)
        return grad_u, grad_dt, grad_A.reshape(dim, d_state), grad_B, grad_C, None
