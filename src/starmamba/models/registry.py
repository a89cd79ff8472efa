"""Named presets: ``mambamlp_*`` classifiers (224 px, 4 scans) and ``star_*`` pretraining models (192 px)."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Literal, get_args

from torch import nn

from starmamba.models.backbone import ClassifierConfig, MambaMLPClassifier
from starmamba.models.star import StarConfig, StarPretrainer

Size = Literal["tiny", "small", "base", "large", "huge"]
# (width, depth). Base, Large and Huge are ARM's; Tiny and Small are this project's own.
SIZES: dict[str, tuple[int, int]] = {
    "tiny": (192, 12),
    "small": (384, 12),
    "base": (768, 12),
    "large": (1024, 24),
    "huge": (1536, 24),
}
FAMILIES = {"mambamlp": ClassifierConfig, "star": StarConfig}
MODEL_CLASSES = {"mambamlp": MambaMLPClassifier, "star": StarPretrainer}


def list_models() -> list[str]:
    """Every preset name, e.g. ``mambamlp_base`` or ``star_base``."""
    return [f"{family}_{size}" for family in FAMILIES for size in get_args(Size)]


def split_name(name: str) -> tuple[str, str]:
    """``"mambamlp_base"`` -> ``("mambamlp", "base")``; a ValueError with close matches for an unknown name."""
    family, _, size = name.partition("_")
    if family not in FAMILIES or size not in SIZES:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose one of {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    return family, size


def model_name(config: ClassifierConfig | StarConfig) -> str:
    """The preset a config is closest to: its family and the size of its width and depth (the nearest
    width, then depth, when it matches none); the config's own fields say the rest."""
    family = next(family for family, config_type in FAMILIES.items() if type(config) is config_type)
    size = min(SIZES, key=lambda s: (abs(SIZES[s][0] - config.dim), abs(SIZES[s][1] - config.depth)))
    return f"{family}_{size}"


def model_config(name: str, **overrides) -> ClassifierConfig | StarConfig:
    """The config of preset ``name`` with ``overrides`` applied (validated)."""
    family, size = split_name(name)
    config_type = FAMILIES[family]
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name}; options: {', '.join(sorted(known))}")
    dim, depth = SIZES[size]
    return config_type(**{"dim": dim, "depth": depth, **overrides})


def build_model(config: ClassifierConfig | StarConfig) -> nn.Module:
    """The model a config describes."""
    return StarPretrainer(config) if isinstance(config, StarConfig) else MambaMLPClassifier(config)


def create_model(name: str, pretrained: str | Path | None = None, **overrides) -> nn.Module:
    """Build preset ``name`` with ``overrides``, e.g. ``create_model("star_base", images_per_sequence=4)``.

    ``pretrained``: a folder from ``save_pretrained`` (or a Hub repo id) holding model ``name``; the
    model is built from its config (with ``overrides``) and its weights, as ``from_pretrained`` does.
    """
    if pretrained is None:
        model = build_model(model_config(name, **overrides))
        model.pretrained_cfg = {"architecture": name}
        return model
    family, _ = split_name(name)
    return MODEL_CLASSES[family].from_pretrained(pretrained, architecture=name, **overrides)
