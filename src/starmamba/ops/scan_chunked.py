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

# On a CPU a chunk holds at most this many state values per buffer (8 MB in fp32) and at most
# MAX_CHUNK steps: measured on 2 cores, larger chunks fall out of cache and smaller ones pay more
# dispatch. On a GPU the cache rule would shrink chunks to one step at large batches, so that the
# saved entering states grow to every state of the sequence; a fixed length keeps both the saved
# states (length / CUDA_CHUNK of them) and the per-chunk buffers bounded.
CHUNK_ELEMENTS = 2**21
MAX_CHUNK = 64
CUDA_CHUNK = 16


def chunk_length(batch: int, dim: int, d_state: int, device: torch.device | str = "cpu") -> int:
    """Steps per chunk for states of (batch, dim, d_state) on ``device``."""
    if torch.device(device).type == "cuda":
        return CUDA_CHUNK
    return max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // (batch * dim * d_state)))


def scan_chunked(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`starmamba.ops.scan_reference.scan_reference`.

    Shapes: u, dt (b, d, l); A (d, n); B, C (b, g, n, l). Returns y (b, d, l) and the last state
    (b, d, n); gradients flow to every input and through the last state too. ``chunk`` defaults to
    :func:`chunk_length`. Without gradients to compute, no chunk's entering state is kept.
    """
    chunk = chunk or chunk_length(u.shape[0], u.shape[1], A.shape[1], u.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, B, C)):
        return _ChunkedScan.apply(u, dt, A, B, C, chunk)
    y, last, _ = _forward(u, dt, A, B, C, chunk, keep_entering=False)
    return y, last


def _time_major(x: Tensor, groups: int) -> Tensor:
    """(b, d, l) -> contiguous (l, b, g, d/g, 1), so that every chunk is a dense slice."""
    batch, dim, length = x.shape
    return x.permute(2, 0, 1).contiguous().view(length, batch, groups, dim // groups, 1)


def _state_major(M: Tensor) -> Tensor:
    """(b, g, n, l) -> contiguous (l, b, g, 1, n): a row per group to broadcast over its channels."""
    return M.permute(3, 0, 1, 2).contiguous().unsqueeze(3)


def _from_time_major(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(l, ...) -> a contiguous tensor of the channel-first ``shape``: (b, d, l) or (b, g, n, l).

    Contiguous, because the elementwise ops around the scan run several times slower on the
    transposed view.
    """
    return x.reshape(x.shape[0], *shape[:-1]).permute(*range(1, len(shape)), 0).contiguous()


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


def _forward(u, dt, A, B, C, chunk: int, keep_entering: bool) -> tuple[Tensor, Tensor, Tensor]:
    """y, the last state and the state entering every chunk (with ``keep_entering``; else the last chunk's)."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    A_g = A.view(1, 1, groups, dim // groups, d_state)
    u_tm, dt_tm, B_tm = _time_major(u, groups), _time_major(dt, groups), _state_major(B)
    C_tm = _state_major(C)
    starts = list(range(0, length, chunk))
    buf_shape = (min(chunk, length), batch, groups, dim // groups, d_state)
    dA_buf, hs_buf = u.new_empty(buf_shape), u.new_empty(buf_shape)
    entering = u.new_empty((len(starts) if keep_entering else 1, *buf_shape[1:]))
    y = u.new_empty(length, batch, groups, dim // groups)
    h = u.new_zeros(buf_shape[1:])
    for k, t0 in enumerate(starts):
        t1 = min(t0 + chunk, length)
        dA, hs = dA_buf[: t1 - t0], hs_buf[: t1 - t0]
        slot = entering[k if keep_entering else 0]
        slot.copy_(h)
        _discretise(u_tm[t0:t1], dt_tm[t0:t1], A_g, B_tm[t0:t1], dA, hs)
        _recur(dA, hs, slot)
        y[t0:t1] = torch.einsum("tbgdn,tbgn->tbgd", hs, C_tm[t0:t1, :, :, 0])
        h = hs[-1]  # copied into the next slot before the buffers are reused
    return _from_time_major(y, u.shape), h.clone().reshape(batch, dim, d_state), entering


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, chunk):
        y, last, entering = _forward(u, dt, A, B, C, chunk, keep_entering=True)
        ctx.save_for_backward(u, dt, A, B, C, entering)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, dt, A, B, C, entering = ctx.saved_tensors
        chunk = ctx.chunk
        batch, dim, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        A_g = A.view(1, 1, groups, dim // groups, d_state)
        u_tm, dt_tm, B_tm = _time_major(u, groups), _time_major(dt, groups), _state_major(B)
        C_tm = _state_major(C)
        gy_tm = _time_major(grad_y if grad_y is not None else u.new_zeros(u.shape), groups)
        buf_shape = (min(chunk, length), batch, groups, dim // groups, d_state)
        dA_buf, hs_buf, lam_buf, m_buf = (u.new_empty(buf_shape) for _ in range(4))
        grad_u, grad_dt = torch.empty_like(u_tm), torch.empty_like(dt_tm)
        grad_B, grad_C = torch.empty_like(B_tm), torch.empty_like(C_tm)
        grad_A = torch.zeros_like(A_g[0, 0])
        # Gradient reaching the state after the last step of the chunk from later steps.
        carry = None if grad_last is None else grad_last.reshape(buf_shape[1:])
        for k in reversed(range(len(entering))):
            t0 = k * chunk
            t1 = min(t0 + chunk, length)
            steps = t1 - t0
            dA, hs, lam, m = dA_buf[:steps], hs_buf[:steps], lam_buf[:steps], m_buf[:steps]
            u_t, dt_t, B_row = u_tm[t0:t1], dt_tm[t0:t1], B_tm[t0:t1]
            _discretise(u_t, dt_t, A_g, B_row, dA, hs)
            _recur(dA, hs, entering[k])

            # lam[t] = dLoss/dh[t] = gy[t] C[t] + dA[t+1] lam[t+1], run backwards in time.
            torch.mul(gy_tm[t0:t1], C_tm[t0:t1], out=lam)
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
            lam_B = torch.einsum("tbgdn,tbgn->tbgd", lam, B_row[:, :, :, 0]).unsqueeze(-1)
            torch.mul(lam_B, dt_t, out=grad_u[t0:t1])
            torch.addcmul(torch.sum(torch.mul(m, A_g, out=dA), -1, keepdim=True), lam_B, u_t, out=grad_dt[t0:t1])
            grad_A += torch.mul(m, dt_t, out=dA).sum(dim=(0, 1))
            grad_B[t0:t1, :, :, 0] = torch.einsum("tbgd,tbgdn->tbgn", (dt_t * u_t)[..., 0], lam)
            grad_C[t0:t1, :, :, 0] = torch.einsum("tbgd,tbgdn->tbgn", gy_tm[t0:t1, ..., 0], hs)
        return (
            _from_time_major(grad_u, u.shape),
            _from_time_major(grad_dt, dt.shape),
            grad_A.reshape(dim, d_state),
            _from_time_major(grad_B, B.shape),
            _from_time_major(grad_C, C.shape),
            None,
        )
