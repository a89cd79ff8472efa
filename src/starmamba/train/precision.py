"""Mixed precision, one place for every job: ``autocast(device, precision)`` and the fp16 ``grad_scaler``.

``precision`` is 'fp32', 'bf16' or 'fp16' on any device, or None for the default: bf16 autocast on
CUDA (as ARM trains), fp32 on a CPU. Autocast runs the matmuls in the lower precision and keeps
weights, optimizer state and the selective scan's state in fp32 (the scan casts its inputs up).
fp16's narrow range needs loss scaling: :func:`grad_scaler` is enabled for it alone.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(device: torch.device, precision: Precision | None) -> Precision:
    """``precision``, or the default of ``device`` when None: bf16 on CUDA, fp32 elsewhere."""
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", *_DTYPES):
        raise ValueError(f"precision={precision!r}: choose fp32, bf16 or fp16")
    return precision


def autocast(device: torch.device, precision: Precision | None = None):
    """A context that runs the forward pass (and the loss) at ``precision`` on ``device``."""
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[resolved])


def grad_scaler(device: torch.device, precision: Precision | None) -> torch.amp.GradScaler:
    """A GradScaler for the backward pass: enabled for fp16 only (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(device, precision) == "fp16")
