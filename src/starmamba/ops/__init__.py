"""Operators: the selective scan of Mamba and its backends."""

from starmamba.ops.scan import BACKEND_ENV, BACKENDS, resolve_backend, selective_scan

__all__ = ["BACKENDS", "BACKEND_ENV", "resolve_backend", "selective_scan"]
