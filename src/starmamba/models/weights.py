"""Weights files: safetensors with the metadata that rebuilds their model, and whether weights fit a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from starmamba.errors import load_error_reason

_SHOWN = 5  # keys listed per kind of problem


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The state_dict and metadata of a checkpoint directory (its model) or a ``.safetensors`` file.

    The metadata's ``"config"`` is decoded from JSON; files written elsewhere may have no metadata.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no weights at {file}")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            metadata: dict[str, Any] = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        if "config" in metadata:
            metadata["config"] = json.loads(metadata["config"])
    except (SafetensorError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is truncated or not a safetensors file ({load_error_reason(err)})") from None
    return state, metadata


def misfits(shapes: dict[str, tuple[int, ...]], model: nn.Module) -> str:
    """Missing, unexpected and wrongly shaped weights of ``shapes`` (key -> shape) for ``model``, summed up in
    a line ('' when they fit)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in shapes]
    unexpected = [key for key in shapes if key not in expected]
    mismatched = [
        f"{key} {tuple(shapes[key])} vs {shape}"
        for key, shape in expected.items()
        if key in shapes and tuple(shapes[key]) != shape
    ]
    return problems_line(
        {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches (checkpoint vs model)": mismatched}
    )


def check_compatible(state_dict: dict[str, Tensor], model: nn.Module, *, source: str) -> None:
    """Raise a ValueError naming ``source`` unless ``state_dict`` fits ``model``: same keys, same shapes."""
    problems = misfits({key: tuple(value.shape) for key, value in state_dict.items()}, model)
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {problems}")


def problems_line(groups: dict[str, list[str]]) -> str:
    """``{"missing keys": [...], ...}`` -> ``"2 missing keys: a, b; ..."``, the first keys of each kind shown."""
    return "; ".join(
        f"{len(keys)} {what}: "
        + ", ".join(keys[:_SHOWN])
        + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
        for what, keys in groups.items()
        if keys
    )
