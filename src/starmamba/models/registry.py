"""Named presets: ``mambamlp_*`` classifiers (224 px, 4 scans) and ``star_*`` pretraining models (192 px)."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from torch import nn

from starmamba.models.backbone import ClassifierConfig, MambaMLPClassifier
from starmamba.models.convert import classifier_state_from_pretrained
from starmamba.models.features import FeatureGetter
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


def create_model(
    name: str,
    pretrained: bool | str | Path | None = False,
    features_only: bool = False,
    out_indices: int | Sequence[int] = 3,
    **overrides,
) -> nn.Module:
    """Build preset ``name`` with ``overrides``, e.g. ``create_model("star_base", images_per_sequence=4)``, as
    timm's ``create_model``.

    ``pretrained``: no weights are published, so a folder (or file) rather than True:

    - a folder from ``save_pretrained`` or ``starmamba export`` (or a Hub repo id holding one) of model
      ``name``: the model is built from its config (with ``overrides``) and its weights, as
      ``from_pretrained`` does; another ``img_size`` resamples the learned position embedding;
    - for ``mambamlp_*``, a pretraining run (STAR or ARM) or its export, a ``.safetensors`` file or ARM's
      ``.pth``: the classifier of ``name`` and ``overrides`` gets that encoder, as ``finetune --finetune``
      does (the class token and head stay freshly initialised).

    ``global_pool`` as timm's: 'avg', 'token', or '' for none (None: the preset's). ``features_only``
    returns a feature extractor (:class:`~starmamba.models.features.FeatureGetter`) of blocks ``out_indices``
    (an int n: the last n; as timm's ViTs, the last 3 by default) with its ``feature_info``.
    """
    family, _ = split_name(name)
    if pretrained is True:
        raise ValueError(
            f"no pretrained weights are published for {name}: pass pretrained=FOLDER, a folder written by "
            "`starmamba export` or save_pretrained (or a Hub repo id holding one); for mambamlp_* also a "
            "pretraining run, a .safetensors file or ARM's .pth, whose encoder is loaded"
        )
    if features_only and family != "mambamlp":
        raise ValueError(f"features_only is for the mambamlp_* classifiers, not {name}")
    if overrides.get("global_pool", "unset") is None:
        del overrides["global_pool"]  # as timm: None leaves the preset's
    no_pool = family == "mambamlp" and overrides.get("global_pool") == ""
    if no_pool:
        del overrides["global_pool"]
    if not pretrained:
        model = build_model(model_config(name, **overrides))
        model.pretrained_cfg = {"architecture": name}
    elif family == "mambamlp" and holds_encoder(pretrained):
        model = build_model(model_config(name, **overrides))
        # Imported here: loading files is the train layer's (ARM's .pth, run folders).
        from starmamba.train.loading import load_pretrained_state

        state = load_pretrained_state(pretrained)
        try:
            model.load_state_dict(classifier_state_from_pretrained(state, model))
        except ValueError as error:
            raise ValueError(f"{pretrained}: {error}; pass the encoder's options (dim=, depth= ...)") from None
        model.pretrained_cfg = {"architecture": name}
    else:
        model = MODEL_CLASSES[family].from_pretrained(pretrained, architecture=name, **overrides)
    if no_pool:
        model.global_pool = ""
    return FeatureGetter(model, out_indices) if features_only else model


def holds_encoder(pretrained: str | Path) -> bool:
    """Whether ``pretrained`` is a source of an encoder only, to load as ``--finetune`` does: a weights file, a
    run folder, or the Hub folder of a pretraining model (not a repo id, not a classifier's Hub folder)."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("arch" in config or str(config.get("architecture")).startswith("star_"))
