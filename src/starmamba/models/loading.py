"""Loading models from files: starmamba run folders and exports (safetensors), Hub folders, and ARM's ``.pth``."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from starmamba.models.arm import arm_classifier_config, from_arm, read_arm_checkpoint
from starmamba.models.backbone import MambaMLPClassifier
from starmamba.models.registry import MODEL_CLASSES, build_model, saved_model_config, split_name
from starmamba.models.star import StarPretrainer
from starmamba.models.weights import check_compatible, load_weights


def is_arm_file(path: str | Path) -> bool:
    return Path(path).suffix in (".pth", ".pt")


def is_hub_folder(path: str | Path) -> bool:
    """A folder of ``save_pretrained``: its config.json names an ``architecture``."""
    config = Path(path) / "config.json"
    if not (Path(path) / "model.safetensors").is_file() or not config.is_file():
        return False
    try:
        return "architecture" in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def run_weights_file(path: Path, ema: bool) -> Path:
    """The weights of a run or checkpoint folder (its model's, or with ``ema`` its EMA's), or ``path`` itself."""
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
    state, _ = load_weights(run_weights_file(path, ema=False))
    return state


def model_from_weights(weights: str | Path) -> tuple[nn.Module, str]:
    """The model a starmamba ``.safetensors`` file holds (built from its metadata), with its weights, and the
    preset name the metadata gives."""
    state, meta = load_weights(weights)
    if "model" not in meta:
        raise ValueError(f"{weights} does not name its model in its metadata: not written by a starmamba run")
    name = meta["model"]
    try:
        model = build_model(saved_model_config(name, meta.get("config", {})))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{weights}: its model config does not build {name}: {error}") from None
    check_compatible(state, model, source=str(weights))
    model.load_state_dict(state)
    return model, name


def load_classifier(path: str | Path, ema: bool = False) -> tuple[MambaMLPClassifier, str]:
    """A classifier with its weights, and a line describing where they came from.

    ``path`` is a starmamba checkpoint directory or ``.safetensors`` export (``ema`` picks the EMA
    weights of a directory), or an ARM ``.pth`` (``ema`` picks its ``model_ema``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir() and is_hub_folder(path):
        model = load_model(path, ema)
        if not isinstance(model, MambaMLPClassifier):
            raise ValueError(f"{path} holds a pretraining model; finetune it first (--finetune {path})")
        return model, f"{model.pretrained_cfg['architecture']} exported to {path}"
    if is_arm_file(path):
        checkpoint = read_arm_checkpoint(path)
        key = "model_ema" if ema else "model"
        if key not in checkpoint:
            raise ValueError(f"{path} holds no '{key}' weights")
        state = from_arm(checkpoint[key])
        if "head.weight" not in state:
            raise ValueError(f"{path} is an ARM pretraining checkpoint; finetune it first (--finetune {path})")
        model = MambaMLPClassifier(arm_classifier_config(state, checkpoint.get("args")))
        check_compatible(state, model, source=str(path))
        model.load_state_dict(state)
        cfg = model.cfg
        return model, f"ARM {'EMA ' if ema else ''}weights {path.name} (MambaMLP dim {cfg.dim}, depth {cfg.depth})"
    weights = run_weights_file(path, ema)
    model, name = model_from_weights(weights)
    if not isinstance(model, MambaMLPClassifier):
        raise ValueError(f"{weights} holds the pretraining model {name}; finetune it first (--finetune {path})")
    return model, f"{name} {'EMA ' if ema else ''}weights from {weights}"


def load_probe_model(path: str | Path, ema: bool = False) -> tuple[MambaMLPClassifier | StarPretrainer, str]:
    """A model to probe: a classifier (as :func:`load_classifier`) or a starmamba pretraining checkpoint."""
    path = Path(path)
    if path.exists() and not is_arm_file(path):
        weights = run_weights_file(path, ema)
        model, name = model_from_weights(weights)
        if isinstance(model, StarPretrainer):
            return model, f"{name} {'EMA ' if ema else ''}pretrained encoder from {weights}"
    return load_classifier(path, ema)


def load_model(path: str | Path, ema: bool = False) -> nn.Module:
    """Any model file or folder: a Hub folder (``save_pretrained``), a starmamba run or checkpoint folder or
    ``.safetensors`` file (``ema``: its EMA weights), or an ARM ``.pth`` classifier."""
    path = Path(path)
    if path.is_dir() and is_hub_folder(path):
        if ema:
            raise ValueError(f"{path} is a Hub folder: it holds one set of weights (no --ema)")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return MODEL_CLASSES[split_name(config["architecture"])[0]].from_pretrained(path)
    return load_probe_model(path, ema)[0]
