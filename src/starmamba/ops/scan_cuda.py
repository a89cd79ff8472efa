"""mamba_ssm's fused CUDA selective scan, when it is installed with its kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.cache
def mamba_ssm_scan(device_index: int) -> tuple[Callable | None, str]:
    """Return (mamba_ssm's ``selective_scan_fn``, "") if it runs on that CUDA device, else (None, why).

    mamba-ssm is published as a source distribution only; an install that did not build the Mamba-1
    kernel (no nvcc, or mamba's main branch since July 2026 without MAMBA_KEEP_CUDA_BUILD=TRUE, an
    opt-in not yet in a release) imports but fails when called, so a tiny call is made once per
    device to find out.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # any import failure means the package cannot serve us
        return None, f"mamba_ssm is not importable ({type(error).__name__}: {error})"
    device = torch.device("cuda", device_index)
    try:
        ones = torch.ones(1, 1, 4, device=device)
        selective_scan_fn(ones, ones, -ones[0, :, :1], ones[:, :1], ones[:, :1])
    except Exception as error:  # the kernel is missing or broken: fall back, say why
        return None, (
            f"mamba_ssm's CUDA selective scan failed on {device} ({type(error).__name__}: {error}); "
            "build it from source with nvcc to use it; starmamba's triton backend needs no build"
        )
    return selective_scan_fn, ""
