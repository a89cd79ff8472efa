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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

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
        """timm's pretrained config: the data config (input size, mean/std, crop_pct, interpolation,
        crop_mode) of these weights and the model's ``architecture``, ``num_classes``, first conv, head."""
        stored = self.__dict__.get("_pretrained_cfg", {})
        derived = {
            "input_size": (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size),
            "fixed_input_size": True,
            "first_conv": "encoder.patch_embed.proj",
        }
        if hasattr(self, "head"):
            derived |= {"num_classes": self.cfg.num_classes, "classifier": "head"}
        return {"architecture": model_name(self.cfg), **PRETRAINED_DEFAULTS, **stored, **derived}

    @pretrained_cfg.setter
    def pretrained_cfg(self, values: dict[str, Any]) -> None:
        """Record what describes the weights (``architecture``, ``mean``, ``std``, ``crop_pct`` ...); the
        keys that follow from the model itself (input size, classes) always come from its config."""
        # JSON gives lists where timm's configs hold tuples.
        self.__dict__["_pretrained_cfg"] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def hub_config(self) -> dict[str, Any]:
        """What ``config.json`` holds (see the module docstring)."""
        pretrained = self.pretrained_cfg
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
            with safe_open(weights, "pt") as file:
                shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {weights} (truncated or not safetensors?): {error}") from error
        problems = misfits(shapes, model)
        if problems:
            raise ValueError(f"the weights in {weights} do not fit {held} as {where} describes it; {problems}")
        load_model(model, weights, strict=True, device=str(map_location))
        model.pretrained_cfg = {**config.get("pretrained_cfg", {}), "architecture": held}
        if num_classes is not None and num_classes != model.cfg.num_classes:
            model.reset_classifier(num_classes)
        return model.eval()


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
