"""AdamW with layer-wise lr decay and per-parameter weight decay (the MAE/BEiT finetuning recipe).

The groups come from timm's model protocol: ``no_weight_decay()`` names the undecayed parameters
and ``group_matcher()`` the layers, so any model that timm's optimizer factory understands works here.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's layer id from ``model.group_matcher()``, and the number of layers.

    As timm's ``group_with_matcher`` reads it: a parameter belongs to the first pattern (in the
    dict's order) that matches the start of its name; a pattern's captured number (a block index)
    splits it into one group per number; a parameter no pattern matches goes after all of them; the
    groups, sorted by (pattern order, number), get ids 0, 1, 2, ...
    """
    if not callable(getattr(model, "group_matcher", None)):
        raise TypeError(f"{type(model).__name__} has no group_matcher(): layer groups need timm's model protocol")
    patterns = [(order, re.compile(pattern)) for order, pattern in enumerate(model.group_matcher().values())]
    keys: dict[str, tuple[float, ...]] = {}
    for name, _ in model.named_parameters():
        keys[name] = (math.inf,)
        for order, pattern in patterns:
            if match := pattern.match(name):
                keys[name] = (order, *(int(number) for number in match.groups() if number is not None))
                break
    ranks = {key: rank for rank, key in enumerate(sorted(set(keys.values())))}
    return {name: ranks[key] for name, key in keys.items()}, len(ranks)


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, *, decay_a_log: bool = False
) -> list[dict]:
    """Optimizer groups, one per (layer id, decayed or not) that holds trainable parameters.

    Each group has ``params``, ``names`` (the parameters' names), ``weight_decay`` (0 for the
    names in ``model.no_weight_decay()``) and ``lr_scale = layer_decay ** (num_layers - 1 - layer_id)``
    with layer ids from ``layer_ids``, so the head trains at the full lr and each layer below it at
    ``layer_decay`` times the one above. Groups are ordered by layer id, the undecayed group of a layer
    first. ``decay_a_log`` decays the SSM's ``A_log`` even where the model exempts it, as ARM's
    optimizer (which builds its groups from shapes and names, never reading the model's exemptions) does.
    """
    if not callable(getattr(model, "no_weight_decay", None)):
        raise TypeError(f"{type(model).__name__} has no no_weight_decay(): weight decay needs timm's model protocol")
    exempt = model.no_weight_decay()
    layers, num_layers = layer_ids(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layers[name]
        decayed = name not in exempt or (decay_a_log and name.endswith(".A_log"))
        group = groups.setdefault(
            (layer, decayed),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr_scale": layer_decay ** (num_layers - 1 - layer),
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    layer_decay: float = 1.0,
    *,
    decay_a_log: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, ...)``, each group's lr already set to ``lr * lr_scale``.

    The extra group keys (``names``, ``lr_scale``) are kept by torch and saved in its state_dict.
    """
    groups = param_groups(model, weight_decay, layer_decay, decay_a_log=decay_a_log)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
