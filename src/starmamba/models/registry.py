"""Named presets: ``mambamlp_*`` classifiers (224 px, 4 scans) and ``star_*`` pretraining models (192 px).

Each family's model class registers itself here (:func:`register`), so that this module imports no
model and every model module (and the Hub mixin) may use it: the one place a family is looked up.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from torch import nn

Size = Literal["tiny", "small", "base", "large", "huge"]
# (width, depth). Base, Large and Huge are ARM's; Tiny and Small are this project's own.
SIZES: dict[str, tuple[int, int]] = {
    "tiny": (192, 12),
    "small": (384, 12),
    "base": (768, 12),
    "large": (1024, 24),
    "huge": (1536, 24),
}
# family -> its config dataclass and its model class, filled by @register (models/backbone.py, models/star.py).
FAMILIES: dict[str, type] = {}
MODEL_CLASSES: dict[str, type[nn.Module]] = {}
ModelConfig = Any  # the config dataclass of a registered family (ClassifierConfig, StarConfig)


def register(family: str, config_type: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: the model class of ``family``, built from a ``config_type``."""

    def add(model_class: type[nn.Module]) -> type[nn.Module]:
        FAMILIES[family], MODEL_CLASSES[family] = config_type, model_class
        return model_class

    return add


def family_of(config: ModelConfig) -> str:
    """The family (``"mambamlp"``, ``"star"``) whose config ``config`` is."""
    for family, config_type in FAMILIES.items():
        if type(config) is config_type:
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a model family ({', '.join(FAMILIES)})")


def list_models(
    filter: str | Sequence[str] = "", exclude_filters: str | Sequence[str] = "", pretrained: bool = False
) -> list[str]:
    """Preset names, e.g. ``mambamlp_base`` or ``star_base``, as timm's ``list_models``: those matching
    ``filter`` (shell wildcards, e.g. ``"mambamlp_*"``; a list: any of them) and none of ``exclude_filters``.
    ``pretrained=True`` lists the presets with published weights: none (see ``create_model``)."""
    names = [f"{family}_{size}" for family in FAMILIES for size in get_args(Size)]
    if pretrained:
        return []

    def matches(name: str, patterns: str | Sequence[str]) -> bool:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns if pattern)

    if filter:
        names = [name for name in names if matches(name, filter)]
    return [name for name in names if not matches(name, exclude_filters)]


def split_name(name: str) -> tuple[str, str]:
    """``"mambamlp_base"`` -> ``("mambamlp", "base")``; a ValueError with close matches for an unknown name."""
    family, _, size = name.partition("_")
    if family not in FAMILIES or size not in SIZES:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose one of {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    return family, size


def model_name(config: ModelConfig) -> str:
    """The preset a config is closest to: its family and the size of its width and depth (the nearest
    width, then depth, when it matches none); the config's own fields say the rest."""
    family = family_of(config)
    size = min(SIZES, key=lambda s: (abs(SIZES[s][0] - config.dim), abs(SIZES[s][1] - config.depth)))
    return f"{family}_{size}"


def model_config(name: str, **overrides) -> ModelConfig:
    """The config of preset ``name`` with ``overrides`` applied (validated)."""
    family, size = split_name(name)
    config_type = FAMILIES[family]
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name}; options: {', '.join(sorted(known))}")
    dim, depth = SIZES[size]
    return config_type(**{"dim": dim, "depth": depth, **overrides})


def saved_model_config(name: str, options: dict) -> ModelConfig:
    """:func:`model_config` of options a file saved, completed as the file's version meant them."""
    return model_config(name, **FAMILIES[split_name(name)[0]].saved_options(options))


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes."""
    return MODEL_CLASSES[family_of(config)](config)
