"""Fused selective scan for GPUs in Triton: forward and hand-written backward, nothing compiled at install.

Each program owns one batch element and a block of BLOCK_D channels, holds their (BLOCK_D, d_state)
state in fp32 registers and walks the sequence one step at a time, loading each step's inputs while
the step before computes. The (batch, length, dim) tensors are read time-major, so every step loads
one contiguous row of channels. Discretisation (softplus(delta + bias), exp(dt A)), the D skip and
the z gate happen inside the kernel.

Like mamba_ssm's CUDA kernel, the forward keeps only the state entering every CHUNK-th step. The
backward walks the chunks last to first: it recomputes a chunk's states into a small per-program
scratch buffer, then runs the adjoint recurrence backwards through it. Gradients that sum over
programs (A, B, C, D, delta_bias) are written as per-program partials and summed by torch
afterwards, so results are deterministic (no atomics). The backward's grid is as many programs as
fit on the GPU at once, from the compiled kernel's registers and shared memory. Without gradients
to compute, the forward keeps nothing for a backward pass.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors,
which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# Steps between the states the forward keeps. The backward's scratch holds CHUNK + 1 states per
# program and the forward keeps length / CHUNK of them; 32 keeps both to tens of MB at the paper's
# shapes. (Block sizes here are chosen by reasoning and ptxas reports, not yet timed on a GPU.)
CHUNK = 32
# Channel blocks, largest first: the launcher takes the largest that still yields MIN_PROGRAMS
# programs, so that short batches still fill the GPU while long ones launch fewer, wider programs.
BLOCK_D_CHOICES = (64, 32, 16)
MIN_PROGRAMS = 1024
# fp32 state values per thread, which sets num_warps up to MAX_WARPS. The backward takes ~130-170
# registers per thread whatever this is; with 8 warps ptxas (CUDA 12.8) held it to 128 and spilled.
VALUES_PER_THREAD = 4
MAX_WARPS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes of one scan launch: channels and (padded) states per program, and warps."""

    block_d: int
    block_n: int  # d_state padded to a power of two
    num_warps: int


def launch_config(batch: int, dim: int, groups: int, d_state: int) -> LaunchConfig:
    """Pick the block sizes for a scan of (batch, dim) channels with d_state states in ``groups`` groups.

    A channel block must lie within one group of B and C (their gradients are summed per block),
    so with groups > 1 BLOCK_D divides dim / groups.
    """
    rows = dim // groups
    widest = max(BLOCK_D_CHOICES[-1], triton.next_power_of_2(dim))
    choices = [bd for bd in BLOCK_D_CHOICES if bd <= widest and (groups == 1 or rows % bd == 0)]
    if choices:
        block_d = next((bd for bd in choices if batch * triton.cdiv(dim, bd) >= MIN_PROGRAMS), choices[-1])
    else:  # no block of 16+ divides a group (e.g. one group per channel): the largest power of two that does
        block_d = rows & -rows
    block_n = triton.next_power_of_2(d_state)
    num_warps = min(MAX_WARPS, max(1, block_d * block_n // (32 * VALUES_PER_THREAD)))
    return LaunchConfig(block_d, block_n, num_warps)


@dataclass(frozen=True)
class SmLimits:
    """What one streaming multiprocessor holds at once: threads, shared memory (bytes), 32-bit registers
    (64K on every NVIDIA GPU from sm_50 to sm_120) and programs (32 on sm_80 and sm_90)."""

    max_threads: int
    shared_bytes: int
    registers: int = 65536
    max_programs: int = 32

    @classmethod
    def of(cls, device: torch.device) -> SmLimits:
        props = torch.cuda.get_device_properties(device)
        return cls(props.max_threads_per_multi_processor, props.shared_memory_per_multiprocessor)


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int, sm: SmLimits) -> int:
    """Programs of ``num_warps`` warps that fit on one SM together, when each thread takes ``registers``
    registers and each program ``shared_bytes`` of shared memory (both as the compiled kernel reports)."""
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated to a warp 256 at a time
    fits = [sm.registers // (per_warp * num_warps), sm.max_threads // (32 * num_warps), sm.max_programs]
    if shared_bytes:
        fits.append(sm.shared_bytes // shared_bytes)
    return max(1, min(fits))


def triton_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the Triton scan can run on tensors on ``device``, and if not, why."""
    device = torch.device(device)
    if device.type == "cpu":
        if _INTERPRETED:
            return True, "Triton's interpreter runs the kernels on CPU tensors"
        return False, (
            "on CPU tensors the Triton kernels need TRITON_INTERPRET=1 set before starmamba.ops.scan_triton is imported"
        )
    if device.type != "cuda":
        return False, f"the Triton scan runs on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available to torch"
    if torch.version.cuda is not None and torch.cuda.get_device_capability(device) < (7, 0):
        return False, f"Triton needs compute capability 7.0 or newer, {torch.cuda.get_device_name(device)} has less"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name(device)}"


def scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_ssm's ``selective_scan_fn`` with B and C already grouped, in fused Triton kernels.

    Shapes: u, delta, z (b, d, l) in fp32, bf16 or fp16; A (d, n) real; B, C (b, g, n, l) with the
    same g dividing d; D, delta_bias (d,). Returns y (b, d, l) in u's dtype (a view of a time-major
    buffer), and with ``return_last_state`` also the last state (b, d, n) in fp32. The state is
    always fp32. Differentiable in every tensor argument, including through the last state.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    with _on_device(u.device):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            y, last = _TritonScan.apply(*inputs, bool(delta_softplus))
        else:  # nothing to keep for a backward pass: no chunk states, no saved inputs
            y, last, _ = _forward(*inputs, bool(delta_softplus), keep_chunks=False)
    return (y, last) if return_last_state else y


def _on_device(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device, whatever the tensors' device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or u.shape[-1] < 1:
        raise ValueError(f"u must be (batch, dim, length) with length >= 1, got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if u.dtype not in DTYPES:
        raise TypeError(f"the Triton scan takes float32, bfloat16 or float16 inputs, got u of {u.dtype}")
    if A.is_complex() or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be real (dim={dim}, d_state), got {A.dtype} of shape {tuple(A.shape)}")
    d_state = A.shape[1]
    if B.dim() != 4 or B.shape != C.shape or B.shape[0] != batch or B.shape[2:] != (d_state, length):
        raise ValueError(
            f"B and C must both be (batch={batch}, groups, d_state={d_state}, length={length}), "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    if dim % B.shape[1]:
        raise ValueError(f"the {B.shape[1]} groups of B and C must divide dim={dim}")
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got shape {tuple(t.shape)}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
        if t is not None and t.dtype not in DTYPES:
            raise TypeError(f"the Triton scan takes float32, bfloat16 or float16 tensors, got {name} of {t.dtype}")
    ok, why = triton_status(u.device)
    if not ok:
        raise RuntimeError(f"the Triton scan cannot run: {why}")


def _time_major(x: Tensor) -> Tensor:
    """(b, d, l) -> contiguous (b, l, d) memory; free when x already is a transposed view of one."""
    return x.transpose(1, 2).contiguous()


def _state_rows(M: Tensor) -> Tensor:
    """(b, g, n, l) -> contiguous (b, g, l, n): one row of states per step."""
    return M.transpose(2, 3).contiguous()


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, keep_chunks: bool):
    """y (b, d, l) in u's dtype, the last state (b, d, n) fp32, and what the backward needs: the kernel's
    inputs and the state entering every chunk (``keep_chunks``), or None."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    cfg = launch_config(batch, dim, groups, d_state)
    u_tm, delta_tm = _time_major(u), _time_major(delta)
    z_tm = _time_major(z) if z is not None else None
    # The kernels take a power-of-two number of states: zeros in A, B and C pad it exactly.
    pad = (0, cfg.block_n - d_state)
    B_tm, C_tm = F.pad(_state_rows(B), pad), F.pad(_state_rows(C), pad)
    A32 = F.pad(A.detach().float(), pad).contiguous()
    D32 = D.detach().float().contiguous() if D is not None else None
    bias32 = delta_bias.detach().float().contiguous() if delta_bias is not None else None
    n_chunks = triton.cdiv(length, CHUNK)
    y_tm = torch.empty_like(u_tm)
    states = u.new_empty((batch, n_chunks + 1 if keep_chunks else 1, dim, cfg.block_n), dtype=torch.float32)
    n_blocks = triton.cdiv(dim, cfg.block_d)
    _scan_fwd_kernel[(batch * n_blocks,)](
        u_tm, delta_tm, A32, B_tm, C_tm, _or(D32, A32), _or(z_tm, u_tm), _or(bias32, A32), y_tm, states,
        dim, length, dim // groups, groups, n_blocks,
        D_STATE=cfg.block_n, CHUNK=CHUNK, BLOCK_D=cfg.block_d, KEEP_CHUNKS=keep_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    last = states[:, -1, :, :d_state].clone()
    saved = (u_tm, delta_tm, A32, B_tm, C_tm, D32, z_tm, bias32, states) if keep_chunks else None
    return y_tm.transpose(1, 2), last, saved


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        y, last, saved = _forward(u, delta, A, B, C, D, z, delta_bias, softplus, keep_chunks=True)
        ctx.save_for_backward(*saved)
        ctx.softplus, ctx.cfg = softplus, launch_config(u.shape[0], u.shape[1], B.shape[1], A.shape[1])
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (A, B, C, D, delta_bias))
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u_tm, delta_tm, A32, B_tm, C_tm, D32, z_tm, bias32, states = ctx.saved_tensors
        cfg: LaunchConfig = ctx.cfg
        batch, length, dim = u_tm.shape
        groups, d_state, n_padded = B_tm.shape[1], grad_last.shape[-1], cfg.block_n
        n_blocks, tiles = triton.cdiv(dim, cfg.block_d), batch * triton.cdiv(dim, cfg.block_d)
        gy_tm = _time_major(grad_y)
        glast = F.pad(grad_last.float(), (0, n_padded - d_state)).contiguous()
        du_tm, ddelta_tm = torch.empty_like(u_tm), torch.empty_like(delta_tm)
        dz_tm = torch.empty_like(z_tm) if z_tm is not None else None
        f32 = {"dtype": torch.float32, "device": u_tm.device}
        dA_part = torch.empty(batch, dim, n_padded, **f32)
        dB_part = torch.empty(batch, n_blocks, length, n_padded, **f32)
        dC_part = torch.empty(batch, n_blocks, length, n_padded, **f32)
        dD_part = torch.empty(batch, dim, **f32)
        dbias_part = torch.empty(batch, dim, **f32)
        args = (
            u_tm, delta_tm, A32, B_tm, C_tm, _or(D32, A32), _or(z_tm, u_tm), _or(bias32, A32), gy_tm, states, glast,
            du_tm, ddelta_tm, _or(dz_tm, du_tm), dA_part, dB_part, dC_part, dD_part, dbias_part,
        )  # fmt: skip
        sizes = (dim, length, dim // groups, groups, n_blocks, tiles)
        options = dict(
            D_STATE=n_padded, CHUNK=CHUNK, BLOCK_D=cfg.block_d,
            HAS_D=D32 is not None, HAS_Z=z_tm is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=ctx.softplus,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        with _on_device(u_tm.device):
            programs = _backward_programs(tiles, u_tm.device, cfg, args, sizes, options)
            scratch = torch.empty(programs, CHUNK + 1, cfg.block_d, cfg.block_n, **f32)
            _scan_bwd_kernel[(programs,)](*args, scratch, *sizes, **options)
        A_dtype, B_dtype, C_dtype, D_dtype, bias_dtype = ctx.dtypes
        # Channel blocks of one group are consecutive, so a group's partials are one slice of blocks.
        per_group = (batch, groups, n_blocks // groups, length, n_padded)
        return (
            du_tm.transpose(1, 2),
            ddelta_tm.transpose(1, 2),
            dA_part[..., :d_state].sum(0).to(A_dtype),
            dB_part.view(per_group)[..., :d_state].sum(2).transpose(2, 3).to(B_dtype),
            dC_part.view(per_group)[..., :d_state].sum(2).transpose(2, 3).to(C_dtype),
            dD_part.sum(0).to(D_dtype) if D32 is not None else None,
            dz_tm.transpose(1, 2) if dz_tm is not None else None,
            dbias_part.sum(0).to(bias_dtype) if bias32 is not None else None,
            None,
        )


_PER_SM: dict[tuple, int] = {}


def _backward_programs(tiles: int, device: torch.device, cfg: LaunchConfig, args: tuple, sizes: tuple,
                       options: dict) -> int:  # fmt: skip
    """The backward's grid: as many programs as fit on the GPU at once (it loops over tiles, so its scratch
    buffer is bounded by the GPU's size instead of growing with batch x channels), at most ``tiles``.

    How many fit on an SM follows from the compiled kernel's registers and shared memory, read once per
    device and specialisation. Interpreted (on CPU), one program per tile.
    """
    if device.type != "cuda":
        return tiles
    key = (device, cfg, *(t.dtype for t in args), *sorted(options.items()))
    if key not in _PER_SM:
        # The scratch's size does not change the compiled code; any fp32 buffer stands in for it.
        kernel = _scan_bwd_kernel.warmup(*args, args[-1], *sizes, grid=(1,), **options)
        kernel._init_handles()
        _PER_SM[key] = programs_per_sm(kernel.n_regs, kernel.metadata.shared, cfg.num_warps, SmLimits.of(device))
    return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count * _PER_SM[key])


def _or(t: Tensor | None, placeholder: Tensor) -> Tensor:
    """A tensor for a pointer argument the kernel never reads (its HAS_ flag is off)."""
    return t if t is not None else placeholder


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) as torch computes it (x itself above 20), accurate for very negative x too."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    # log1p(e) = log(w) * e / (w - 1) corrects the rounding of 1 + e (Goldberg); e itself when w rounds to 1.
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _discretise(u_raw, delta_raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One step's u and dt in fp32 from their loaded values, and delta + bias, the argument of softplus."""
    dt_in = delta_raw.to(tl.float32)
    if HAS_BIAS:
        dt_in += bias
    dt = _softplus(dt_in) if SOFTPLUS else dt_in
    return u_raw.to(tl.float32), dt, dt_in


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, states_ptr,
    dim, length, rows_per_group, groups, n_blocks,
    D_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, KEEP_CHUNKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """y for one (batch, channel block); keeps the last state and with KEEP_CHUNKS the state entering every chunk.

    u, delta, z, y: (b, l, d) contiguous; A (d, n), D and bias (d,) fp32; B, C (b, g, l, n)
    contiguous; states (b, chunks + 1, d, n) fp32, or (b, 1, d, n) without KEEP_CHUNKS.
    """
    pid = tl.program_id(0)
    batch = (pid // n_blocks).to(tl.int64)
    first_row = (pid % n_blocks) * BLOCK_D
    rows = first_row + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, D_STATE)
    mask_d = rows < dim
    state_offsets = rows[:, None] * D_STATE + cols[None, :]  # of this block in a (d, n) state

    A = tl.load(A_ptr + state_offsets, mask=mask_d[:, None], other=0.0)
    D = tl.load(D_ptr + rows, mask=mask_d, other=0.0) if HAS_D else 0.0
    bias = tl.load(bias_ptr + rows, mask=mask_d, other=0.0) if HAS_BIAS else 0.0
    # Scalar base pointers of this batch element (and group), so that per-step offsets stay 32-bit.
    seq_offset = batch * length * dim
    u_seq, delta_seq, z_seq, y_seq = u_ptr + seq_offset, delta_ptr + seq_offset, z_ptr + seq_offset, y_ptr + seq_offset
    bc_offset = (batch * groups + first_row // rows_per_group) * length * D_STATE
    B_seq, C_seq = B_ptr + bc_offset, C_ptr + bc_offset
    n_chunks = tl.cdiv(length, CHUNK)
    n_kept = n_chunks + 1 if KEEP_CHUNKS else 1
    states = states_ptr + batch * n_kept * dim * D_STATE

    h = tl.zeros((BLOCK_D, D_STATE), dtype=tl.float32)
    # Every step's inputs are loaded one step ahead (the last step's twice), so that their latency
    # hides behind the previous step's arithmetic instead of stalling the recurrence.
    u_next = tl.load(u_seq + rows, mask=mask_d, other=0.0)
    delta_next = tl.load(delta_seq + rows, mask=mask_d, other=0.0)
    z_next = tl.load(z_seq + rows, mask=mask_d, other=0.0)  # z_seq is u's when there is no z
    B_next, C_next = tl.load(B_seq + cols), tl.load(C_seq + cols)
    for chunk in range(0, n_chunks):
        if KEEP_CHUNKS:
            tl.store(states + chunk * dim * D_STATE + state_offsets, h, mask=mask_d[:, None])
        for t in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, length)):
            u_raw, delta_raw, z_raw, B_raw, C_raw = u_next, delta_next, z_next, B_next, C_next
            ahead = tl.minimum(t + 1, length - 1)
            u_next = tl.load(u_seq + ahead * dim + rows, mask=mask_d, other=0.0)
            delta_next = tl.load(delta_seq + ahead * dim + rows, mask=mask_d, other=0.0)
            if HAS_Z:
                z_next = tl.load(z_seq + ahead * dim + rows, mask=mask_d, other=0.0)
            B_next, C_next = tl.load(B_seq + ahead * D_STATE + cols), tl.load(C_seq + ahead * D_STATE + cols)

            u_t, dt, _ = _discretise(u_raw, delta_raw, bias, HAS_BIAS, SOFTPLUS)
            B_t, C_t = B_raw.to(tl.float32), C_raw.to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_t[None, :]
            y_t = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y_t += D * u_t
            if HAS_Z:
                z_t = z_raw.to(tl.float32)
                y_t *= z_t * tl.sigmoid(z_t)
            tl.store(y_seq + t * dim + rows, y_t, mask=mask_d)
    tl.store(states + (n_kept - 1) * dim * D_STATE + state_offsets, h, mask=mask_d[:, None])


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gy_ptr, states_ptr, glast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, scratch_ptr,
    dim, length, rows_per_group, groups, n_blocks, n_tiles,
    D_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Gradients for (batch, channel block) tiles, each program looping over tiles with a stride of the grid.

    Layouts as in the forward; gy, du, ddelta, dz (b, l, d); glast (b, d, n) fp32. Partials summed
    by the caller: dA, dD, dbias per batch (b, d, n) / (b, d); dB, dC per channel block
    (b, blocks, l, n). scratch (programs, CHUNK + 1, BLOCK_D, n) fp32.
    """
    pid = tl.program_id(0)
    local_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, D_STATE)
    tile_offsets = local_d[:, None] * D_STATE + cols[None, :]  # in one scratch slot
    scratch = scratch_ptr + pid.to(tl.int64) * (CHUNK + 1) * BLOCK_D * D_STATE
    n_chunks = tl.cdiv(length, CHUNK)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        batch = (tile // n_blocks).to(tl.int64)
        block = tile % n_blocks
        first_row = block * BLOCK_D
        rows = first_row + local_d
        mask_d = rows < dim
        state_offsets = rows[:, None] * D_STATE + cols[None, :]
        A = tl.load(A_ptr + state_offsets, mask=mask_d[:, None], other=0.0)
        D = tl.load(D_ptr + rows, mask=mask_d, other=0.0) if HAS_D else 0.0
        bias = tl.load(bias_ptr + rows, mask=mask_d, other=0.0) if HAS_BIAS else 0.0
        seq_offset = batch * length * dim
        u_seq, delta_seq, gy_seq = u_ptr + seq_offset, delta_ptr + seq_offset, gy_ptr + seq_offset
        du_seq, ddelta_seq = du_ptr + seq_offset, ddelta_ptr + seq_offset
        z_seq, dz_seq = z_ptr + seq_offset, dz_ptr + seq_offset
        bc_offset = (batch * groups + first_row // rows_per_group) * length * D_STATE
        B_seq, C_seq = B_ptr + bc_offset, C_ptr + bc_offset
        partial_offset = (batch * n_blocks + block) * length * D_STATE  # this tile's dB, dC partials
        dB_seq, dC_seq = dB_ptr + partial_offset, dC_ptr + partial_offset
        states = states_ptr + batch * (n_chunks + 1) * dim * D_STATE
        batch_dn = batch * dim * D_STATE

        # lam: gradient of the loss w.r.t. the state after the current step, from all later steps.
        lam = tl.load(glast_ptr + batch_dn + state_offsets, mask=mask_d[:, None], other=0.0)
        dA_acc = tl.zeros((BLOCK_D, D_STATE), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for reversed_chunk in range(0, n_chunks):
            chunk = n_chunks - 1 - reversed_chunk
            t0 = chunk * CHUNK
            steps = tl.minimum(CHUNK, length - t0)
            # Recompute the chunk's states: slot j of the scratch holds the state before step t0 + j.
            h = tl.load(states + chunk * dim * D_STATE + state_offsets, mask=mask_d[:, None], other=0.0)
            tl.store(scratch + tile_offsets, h)
            # Inputs loaded one step ahead, as in the forward.
            u_next = tl.load(u_seq + t0 * dim + rows, mask=mask_d, other=0.0)
            delta_next = tl.load(delta_seq + t0 * dim + rows, mask=mask_d, other=0.0)
            B_next = tl.load(B_seq + t0 * D_STATE + cols)
            for j in range(0, steps):
                u_raw, delta_raw, B_raw = u_next, delta_next, B_next
                ahead = t0 + tl.minimum(j + 1, steps - 1)
                u_next = tl.load(u_seq + ahead * dim + rows, mask=mask_d, other=0.0)
                delta_next = tl.load(delta_seq + ahead * dim + rows, mask=mask_d, other=0.0)
                B_next = tl.load(B_seq + ahead * D_STATE + cols)
                u_t, dt, _ = _discretise(u_raw, delta_raw, bias, HAS_BIAS, SOFTPLUS)
                h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * B_raw.to(tl.float32)[None, :]
                tl.store(scratch + (j + 1) * BLOCK_D * D_STATE + tile_offsets, h)
            # Triton may give the loads below another thread layout than the stores above.
            tl.debug_barrier()
            for i in range(0, steps):
                j = steps - 1 - i
                t = t0 + j
                u_t, dt, dt_in = _discretise(
                    tl.load(u_seq + t * dim + rows, mask=mask_d, other=0.0),
                    tl.load(delta_seq + t * dim + rows, mask=mask_d, other=0.0), bias, HAS_BIAS, SOFTPLUS,
                )  # fmt: skip
                B_t = tl.load(B_seq + t * D_STATE + cols).to(tl.float32)
                C_t = tl.load(C_seq + t * D_STATE + cols).to(tl.float32)
                gy = tl.load(gy_seq + t * dim + rows, mask=mask_d, other=0.0).to(tl.float32)
                h_prev = tl.load(scratch + j * BLOCK_D * D_STATE + tile_offsets)
                if HAS_Z:
                    z_t = tl.load(z_seq + t * dim + rows, mask=mask_d, other=0.0).to(tl.float32)
                    y_t = tl.sum(h * C_t[None, :], axis=1)
                    if HAS_D:
                        y_t += D * u_t
                    sig_z = tl.sigmoid(z_t)
                    tl.store(dz_seq + t * dim + rows, gy * y_t * sig_z * (1.0 + z_t * (1.0 - sig_z)), mask=mask_d)
                    gy = gy * z_t * sig_z
                tl.store(dC_seq + t * D_STATE + cols, tl.sum(gy[:, None] * h, axis=0))
                lam += gy[:, None] * C_t[None, :]
                dA_t = tl.exp(dt[:, None] * A)
                # h_t = dA_t h_{t-1} + dt u_t B_t, with dA_t = exp(dt A)
                lam_dA_h = lam * dA_t * h_prev
                dA_acc += lam_dA_h * dt[:, None]
                lam_B = tl.sum(lam * B_t[None, :], axis=1)
                ddt = tl.sum(lam_dA_h * A, axis=1) + lam_B * u_t
                du = lam_B * dt
                if HAS_D:
                    du += D * gy
                    dD_acc += gy * u_t
                tl.store(dB_seq + t * D_STATE + cols, tl.sum(lam * (dt * u_t)[:, None], axis=0))
                if SOFTPLUS:
                    ddt *= tl.sigmoid(dt_in)
                dbias_acc += ddt
                tl.store(du_seq + t * dim + rows, du, mask=mask_d)
                tl.store(ddelta_seq + t * dim + rows, ddt, mask=mask_d)
                lam *= dA_t
                h = h_prev
            # The next chunk overwrites the scratch that slower threads may still be reading.
            tl.debug_barrier()
        tl.store(dA_ptr + batch_dn + state_offsets, dA_acc, mask=mask_d[:, None])
        if HAS_D:
            tl.store(dD_ptr + batch * dim + rows, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + batch * dim + rows, dbias_acc, mask=mask_d)


# triton.jit makes interpreted kernels when TRITON_INTERPRET=1 is set at decoration time.
_INTERPRETED = not isinstance(_scan_fwd_kernel, triton.runtime.JITFunction)
