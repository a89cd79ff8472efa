"""Named presets: ``mambamlp_*`` classifiers (224 px, 4 scans) and ``star_*`` pretraining models (192 px)."""

from __future__ import annotations

import dataclasses
import difflib
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


def list_models() -> list[str]:
    """Every preset name, e.g. ``mambamlp_base`` or ``star_base``."""
    return [f"{family}_{size}" for family in FAMILIES for size in get_args(Size)]


def model_config(name: str, **overrides) -> ClassifierConfig | StarConfig:
    """The config of preset ``name`` with ``overrides`` applied (validated)."""
    family, _, size = name.partition("_")
    if family not in FAMILIES or size not in SIZES:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose one of {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
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


def create_model(name: str, **overrides) -> nn.Module:
    """Build preset ``name`` with ``overrides``, e.g. ``create_model("star_base", images_per_sequence=4)``."""
    return build_model(model_config(name, **overrides))
