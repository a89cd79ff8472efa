"""Carrying a pretrained encoder into a classifier: 1 scan -> 4 scans, pretraining grid -> finetuning grid."""

from __future__ import annotations

import re

from torch import Tensor

from starmamba.models.backbone import MambaMLPClassifier
from starmamba.models.pos_embed import resize_pos_embed
from starmamba.models.weights import problems_line

_DIRECTION_KEY = re.compile(r"(blocks\.\d+\.mixer\.directions\.)(\d+)(\..+)")


def classifier_state_from_pretrained(state: dict[str, Tensor], classifier: MambaMLPClassifier) -> dict[str, Tensor]:
    """A full state dict for ``classifier`` whose encoder comes from a pretrained ``state``.

    ``state`` holds ``encoder.*`` weights (a STAR/ARM pretraining model, or a classifier) with one
    or more scan directions. Directions the source lacks are copied from its first (forward) one,
    and the position embedding is resized bicubically to the classifier's grid (e.g. 12x12 at
    192 px to 14x14 at 224 px). The class token, final norm and head keep the classifier's fresh
    initialisation. Raises a ValueError listing every encoder weight that is missing, unused or of
    the wrong shape, so a checkpoint of another model never loads half-way.
    """
    source = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if not source:
        raise ValueError("the pretrained state has no encoder.* weights")
    target = classifier.state_dict()
    grid = classifier.cfg.grid
    merged, used, missing, mismatched = dict(target), set(), [], []
    for key, current in target.items():
        if not key.startswith("encoder."):
            continue
        name = key.removeprefix("encoder.")
        match = _DIRECTION_KEY.fullmatch(name)
        origin = name if name in source or not match else f"{match[1]}0{match[3]}"
        if origin not in source:
            missing.append(name)
            continue
        value = source[origin]
        if name == "pos_embed" and value.shape[1] != current.shape[1]:
            value = resize_pos_embed(value, (grid, grid))
        if value.shape != current.shape:
            mismatched.append(f"{name}: {tuple(value.shape)} vs {tuple(current.shape)}")
            continue
        merged[key] = value.to(current.dtype)
        used.add(origin)
    unused = sorted(set(source) - used)
    problems = problems_line({"missing": missing, "unused": unused, "shape mismatches": mismatched})
    if problems:
        raise ValueError("pretrained encoder does not fit this classifier; " + problems)
    return merged
