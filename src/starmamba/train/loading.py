"""Loading models from files: starmamba checkpoints and exports (safetensors), and ARM's ``.pth``."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from starmamba.models.arm import arm_classifier_config, from_arm, read_arm_checkpoint
from starmamba.models.backbone import ClassifierConfig, MambaMLPClassifier
from starmamba.models.star import StarConfig, StarPretrainer
from starmamba.train.checkpoint import check_compatible, load_weights


def is_arm_file(path: str | Path) -> bool:
    return Path(path).suffix in (".pth", ".pt")


def _weights_file(path: Path, ema: bool) -> Path:
    if path.is_dir():
        return path / ("ema.safetensors" if ema else "model.safetensors")
    if ema:
        raise ValueError(f"--ema needs a checkpoint directory holding ema.safetensors, not {path}")
    return path


def load_pretrained_state(path: str | Path) -> dict[str, Tensor]:
    """Weights to start finetuning from, in this library's key names (``encoder.*`` and more)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pretrained checkpoint at {path}")
    if is_arm_file(path):
        return from_arm(read_arm_checkpoint(path)["model"])
    state, _ = load_weights(_weights_file(path, ema=False))
    return state


def load_classifier(path: str | Path, ema: bool = False) -> tuple[MambaMLPClassifier, str]:
    """A classifier with its weights, and a line describing where they came from.

    ``path`` is a starmamba checkpoint directory or ``.safetensors`` export (``ema`` picks the EMA
    weights of a directory), or an ARM ``.pth`` (``ema`` picks its ``model_ema``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if is_hub_folder(path):
        return load_hub_classifier(path, ema)
    if is_arm_file(path):
        checkpoint = read_arm_checkpoint(path)
        key = "model_ema" if ema else "model"
        if key not in checkpoint:
            raise ValueError(f"{path} holds no '{key}' weights")
        state = from_arm(checkpoint[key])
        if "head.weight" not in state:
            raise ValueError(f"{path} is an ARM pretraining checkpoint; finetune it first (--finetune {path})")
        cfg = arm_classifier_config(state, checkpoint.get("args"))
        description = f"ARM {'EMA ' if ema else ''}weights {path.name} (MambaMLP dim {cfg.dim}, depth {cfg.depth})"
    else:
        weights = _weights_file(path, ema)
        state, meta = load_weights(weights)
        name, config = meta.get("model", "?"), meta.get("config", {})
        if "images_per_sequence" in config:
            raise ValueError(f"{weights} holds the pretraining model {name}; finetune it first (--finetune {path})")
        cfg = ClassifierConfig(**config)
        description = f"{name} {'EMA ' if ema else ''}weights from {weights}"
    model = MambaMLPClassifier(cfg)
    check_compatible(state, model, source=str(path))
    model.load_state_dict(state)
    return model, description


def is_hub_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of ``starmamba export`` (``save_pretrained``): its config.json names an
    ``architecture``."""
    try:
        return path.is_dir() and "architecture" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_hub_classifier(path: Path, ema: bool) -> tuple[MambaMLPClassifier, str]:
    """The classifier of a ``starmamba export`` folder, built from its config.json."""
    if ema:
        raise ValueError(f"{path} is an exported model folder, which holds one set of weights: leave out --ema")
    held = json.loads((path / "config.json").read_text())["architecture"]
    if not str(held).startswith("mambamlp"):
        raise ValueError(f"{path} holds the pretraining model {held}; finetune it first (--finetune {path})")
    return MambaMLPClassifier.from_pretrained(path), f"{held} exported to {path}"


def load_probe_model(path: str | Path, ema: bool = False) -> tuple[MambaMLPClassifier | StarPretrainer, str]:
    """A model to probe: a classifier (as :func:`load_classifier`) or a starmamba pretraining checkpoint."""
    path = Path(path)
    if path.exists() and not is_arm_file(path):
        weights = _weights_file(path, ema)
        state, meta = load_weights(weights)
        config = meta.get("config", {})
        if "images_per_sequence" in config:
            model = StarPretrainer(StarConfig(**config))
            check_compatible(state, model, source=str(path))
            model.load_state_dict(state)
            return model, f"{meta.get('model', '?')} {'EMA ' if ema else ''}pretrained encoder from {weights}"
    return load_classifier(path, ema)
