"""``create_model``: a preset built, or loaded from a folder or file, as timm's ``create_model`` does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from starmamba.models.convert import classifier_state_from_pretrained
from starmamba.models.features import FeatureGetter
from starmamba.models.loading import load_pretrained_state
from starmamba.models.registry import MODEL_CLASSES, build_model, model_config, split_name


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
