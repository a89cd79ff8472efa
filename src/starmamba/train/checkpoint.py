"""Checkpoints that survive a crash at any moment, and loading them without unpickling objects.

A checkpoint is a directory ``<run_dir>/checkpoints/step-<global_step:08d>/`` holding
``model.safetensors``, optionally ``ema.safetensors`` (both with metadata naming the model and its
config) and ``training_state.pt`` (optimizer, position, run config: plain tensors, numbers,
strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it). The file
``<run_dir>/checkpoints/latest`` names the newest complete checkpoint directory. No random state
is saved: every draw of a step is seeded from the run's seed and the step's position.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from starmamba.errors import load_error_reason
from starmamba.files import atomic_write, fsync, new_file_mode, temp_name, write_text
from starmamba.models.weights import load_weights

FORMAT = "starmamba"
POINTER = "latest"
_STEP_DIR = re.compile(r"step-(\d+)")


def save_checkpoint(
    run_dir: str | Path,
    state: dict[str, Any],
    *,
    model_name: str,
    model_config: dict,
    run_config: dict,
    keep_last: int = 1,
    description: str | None = None,
) -> Path:
    """Write ``state`` as the checkpoint of its step, point ``latest`` at it, then drop older ones.

    ``state`` is a ``TrainState.state_dict()``: ``model`` and ``ema`` (a state_dict, or None),
    ``optimizer`` (its state_dict), ``scaler`` (the fp16 GradScaler's state_dict, empty at other
    precisions; optional) and ``position`` (``epoch``, ``step``, ``global_step``). Everything is
    written to a hidden sibling directory and renamed into place, and ``latest`` is replaced
    atomically, so it always names a complete checkpoint. Of the checkpoints of earlier steps, the
    newest ``keep_last - 1`` are kept. Returns the checkpoint directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    position = {key: int(state["position"][key]) for key in ("epoch", "step", "global_step")}
    training_state = {
        "optimizer": state["optimizer"],
        "scaler": state.get("scaler") or {},
        "position": position,
        "run_config": json.dumps(run_config),
    }
    _check_plain(training_state, "training_state")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{position['global_step']:08d}"
    staging = root / temp_name(name)
    staging.mkdir()
    try:
        metadata = _metadata(model_name, model_config, description)
        _write_safetensors(staging / "model.safetensors", state["model"], metadata)
        if state.get("ema") is not None:
            _write_safetensors(staging / "ema.safetensors", state["ema"], metadata)
        torch.save(training_state, staging / "training_state.pt")
        for entry in (*staging.iterdir(), staging):
            fsync(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = root / name
    if final.exists():
        # Left by a save cut short before ``latest`` moved on (a run never saves the step
        # ``latest`` names again: it resumes from there or from an earlier one of another run).
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync(root)
    write_text(root / POINTER, name + "\n")
    _prune(root, position["global_step"], keep_last)
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


def load_training_state(checkpoint_dir: str | Path) -> dict:
    """The training state of a checkpoint directory, its tensors on the CPU."""
    checkpoint_dir = Path(checkpoint_dir)
    file = checkpoint_dir / "training_state.pt"
    if not checkpoint_dir.exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint_dir}")
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


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A checkpoint directory as ``save_checkpoint`` took it, plus its ``run_config``; tensors on the CPU."""
    path = Path(checkpoint_dir)
    training = load_training_state(path)
    model, _ = load_weights(path / "model.safetensors")
    ema = load_weights(path / "ema.safetensors")[0] if (path / "ema.safetensors").is_file() else None
    return {
        "model": model,
        "ema": ema,
        "optimizer": training["optimizer"],
        "scaler": training.get("scaler", {}),  # checkpoints from before --precision have none
        "position": training["position"],
        "run_config": json.loads(training["run_config"]),
    }


def checkpoint_step(path: str | Path) -> int:
    """The global step of a checkpoint directory, read from its name (``step-00000042`` -> 42)."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint directory (step-<number>)")
    return int(match[1])


def export_weights(
    path: str | Path,
    state_dict: dict[str, Tensor],
    model_name: str,
    model_config: dict,
    description: str | None = None,
) -> None:
    """Write ``state_dict`` to one ``.safetensors`` file with the model's metadata, atomically."""
    metadata = _metadata(model_name, model_config, description)
    atomic_write(path, lambda temp: _write_safetensors(temp, state_dict, metadata))


def _metadata(model_name: str, model_config: dict, description: str | None) -> dict[str, str]:
    """``model`` (the preset) and ``config`` rebuild the model; ``description`` names what it is."""
    metadata = {"format": FORMAT, "model": model_name, "config": json.dumps(model_config)}
    return metadata if description is None else {**metadata, "description": description}


def _write_safetensors(path: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    tensors = {key: _cpu_copy(value) for key, value in state.items()}
    save_file(tensors, str(path), metadata=metadata)
    # safetensors creates its files private (0o600); give them the permissions of the run's other files.
    os.chmod(path, new_file_mode())


def _cpu_copy(tensor: Tensor) -> Tensor:
    """A contiguous CPU copy: safetensors refuses tensors that share memory (tied or sliced weights)."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


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
