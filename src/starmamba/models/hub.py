"""Hub folders through huggingface_hub's ``PyTorchModelHubMixin``, and the pretrained config (timm's data
config) that travels with the weights.

A folder holds ``model.safetensors``, ``README.md`` (the mixin's model card) and ``config.json``::

    {"architecture": "mambamlp_base", "model_args": {...every config field...},
     "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [...], "crop_pct": 0.875, ...}}

as timm's Hub folders do: ``architecture`` is a registry name, ``model_args`` the exact config.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from starmamba.models.pos_embed import resize_pos_embed
from starmamba.models.registry import (
    MODEL_CLASSES,
    build_model,
    model_name,
    saved_model_config,
    split_name,
)
from starmamba.models.weights import misfits

# ImageNet's per-channel statistics (data/datasets.py gives them to ImageFolder data sets).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What describes the weights unless a folder (or a run's export) says otherwise: ImageNet's
# statistics and the evaluation crop of this library's finetuning recipe.
PRETRAINED_DEFAULTS = {
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "license": "apache-2.0",
    "paper_ids": "arXiv:2603.03806",
}


class HubMixin(
    PyTorchModelHubMixin,
    library_name="starmamba",
    license="apache-2.0",
    tags=["vision-mamba", "starmamba", "arxiv:2603.03806"],  # the Hub links the paper from its arxiv tag
):
    """``save_pretrained(folder)``, ``from_pretrained(folder_or_repo_id)`` and ``push_to_hub(repo_id)`` for a
    model with a ``cfg`` dataclass, plus timm's ``pretrained_cfg`` / ``default_cfg``.

    Loading checks everything: the folder must hold this kind of model (``architecture``), a config
    the registry accepts and weights that fit it exactly; anything else is a clear error.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """A model from a folder of ``save_pretrained`` or a Hub repo id ("user/name"); keyword arguments
        as huggingface_hub's (``revision``, ``cache_dir``, ``local_files_only`` ...), ``map_location``,
        and overrides of the folder's config (``num_classes`` resets the head)."""
        path = Path(pretrained_model_name_or_path).expanduser()
        looks_local = path.exists() or path.is_absolute() or str(pretrained_model_name_or_path).startswith((".", "~"))
        if looks_local and not path.is_dir():
            raise FileNotFoundError(f"{pretrained_model_name_or_path} is not a model folder")
        return super().from_pretrained(path if path.is_dir() else pretrained_model_name_or_path, **kwargs)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's pretrained config, a plain dict that keeps edits made to it (``save_pretrained`` writes it):
        the data config of these weights (input size, mean/std, crop_pct, crop_mode, interpolation), the
        ``architecture``, ``num_classes`` and ``label_names`` of a classifier, its first conv and head."""
        if "_pretrained_cfg" not in self.__dict__:
            self.pretrained_cfg = {}
        return self.__dict__["_pretrained_cfg"]

    @pretrained_cfg.setter
    def pretrained_cfg(self, values: dict[str, Any]) -> None:
        """Replace the pretrained config by ``values``, completed with what follows from the model (input size,
        classes, layer names) and the defaults (ImageNet's mean and std) for the keys it leaves out."""
        derived = {
            "input_size": (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size),
            "fixed_input_size": True,
            "first_conv": "encoder.patch_embed.proj",
        }
        if hasattr(self, "head"):
            derived |= {"num_classes": self.cfg.num_classes, "classifier": "head"}
        # JSON gives lists where timm's configs hold tuples.
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        self.__dict__["_pretrained_cfg"] = {"architecture": model_name(self.cfg), **PRETRAINED_DEFAULTS, **derived,
                                            **given}  # fmt: skip

    def classes_changed(self) -> None:
        """Keep the pretrained config's ``num_classes`` that of the head; names of other classes are dropped."""
        cfg = self.pretrained_cfg
        if cfg.get("num_classes") != self.cfg.num_classes:
            cfg["num_classes"] = self.cfg.num_classes
            cfg.pop("label_names", None)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def hub_config(self) -> dict[str, Any]:
        """What ``config.json`` holds (see the module docstring)."""
        pretrained = dict(self.pretrained_cfg)
        return {
            "architecture": pretrained.pop("architecture"),
            "model_args": asdict(self.cfg),
            "pretrained_cfg": pretrained,
        }

    def _save_pretrained(self, save_directory: Path) -> None:
        save_model(self, str(save_directory / constants.SAFETENSORS_SINGLE_FILE))
        text = json.dumps(self.hub_config(), indent=2, sort_keys=True)
        (save_directory / constants.CONFIG_NAME).write_text(text + "\n")

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict | None = None,
        architecture: str | None = None,
        map_location: str | torch.device = "cpu",
        **overrides: Any,
    ):
        """Build the folder's model with ``overrides`` of its config and load its weights strictly.

        ``architecture``, when given (``create_model`` passes its name), must be the folder's.
        ``num_classes`` different from the folder's loads the weights, then resets the head.
        """
        where = f"{model_id}/{constants.CONFIG_NAME}"
        if config is None:
            raise FileNotFoundError(f"{model_id} has no {constants.CONFIG_NAME}: not a folder from save_pretrained")
        if not isinstance(config, dict) or not {"architecture", "model_args"} <= config.keys():
            raise ValueError(f"{where} is not a starmamba model config: it needs 'architecture' and 'model_args'")
        held = config["architecture"]
        if not isinstance(held, str):
            raise ValueError(f"{where}: 'architecture' must be a model name such as 'mambamlp_base', got {held!r}")
        if architecture is not None and architecture != held:
            raise ValueError(f"{model_id} holds the model {held}, not {architecture}")
        num_classes = overrides.pop("num_classes", None)
        try:
            model_type = MODEL_CLASSES[split_name(held)[0]]
            model_cfg = saved_model_config(held, {**config["model_args"], **overrides})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error
        if not issubclass(model_type, cls):
            raise ValueError(
                f"{model_id} holds {held}, a {model_type.__name__}, not a {cls.__name__}: load it with "
                f"{model_type.__name__}.from_pretrained or starmamba.create_model({held!r}, pretrained=...)"
            )
        model = build_model(model_cfg)
        weights = _hub_weights_file(model_id, revision, cache_dir, force_download, local_files_only, token)
        try:
            state = load_file(weights, device=str(map_location))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {weights} (truncated or not safetensors?): {error}") from error
        _fit_pos_embed(state, model)
        problems = misfits({key: tuple(value.shape) for key, value in state.items()}, model)
        if problems:
            raise ValueError(f"the weights in {weights} do not fit {held} as {where} describes it; {problems}")
        model.load_state_dict(state, strict=True)
        # What follows from the model (input size, classes) comes from it, not from the folder.
        stored = {k: v for k, v in config.get("pretrained_cfg", {}).items() if k not in ("input_size", "num_classes")}
        model.pretrained_cfg = {**stored, "architecture": held}
        if num_classes is not None and num_classes != model.cfg.num_classes:
            model.reset_classifier(num_classes)
        return model.eval()


def _fit_pos_embed(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Bring a saved patch-grid position embedding to the model's grid, as timm does for another ``img_size``:
    a learned one is resampled bicubically, a fixed sin-cos one is the model's own (exact on any grid)."""
    saved, own = state.get("encoder.pos_embed"), model.encoder.pos_embed
    if saved is None or saved.dim() != 3 or saved.shape[2] != own.shape[2] or saved.shape[1] == own.shape[1]:
        return  # nothing to fit, or a misfit that misfits names
    grid = model.cfg.grid
    state["encoder.pos_embed"] = resize_pos_embed(saved, (grid, grid)) if isinstance(own, nn.Parameter) else own.clone()


def _hub_weights_file(
    model_id: str,
    revision: str | None,
    cache_dir: str | Path | None,
    force_download: bool,
    local_files_only: bool,
    token: str | bool | None,
) -> str:
    """The path of ``model.safetensors`` in a local folder, or downloaded (cached) from a Hub repo."""
    name = constants.SAFETENSORS_SINGLE_FILE
    if Path(model_id).is_dir():
        path = Path(model_id) / name
        if not path.is_file():
            raise FileNotFoundError(f"{model_id} has no {name}")
        return str(path)
    return hf_hub_download(
        model_id,
        name,
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        token=token,
        local_files_only=local_files_only,
    )
