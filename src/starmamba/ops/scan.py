"""``selective_scan``: mamba_ssm's ``selective_scan_fn`` contract, with a choice of backends."""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from starmamba.ops.scan_chunked import scan_chunked
from starmamba.ops.scan_cuda import mamba_ssm_scan
from starmamba.ops.scan_reference import scan_reference

Backend = Literal["numba", "triton", "mamba_ssm", "chunked", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
BACKEND_ENV = "STARMAMBA_SCAN_BACKEND"
# Tried in this order by "auto"; chunked (pure PyTorch) runs everywhere and ends both lists.
AUTO_ORDER = {"cpu": ("numba", "chunked"), "cuda": ("mamba_ssm", "triton", "chunked")}
_CORES = {"chunked": scan_chunked, "reference": scan_reference}
_warned: set[tuple[str, torch.device]] = set()


@functools.cache
def _kernel_module(name: str) -> tuple[object | None, str]:
    """Import a JIT-kernel backend's module on first use: (module, "") or (None, why not).

    Lazily, because importing numba or triton costs a second, and TRITON_INTERPRET must be set
    before the Triton kernels are defined.
    """
    try:
        return importlib.import_module(f"starmamba.ops.scan_{name}"), ""
    except ImportError as error:
        return None, f"{name} is not importable ({error})"


def _unavailable(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Why backend ``name`` cannot run on ``device`` with inputs of ``dtype``; "" when it can."""
    if name == "mamba_ssm":
        return mamba_ssm_scan(device.index or 0)[1] if device.type == "cuda" else f"tensors are on {device}"
    if name == "numba":
        return _kernel_module("numba")[1] if device.type == "cpu" else f"it runs on CPU tensors, not {device}"
    if name == "triton":
        if dtype == torch.float64:
            return "it computes in float32 (chunked and reference take float64)"
        module, why = _kernel_module("triton")
        if why:
            return why
        runs, why = module.triton_status(device)
        return "" if runs else why
    return ""


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """Every backend that runs on ``device`` with inputs of ``dtype``, fused kernels first."""
    return [name for name in BACKENDS if not _unavailable(name, device, dtype)]


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Name the backend that runs on ``device`` and ``dtype``: ``backend``, else $STARMAMBA_SCAN_BACKEND, else auto.

    Auto takes the first that runs of numba, chunked on a CPU and of mamba_ssm, triton, chunked on
    CUDA, warning once per device when it passes over a fused kernel.
    """
    source = "backend="
    if backend is None and os.environ.get(BACKEND_ENV):
        backend, source = os.environ[BACKEND_ENV], f"${BACKEND_ENV}="
    name = backend or "auto"
    if name not in (*BACKENDS, "auto"):
        raise ValueError(
            f"unknown selective-scan backend {source}{name!r}; choose one of {', '.join(BACKENDS)} or auto"
        )
    if name != "auto":
        why = _unavailable(name, device, dtype)
        if why:
            raise RuntimeError(f"the {name} scan backend cannot run: {why}")
        return name
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, ("chunked",)):
        why = _unavailable(candidate, device, dtype)
        if not why:
            break
        skipped.append(f"{candidate}: {why}")
    # mamba_ssm is an optional extra on CUDA: missing it is worth a word only when triton is missing too.
    if candidate == "chunked" and skipped and (candidate, device) not in _warned:
        _warned.add((candidate, device))
        warnings.warn(f"falling back to the chunked PyTorch selective scan on {device} ({'; '.join(skipped)})",
                      stacklevel=3)  # fmt: skip
    return candidate


def selective_scan(
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
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan of Mamba, with the semantics and argument order of mamba_ssm.

    For batch b, channel d, state n and step t::

        dt = softplus(delta + delta_bias)            (softplus only if delta_softplus)
        h_t = exp(dt_t A[d, n]) h_{t-1} + dt_t B[n, t] u_t
        y_t = sum_n C[n, t] h_t[n] + D[d] u_t,  then y * silu(z) if z is given

    Shapes: u, delta, z (b, d, l); A (d, n), real; B, C (b, n, l), or (b, g, n, l) with g groups
    of channels, or (d, n) for a time-invariant B or C; D, delta_bias (d,).
    Returns y (b, d, l) in u's dtype, and with ``return_last_state`` also h_{l-1} (b, d, n).
    Computes in float32 (float64 for float64 inputs) and is differentiable in every tensor.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device, u.dtype)
    if name == "mamba_ssm":
        fn, _ = mamba_ssm_scan(u.device.index or 0)
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    B, C = _grouped(B, C, u)
    if name == "triton":
        fn: Callable = _kernel_module("triton")[0].scan_triton
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype = torch.promote_types(u.dtype, torch.float32)
    u_c, dt = u.to(dtype), delta.to(dtype)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    if name == "numba":  # the step's bias and softplus, D and the z gate are fused into the kernel
        D, z, delta_bias = (None if t is None else t.to(dtype) for t in (D, z, delta_bias))
        y, last_state = _kernel_module("numba")[0].scan_numba(u_c, dt, A, B, C, D, z, delta_bias, delta_softplus)
    else:
        if delta_bias is not None:
            dt = dt + delta_bias.to(dtype)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        # The cores' matmuls in float32 under autocast too: in bf16 the chunked scan's error grows 20000-fold.
        with torch.autocast(u.device.type, enabled=False):
            y, last_state = _CORES[name](u_c, dt, A, B, C)
        if D is not None:
            y = y + u_c * D.to(dtype)[:, None]
        if z is not None:
            y = y * F.silu(z.to(dtype))
    y = y.to(u.dtype)
    return (y, last_state) if return_last_state else y


def selective_scan_tokens(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """:func:`selective_scan` on token-major tensors in groups of channels, as the 4-scan mixer holds them.

    Shapes: u, delta (b, g, l, d), channel g d + j at [:, g, :, j]; B, C (b, g, l, n), one per group;
    A (g d, n); D, delta_bias (g d,). Returns y (b, g, l, d) in u's dtype. The numba kernel reads
    and writes this layout as it is; the other backends get (b, g d, l) copies.
    """
    batch, groups, length, dim = u.shape
    if delta.shape != u.shape or B.shape[:3] != (batch, groups, length) or C.shape != B.shape:
        raise ValueError(f"u, delta (b, g, l, d) and B, C (b, g, l, n) disagree: {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")  # fmt: skip
    name = resolve_backend(backend, u.device, u.dtype)
    if name != "numba":
        y = selective_scan(*(t.permute(0, 1, 3, 2).flatten(1, 2) for t in (u, delta)), A, B.transpose(2, 3),
                           C.transpose(2, 3), D, None, delta_bias, delta_softplus, backend=name)  # fmt: skip
        return y.unflatten(1, (groups, dim)).transpose(2, 3)
    dtype = torch.promote_types(u.dtype, torch.float32)
    u_c, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B.transpose(2, 3), C.transpose(2, 3)))
    D, delta_bias = (None if t is None else t.to(dtype) for t in (D, delta_bias))
    y, _ = _kernel_module("numba")[0].scan_numba_grouped(u_c, delta, A, B, C, D, None, delta_bias, delta_softplus)
    return y.to(u.dtype)


def _grouped(B: Tensor, C: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Bring B and C to (b, g, n, l) with one g for both (one group per channel where they differ)."""
    batch, dim, length = u.shape

    def four_dims(M: Tensor) -> Tensor:
        if M.dim() == 3:
            return M.unsqueeze(1)
        if M.dim() == 2:
            return M.view(1, dim, -1, 1).expand(batch, dim, M.shape[1], length)
        return M

    B, C = four_dims(B), four_dims(C)
    if B.shape[1] != C.shape[1]:
        B, C = (M.repeat_interleave(dim // M.shape[1], dim=1) for M in (B, C))
    return B, C


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError("u has an empty sequence (length 0)")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported; Mamba-1 vision models use a real A")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, d_state), got shape {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got shape {tuple(t.shape)}")
    for name, M in (("B", B), ("C", C)):
        ok = (
            (M.dim() == 3 and M.shape == (batch, d_state, length))
            or (
                M.dim() == 4
                and M.shape[0] == batch
                and M.shape[2:] == (d_state, length)
                and M.shape[1] > 0
                and dim % M.shape[1] == 0
            )
            or (M.dim() == 2 and M.shape == (dim, d_state))
        )
        if not ok:
            raise ValueError(
                f"{name} must be (batch, d_state, length), (batch, groups, d_state, length) with groups "
                f"dividing dim, or (dim, d_state); got {tuple(M.shape)} "
                f"for u {tuple(u.shape)} and A {tuple(A.shape)}"
            )
