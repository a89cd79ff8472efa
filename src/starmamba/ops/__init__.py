"""Operators: the selective scan of Mamba and its backends."""

from starmamba.ops.scan import BACKEND_ENV, BACKENDS, available_backends, resolve_backend, selective_scan
from starmamba.ops.warmup import warm_up

__all__ = ["BACKENDS", "BACKEND_ENV", "available_backends", "resolve_backend", "selective_scan", "warm_up"]
