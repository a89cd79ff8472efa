"""Checkpoints that survive a crash at any moment, and loading them without unpickling objects.

A checkpoint is a directory ``<run_dir>/checkpoints/step-<global_step:08d>/`` holding
``model.safetensors``, optionally ``ema.safetensors`` (both with metadata naming the model and its
config) and ``training_state.pt`` (optimizer, position, RNG states, run config: plain tensors,
numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it). The file
``<run_dir>/checkpoints/latest`` names the newest complete checkpoint directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from starmamba.errors import load_error_reason

FORMAT = "starmamba"
POINTER = "latest"
_STEP_DIR = re.compile(r"step-(\d+)")
_SHOWN = 5  # keys listed per kind of problem in check_compatible's message


def save_checkpoint(
    run_dir: str | Path,
    *,
    global_step: int,
    model_name: str,
    model_config: dict,
    model_state: dict[str, Tensor],
    ema_state: dict[str, Tensor] | None = None,
    optimizer_state: dict,
    epoch: int,
    step_in_epoch: int,
    run_config: dict,
    extra: dict | None = None,
    keep_last: int = 1,
) -> Path:
    """Write the checkpoint of ``global_step``, point ``latest`` at it, then drop older ones.

    Everything is written to a hidden sibling directory and renamed into place, and ``latest`` is
    replaced atomically, so it always names a complete checkpoint. Of the checkpoints of earlier
    steps, the newest ``keep_last - 1`` are kept. ``extra`` is stored under the key ``"extra"``.
    Returns the checkpoint directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    training_state = {
        "optimizer": optimizer_state,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "rng": capture_rng_state(),
        "run_config": json.dumps(run_config),
        "extra": extra or {},
    }
    _check_plain(training_state, "training_state")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{global_step:08d}"
    staging = root / _temp_name(name)
    staging.mkdir()
    try:
        metadata = _metadata(model_name, model_config)
        _write_safetensors(staging / "model.safetensors", model_state, metadata)
        if ema_state is not None:
            _write_safetensors(staging / "ema.safetensors", ema_state, metadata)
        torch.save(training_state, staging / "training_state.pt")
        _fsync(staging / "training_state.pt")
        _fsync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = root / name
    if final.exists():
        _replace_dir(staging, final)
    else:
        os.replace(staging, final)
        _fsync(root)
    _write_pointer(root, name)
    _prune(root, global_step, keep_last)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint directory ``latest`` names, or None when the run has none yet."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name or Path(name).name != name or not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a checkpoint directory in {root}")
    return path


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


def load_training_state(checkpoint_dir: str | Path) -> dict:
    """The training state of a checkpoint directory, its tensors on the CPU."""
    checkpoint_dir = Path(checkpoint_dir)
    file = checkpoint_dir / "training_state.pt"
    if checkpoint_dir.is_file():
        raise ValueError(
            f"{checkpoint_dir} is a weights file, not a training checkpoint; resume from a checkpoint "
            "directory (<run>/checkpoints/step-*) or with --resume auto"
        )
    if not file.is_file():
        hint = (
            "; it is a run folder: resume with --resume auto and --output_dir " + str(checkpoint_dir)
            if (checkpoint_dir / "checkpoints").is_dir()
            else ""
        )
        raise FileNotFoundError(f"{checkpoint_dir} is not a training checkpoint: it has no training_state.pt{hint}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails on a file it cannot read in many types
        raise ValueError(f"{file} is truncated or corrupt ({load_error_reason(err)})") from None


def capture_rng_state() -> dict:
    """The states of torch's CPU (and CUDA) generators, numpy's global one and ``random``, as plain data."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002 (the global one)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_name,
            "keys": np_keys.tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the generator states of ``capture_rng_state`` (CUDA only for the devices present)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (the global one)
        (
            numpy_state["name"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


def check_compatible(state_dict: dict[str, Tensor], model: nn.Module, *, source: str) -> None:
    """Raise a ValueError naming ``source`` unless ``state_dict`` fits ``model``: same keys, same shapes."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    problems = [
        _listing(what, keys)
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def export_weights(
    path: str | Path,
    state_dict: dict[str, Tensor],
    model_name: str,
    model_config: dict,
) -> None:
    """Write ``state_dict`` to one ``.safetensors`` file with the model's metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(_temp_name(path.name))
    try:
        _write_safetensors(temp, state_dict, _metadata(model_name, model_config))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _temp_name(name: str) -> str:
    """A hidden, unique name for a file or directory in the making (never reused, so never stale)."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


def _metadata(model_name: str, model_config: dict) -> dict[str, str]:
    return {"format": FORMAT, "model": model_name, "config": json.dumps(model_config)}


def _write_safetensors(path: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    tensors = {key: _cpu_copy(value) for key, value in state.items()}
    save_file(tensors, str(path), metadata=metadata)
    _fsync(path)


def _cpu_copy(tensor: Tensor) -> Tensor:
    """A contiguous CPU copy: safetensors refuses tensors that share memory (tied or sliced weights)."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk before a rename makes it visible."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened on Windows; renames there are durable enough
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(root: Path, name: str) -> None:
    temp = root / _temp_name(POINTER)
    with open(temp, "x") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, root / POINTER)
    _fsync(root)


def _replace_dir(staging: Path, final: Path) -> None:
    """Put ``staging`` at the name of the existing directory ``final`` (a step saved again).

    Two directories cannot be swapped atomically, so ``latest`` names the complete ``staging``
    while the old directory moves aside and a hard-linked copy of ``staging`` takes its name.
    """
    root = final.parent
    _write_pointer(root, staging.name)
    os.replace(final, root / _temp_name(final.name))
    copy = root / _temp_name(final.name)
    copy.mkdir()
    for file in staging.iterdir():
        try:
            os.link(file, copy / file.name)
        except OSError:  # file systems without hard links
            shutil.copyfile(file, copy / file.name)
            _fsync(copy / file.name)
    _fsync(copy)
    os.replace(copy, final)
    _fsync(root)


def _prune(root: Path, global_step: int, keep_last: int) -> None:
    """Remove leftovers of interrupted saves and all but ``keep_last - 1`` checkpoints before ``global_step``.

    Checkpoints of later steps (from a run this one restarted over) are left alone.
    """
    older = sorted(
        (int(match[1]), entry)
        for entry in root.iterdir()
        if (match := _STEP_DIR.fullmatch(entry.name)) and int(match[1]) < global_step
    )
    doomed = [entry for _, entry in older[: max(0, len(older) - (keep_last - 1))]]
    doomed += [e for e in root.iterdir() if e.name.startswith(".") and e.name.endswith(".tmp")]
    for entry in doomed:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _listing(what: str, keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{len(keys)} {what}: " + ", ".join(keys[:_SHOWN]) + more


def _check_plain(value: Any, where: str) -> None:
    """Fail at save time, not at resume, on values ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not (value is None or isinstance(value, (Tensor, str, int, float))):
        raise TypeError(
            f"{where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, strings, "
            "lists, dicts and None"
        )
