"""Fused selective scan for CPUs, compiled by numba: the default CPU backend when numba imports.

One pass per (batch, channel block) does the discretisation, the recurrence and the C contraction
on data held in cache, with D and the z gate fused. Like mamba_ssm's CUDA kernel, the forward
pass keeps only the state entering each chunk of ``CHUNK`` steps and the backward pass recomputes
the states inside a chunk before running the adjoint recurrence backwards through it.

Why numba and why this shape (measured on 2 cores, see ``benchmarks/scan.py``):
- numba compiles at the first call (cached on disk), so nothing is compiled at install and no
  system compiler is needed; torch.compile needs a C++ compiler and compiled a loop version for
  minutes into something slower than the chunked PyTorch scan.
- The loop over a block of channels is innermost and contiguous, so LLVM vectorises it; numba
  calls a scalar ``expf`` for ``math.exp``, so float32 uses an own exp (:func:`fast_exp`) that
  vectorises.
- Arrays are indexed through slices taken per task or chunk (``row = src[b, g, t, j0 : j0 + nd]``,
  then ``row[j]``), never as ``src[..., j0 + j]``: numba wraps negative indices around, and for an
  index LLVM cannot prove non-negative that turns the vectorised loop into gathers (3x slower).
- Threads: a kernel releases the GIL and the tasks (batch x channel blocks) are split over
  ``torch.get_num_threads()`` Python threads. That is torch's own budget (no oversubscription; a
  DataLoader worker, which torch sets to one thread, runs inline), and, unlike numba's OpenMP
  layer, a pool of Python threads is safe in a forked child: it is rebuilt per process.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload
from torch import Tensor

# Steps per chunk (states kept for the backward pass) and channels per task. A task's buffers,
# 2 (CHUNK + 1) x d_state x BLOCK states and factors among them (~330 KB), then stay in a core's L2
# cache. Measured against 32, a chunk of 40 (one chunk for the small-scale finetune's 37 tokens) made
# forward + backward about 10% faster at 37 and 1280 tokens.
CHUNK = 40
BLOCK = 64
_JIT = {"nogil": True, "cache": True, "error_model": "numpy", "fastmath": {"contract", "reassoc", "nsz", "arcp"}}


@intrinsic
def _pow2(typingctx, biased_exponent):
    """2^(e - 127) as float32 for an int32 e in 1..254: e put in the exponent bits.

    Written in LLVM IR because numba widens int32 arithmetic to int64, which AVX2 cannot vectorise.
    """
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(args[0], ir.Constant(ir.IntType(32), 23)), ir.FloatType())

    return sig, codegen


def fast_exp(x):
    """exp(x); in numba, a vectorisable float32 version (max. relative error 9e-8, about one ulp, unbiased near 0)."""
    return math.exp(x)


@overload(fast_exp)
def _fast_exp(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp32(x):
        # exp(x) = 2^k exp(r), k = round(x / ln 2), |r| <= ln(2) / 2 (Cody-Waite split of ln 2); exp(r) =
        # 1 + r Q(r) with Q(0) = 1 and Q of degree 5, fitted to the relative error of exp on that range
        # (max. 9e-8 in float32) and evaluated by Horner, the last step one fused multiply-add. The exact
        # leading 1 + r makes a slow decay exp(dt A) near 1 correctly rounded: a polynomial fitted with a
        # free constant term (1 + 7e-8) biased every step of a slow decay alike, and the bias compounded
        # along the product of decays to relative errors of 1e-4 at 1000 steps. Horner's chain is longer
        # than Estrin's but has fewer operations, and the vectorised loop has independent lanes enough
        # to hide its latency (6% faster recurrence).
        x = min(max(x, np.float32(-87.0)), np.float32(88.0))
        biased = np.int32(x * np.float32(1.4426950408889634) + np.float32(127.5))  # k + 127, positive
        k = np.float32(biased) - np.float32(127.0)
        r = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        q = np.float32(1.3843636e-3) * r + np.float32(8.3741536e-3)
        q = q * r + np.float32(4.1668002e-2)
        q = q * r + np.float32(1.6666432e-1)
        q = q * r + np.float32(4.9999994e-1)
        q = q * r + np.float32(1.0)
        return (q * r + np.float32(1.0)) * _pow2(biased)

    return exp32


def fast_log1p(t):
    """log(1 + t) for t in [0, 1]; in numba, a vectorisable float32 version (max. relative error 2e-7)."""
    return math.log1p(t)


@overload(fast_log1p)
def _fast_log1p(t):
    if t != types.float32:
        return lambda t: math.log1p(t)

    def log1p32(t):
        # log(1 + t) = 2 atanh(q) with q = t / (2 + t) in [0, 1/3]: the odd series in q converges by a
        # factor q^2 <= 1/9 per term, so seven terms reach float32 precision, with no log to call.
        q = t / (np.float32(2.0) + t)
        q2 = q * q
        p = np.float32(1.0 / 13.0) + q2 * np.float32(1.0 / 15.0)
        p = np.float32(1.0 / 11.0) + q2 * p
        p = np.float32(1.0 / 9.0) + q2 * p
        p = np.float32(1.0 / 7.0) + q2 * p
        p = np.float32(1.0 / 5.0) + q2 * p
        p = np.float32(1.0 / 3.0) + q2 * p
        return np.float32(2.0) * q * (np.float32(1.0) + q2 * p)

    return log1p32


@numba.njit(**_JIT)
def _geometry(u, A, chunks, block):
    """(length, d_state, channels per group, blocks per group, steps per chunk) of a scan on u (b, g, l, d)."""
    length, dim_per_group = u.shape[2], u.shape[3]
    return length, A.shape[1], dim_per_group, -(-dim_per_group // block), -(-length // chunks)


@numba.njit(**_JIT)
def _task_channels(task, blocks_per_batch, blocks_per_group, dim_per_group, block):
    """(batch, group, block index, first channel in the group, end channel in the group) of a task."""
    b, blk = task // blocks_per_batch, task % blocks_per_batch
    g = blk // blocks_per_group
    j0 = (blk % blocks_per_group) * block
    return b, g, blk, j0, min(j0 + block, dim_per_group)


@numba.njit(**_JIT)
def _copy(dst, src, steps_outer):
    """dst[s, j] = src[s, j] over two 2-D views of one shape, the loop over s outside when ``steps_outer``:
    callers choose the order that walks their strided side (the caller's tensor) contiguously."""
    steps, width = src.shape
    if steps_outer:
        for s in range(steps):
            for j in range(width):
                dst[s, j] = src[s, j]
    else:
        for j in range(width):
            for s in range(steps):
                dst[s, j] = src[s, j]


@numba.njit(**_JIT)
def _gather(src, b, g, j0, nd, t0, steps, dst):
    """dst[s, j] = src[b, g, t0 + s, j0 + j], in the loop order that reads src contiguously."""
    _copy(dst[:steps, :nd], src[b, g, t0 : t0 + steps, j0 : j0 + nd], src.strides[3] <= src.strides[2])


@numba.njit(**_JIT)
def _scatter(src, b, g, j0, nd, t0, steps, dst):
    """dst[b, g, t0 + s, j0 + j] = src[s, j], in the loop order that writes dst contiguously."""
    _copy(dst[b, g, t0 : t0 + steps, j0 : j0 + nd], src[:steps, :nd], dst.strides[3] <= dst.strides[2])


@numba.njit(**_JIT)
def _gather_states(M, b, g, t0, steps, dst):
    """dst[s, n] = M[b, g, n, t0 + s] for B or C (b, g, n, l), in the loop order that reads M contiguously."""
    _copy(dst[:steps], M[b, g, :, t0 : t0 + steps].T, M.strides[2] <= M.strides[3])


@numba.njit(**_JIT)
def _load_chunk(b, g, j0, c0, nd, t0, steps, u, delta, bias, softplus, B, C, ut, dtt, dtu, dsp, Bt, Ct):
    """Time-major copies of one chunk: ut (steps, nd) = u; dtt = softplus(delta + bias) (or without the
    softplus), dtu = dtt * ut and dsp the derivative of dtt by the pre-activation; Bt, Ct (steps, n)."""
    zero, one = ut.dtype.type(0), ut.dtype.type(1)
    _gather(u, b, g, j0, nd, t0, steps, ut)
    _gather(delta, b, g, j0, nd, t0, steps, dtt)
    bias = bias[c0 : c0 + nd]
    for s in range(steps):
        for j in range(nd):
            dtt[s, j] += bias[j]
    if softplus:
        for s in range(steps):
            for j in range(nd):
                # softplus(x) = max(x, 0) + log(1 + e^-|x|), its derivative sigmoid(x); no overflow.
                x = dtt[s, j]
                e = fast_exp(-abs(x))
                dtt[s, j] = max(x, zero) + fast_log1p(e)
                dsp[s, j] = (one if x >= zero else e) / (one + e)
    else:
        for s in range(steps):
            for j in range(nd):
                dsp[s, j] = one
    for s in range(steps):
        for j in range(nd):
            dtu[s, j] = dtt[s, j] * ut[s, j]
    _gather_states(B, b, g, t0, steps, Bt)
    _gather_states(C, b, g, t0, steps, Ct)


@numba.njit(**_JIT)
def _recompute(steps, nd, At, dtt, dtu, Bt, dyt, H, E, dCt):
    """H[s + 1] = E[s] H[s] + dt u B with E[s] = exp(dt A), for a chunk (H[0] holds the entering state),
    and dCt[s, n] = sum over channels of dy[s] H[s + 1]: the gradient by C needs no adjoint state."""
    zero = dtt.dtype.type(0)
    for s in range(steps):
        for n in range(At.shape[0]):
            bn = Bt[s, n]
            sum_c = zero
            for j in range(nd):
                ea = fast_exp(dtt[s, j] * At[n, j])
                E[s, n, j] = ea
                hv = ea * H[s, n, j] + dtu[s, j] * bn
                H[s + 1, n, j] = hv
                sum_c += dyt[s, j] * hv
            dCt[s, n] = sum_c


@numba.njit(**_JIT)
def _buffers4(rows, cols, dtype):
    """Four (rows, cols) scratch arrays."""
    return (
        np.empty((rows, cols), dtype), np.empty((rows, cols), dtype),
        np.empty((rows, cols), dtype), np.empty((rows, cols), dtype),
    )  # fmt: skip


@numba.njit(**_JIT)
def _forward(lo, hi, chunks, block, keep, u, delta, bias, softplus, A, B, C, D, z, has_z, y, last, entering, pre_gate):
    """Tasks lo..hi-1 of the forward pass: y (b, g, l, d), last (b, g d, n) and, with ``keep``, what the
    backward pass needs: entering (b, chunks - 1, n, g d) and, with the z gate, the output before it,
    pre_gate (b, g, l, d)."""
    length, d_state, dim_per_group, blocks_per_group, chunk = _geometry(u, A, chunks, block)
    zero, one = u.dtype.type(0), u.dtype.type(1)
    At, h, _, _ = _buffers4(d_state, block, u.dtype)
    ut, dtt, yt, dsp = _buffers4(chunk, block, u.dtype)
    dtu, zt, _, _ = _buffers4(chunk, block, u.dtype)
    Bt, Ct = np.empty((chunk, d_state), u.dtype), np.empty((chunk, d_state), u.dtype)
    for task in range(lo, hi):
        b, g, _, j0, j1 = _task_channels(task, u.shape[1] * blocks_per_group, blocks_per_group, dim_per_group, block)
        nd, c0 = j1 - j0, g * dim_per_group + j0
        D_task = D[c0 : c0 + nd]
        for n in range(d_state):
            for j in range(nd):
                At[n, j] = A[c0 + j, n]
                h[n, j] = zero
        for k in range(chunks):
            t0 = k * chunk
            steps = min(chunk, length - t0)
            if keep and k > 0:
                for n in range(d_state):
                    row = entering[b, k - 1, n, c0 : c0 + nd]
                    for j in range(nd):
                        row[j] = h[n, j]
            _load_chunk(b, g, j0, c0, nd, t0, steps, u, delta, bias, softplus, B, C, ut, dtt, dtu, dsp, Bt, Ct)
            for s in range(steps):
                for j in range(nd):
                    yt[s, j] = D_task[j] * ut[s, j]
                for n in range(d_state):
                    bn, cn = Bt[s, n], Ct[s, n]
                    for j in range(nd):
                        hv = fast_exp(dtt[s, j] * At[n, j]) * h[n, j] + dtu[s, j] * bn
                        h[n, j] = hv
                        yt[s, j] += cn * hv
            if has_z:
                if keep:
                    _scatter(yt, b, g, j0, nd, t0, steps, pre_gate)
                _gather(z, b, g, j0, nd, t0, steps, zt)
                for s in range(steps):
                    for j in range(nd):
                        zv = zt[s, j]
                        yt[s, j] *= zv / (one + fast_exp(-zv))
            _scatter(yt, b, g, j0, nd, t0, steps, y)
        for n in range(d_state):
            for j in range(nd):
                last[b, c0 + j, n] = h[n, j]


@numba.njit(**_JIT)
def _backward(
    lo, hi, chunks, block, u, delta, bias, softplus, A, B, C, D, z, has_z, entering, pre_gate, gy, glast,
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part,
):  # fmt: skip
    """Tasks lo..hi-1 of the backward pass.

    du, ddelta, dz (b, g, l, d) are written whole; the parameter gradients as per-task partials that
    the caller sums in a fixed order: dA_part (b, g d, n), dB_part and dC_part (b, blocks, n, l),
    dD_part (b, g d).
    """
    length, d_state, dim_per_group, blocks_per_group, chunk = _geometry(u, A, chunks, block)
    zero, one = u.dtype.type(0), u.dtype.type(1)
    At, lam, dA_acc, _ = _buffers4(d_state, block, u.dtype)
    H, E = np.empty((chunk + 1, d_state, block), u.dtype), np.empty((chunk, d_state, block), u.dtype)
    ut, dtt, dtu, dsp = _buffers4(chunk, block, u.dtype)
    dut, ddt, dyt, _ = _buffers4(chunk, block, u.dtype)
    zt, gyt, pgt, dzt = _buffers4(chunk, block, u.dtype)
    through_a, lam_b, dD_acc = np.empty(block, u.dtype), np.empty(block, u.dtype), np.empty(block, u.dtype)
    Bt, Ct = np.empty((chunk, d_state), u.dtype), np.empty((chunk, d_state), u.dtype)
    dCt = np.empty((chunk, d_state), u.dtype)
    for task in range(lo, hi):
        b, g, blk, j0, j1 = _task_channels(task, u.shape[1] * blocks_per_group, blocks_per_group, dim_per_group, block)
        nd, c0 = j1 - j0, g * dim_per_group + j0
        D_task = D[c0 : c0 + nd]
        for n in range(d_state):
            for j in range(nd):
                At[n, j] = A[c0 + j, n]
                lam[n, j] = glast[b, c0 + j, n]
                dA_acc[n, j] = zero
        for j in range(nd):
            dD_acc[j] = zero
        for k in range(chunks - 1, -1, -1):
            t0 = k * chunk
            steps = min(chunk, length - t0)
            _load_chunk(b, g, j0, c0, nd, t0, steps, u, delta, bias, softplus, B, C, ut, dtt, dtu, dsp, Bt, Ct)
            if has_z:
                # Through the gate, y = pre_gate * silu(z), with pre_gate = C h + D u as the forward pass kept it.
                _gather(z, b, g, j0, nd, t0, steps, zt)
                _gather(gy, b, g, j0, nd, t0, steps, gyt)
                _gather(pre_gate, b, g, j0, nd, t0, steps, pgt)
                for s in range(steps):
                    for j in range(nd):
                        zv, gv = zt[s, j], gyt[s, j]
                        sig = one / (one + fast_exp(-zv))
                        dzt[s, j] = gv * pgt[s, j] * sig * (one + zv * (one - sig))
                        dyt[s, j] = gv * zv * sig
                _scatter(dzt, b, g, j0, nd, t0, steps, dz)
            else:
                _gather(gy, b, g, j0, nd, t0, steps, dyt)
            for n in range(d_state):
                for j in range(nd):
                    H[0, n, j] = zero
                if k > 0:
                    row = entering[b, k - 1, n, c0 : c0 + nd]
                    for j in range(nd):
                        H[0, n, j] = row[j]
            _recompute(steps, nd, At, dtt, dtu, Bt, dyt, H, E, dCt)
            for s in range(steps - 1, -1, -1):
                for j in range(nd):
                    through_a[j] = zero
                    lam_b[j] = zero
                for n in range(d_state):
                    cn, bn = Ct[s, n], Bt[s, n]
                    sum_b = zero
                    for j in range(nd):
                        # lam: dLoss/dh at step s; lam * exp(dt A) is what reaches step s - 1.
                        lv = lam[n, j] + dyt[s, j] * cn
                        carried = lv * E[s, n, j]
                        via_a = carried * H[s, n, j]
                        through_a[j] += via_a * At[n, j]
                        dA_acc[n, j] += via_a * dtt[s, j]
                        lam_b[j] += lv * bn
                        sum_b += lv * dtu[s, j]
                        lam[n, j] = carried
                    dB_part[b, blk, n, t0 + s] = sum_b
                    dC_part[b, blk, n, t0 + s] = dCt[s, n]
                # h[s + 1] = exp(dt A) h[s] + dt u B: dt and u reach the state through sum_n lam B.
                for j in range(nd):
                    dD_acc[j] += dyt[s, j] * ut[s, j]
                    dut[s, j] = dyt[s, j] * D_task[j] + lam_b[j] * dtt[s, j]
                    ddt[s, j] = (through_a[j] + lam_b[j] * ut[s, j]) * dsp[s, j]
            _scatter(ddt, b, g, j0, nd, t0, steps, ddelta)
            _scatter(dut, b, g, j0, nd, t0, steps, du)
        for j in range(nd):
            dD_part[b, c0 + j] = dD_acc[j]
            for n in range(d_state):
                dA_part[b, c0 + j, n] = dA_acc[n, j]


# (pid, workers, pool): a pool made before a fork is not used in the child, whose threads it lacks.
_pool: tuple[int, int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _parallel(kernel, tasks: int, *args) -> None:
    """Run ``kernel(lo, hi, *args)`` over task ranges on torch's thread budget (see module docstring)."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), tasks))
    bounds = np.linspace(0, tasks, threads + 1).round().astype(int)
    if threads == 1:
        kernel(0, tasks, *args)
        return
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < threads - 1:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), threads - 1, ThreadPoolExecutor(threads - 1, thread_name_prefix="starmamba-scan"))
        pool = _pool[2]
    futures = [pool.submit(kernel, lo, hi, *args) for lo, hi in itertools.pairwise(bounds[1:])]
    kernel(bounds[0], bounds[1], *args)
    for future in futures:
        future.result()


def _block(dim_per_group: int) -> int:
    """Channels per task: at most BLOCK, equal blocks where possible, a multiple of the 8 lanes of AVX2."""
    per_block = -(-dim_per_group // -(-dim_per_group // BLOCK))
    return min(dim_per_group, -(-per_block // 8) * 8)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _run_forward(u, delta, A, B, C, D, z, bias, softplus, keep):
    """The forward kernel over every task: (y, last, entering, pre_gate, block, tasks, chunks); without
    ``keep``, entering and pre_gate are not written (placeholders are returned)."""
    batch, groups, length, dim_per_group = u.shape
    block = _block(dim_per_group)
    tasks, chunks = batch * groups * -(-dim_per_group // block), -(-length // CHUNK)
    y = torch.empty_like(u)  # u's strides: the kernel writes the layout it reads
    last = u.new_empty(batch, groups * dim_per_group, A.shape[1])
    placeholder = u.new_empty(1, 1, 1, 1)
    # The state entering every chunk but the first, which starts from zero.
    entering = u.new_empty(batch, chunks - 1, A.shape[1], groups * dim_per_group) if keep else placeholder
    # Kept for the backward pass through the gate, as mamba_ssm keeps it: recomputing it cost more
    # than a fifth of the backward pass.
    pre_gate = torch.empty_like(u) if keep and z is not None else placeholder
    _parallel(_forward, tasks, chunks, block, keep, _np(u), _np(delta), _np(bias), softplus,
              *map(_np, (A, B, C, D, placeholder if z is None else z)), z is not None,
              *map(_np, (y, last, entering, pre_gate)))  # fmt: skip
    return y, last, entering, pre_gate, block, tasks, chunks


class _NumbaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus):
        y, last, entering, pre_gate, ctx.block, ctx.tasks, ctx.chunks = _run_forward(
            u, delta, A, B, C, D, z, bias, softplus, keep=True
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, entering, pre_gate)
        ctx.softplus = softplus
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, D, z, bias, entering, pre_gate = ctx.saved_tensors
        batch, groups, length, dim_per_group = u.shape
        dim, d_state = groups * dim_per_group, A.shape[1]
        blocks = ctx.tasks // batch
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y.to(u.dtype)
        grad_last = u.new_zeros(batch, dim, d_state) if grad_last is None else grad_last.to(u.dtype).contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        placeholder = u.new_empty(1, 1, 1, 1)
        dz = placeholder if z is None else torch.empty_like(u)
        dA_part, dD_part = u.new_empty(batch, dim, d_state), u.new_empty(batch, dim)
        dB_part, dC_part = (u.new_empty(batch, blocks, d_state, length) for _ in range(2))
        outputs = (du, ddelta, dz, dA_part, dB_part, dC_part, dD_part)
        _parallel(_backward, ctx.tasks, ctx.chunks, ctx.block, _np(u), _np(delta), _np(bias), ctx.softplus,
                  *map(_np, (A, B, C, D, placeholder if z is None else z)), z is not None,
                  *map(_np, (entering, pre_gate, grad_y, grad_last, *outputs)))  # fmt: skip
        dB = dB_part.view(batch, groups, blocks // groups, d_state, length).sum(2)
        dC = dC_part.view(batch, groups, blocks // groups, d_state, length).sum(2)
        dbias = ddelta.sum((0, 2)).flatten() if ctx.needs_input_grad[7] else None
        return du, ddelta, dA_part.sum(0), dB, dC, dD_part.sum(0), None if z is None else dz, dbias, None


def scan_numba_grouped(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`scan_numba` on tensors of any strides, with the channels split into groups.

    Shapes: u, delta, z (b, g, l, d), channel g d + j at [:, g, :, j]; B, C (b, g, n, l); A (g d, n);
    D, delta_bias (g d,). The kernel reads and writes these layouts as they are: the mixer's
    token-major (b, g, l, d) tensors need no transposed copies. Returns y (b, g, l, d) with u's
    strides and the last state (b, g d, n). When no gradient is wanted (no_grad, inference_mode,
    or no input that requires one) it runs the forward pass alone and keeps nothing for a backward.
    """
    dim = u.shape[1] * u.shape[3]
    D = u.new_zeros(dim) if D is None else D.contiguous()
    delta_bias = u.new_zeros(dim) if delta_bias is None else delta_bias.contiguous()
    args = (u, delta, A.contiguous(), B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _NumbaScan.apply(*args, delta_softplus)
    y, last, *_ = _run_forward(*args, delta_softplus, keep=False)
    return y, last


def scan_numba(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """The selective scan, discretisation step included: ``(C h + D u) * silu(z)`` with the state h.

    The step is dt = softplus(delta + delta_bias) (without softplus unless ``delta_softplus``).
    Shapes: u, delta, z (b, d, l) on the CPU; A (d, n); B, C (b, g, n, l) with g dividing d;
    D, delta_bias (d,). All of one dtype, float32 or float64.
    Returns y (b, d, l) and the last state (b, d, n); differentiable in every tensor.
    """
    groups = B.shape[1]

    def grouped(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.unflatten(1, (groups, -1)).transpose(2, 3)

    y, last = scan_numba_grouped(grouped(u), grouped(delta), A, B, C, D, grouped(z), delta_bias, delta_softplus)
    return y.transpose(2, 3).flatten(1, 2), last
