"""AdamW with layer-wise lr decay and per-parameter weight decay (the MAE/BEiT finetuning recipe)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class LayeredModel(Protocol):
    """A model that says which layer each parameter belongs to and which parameters skip weight decay.

    Layer ids run from 0 (embeddings) to ``num_layers - 1`` (head); names are those of
    ``named_parameters()``.
    """

    num_layers: int

    def layer_id(self, name: str) -> int: ...

    def skips_weight_decay(self, name: str, param: nn.Parameter) -> bool: ...


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, *, decay_a_log: bool = False
) -> list[dict]:
    """Optimizer groups, one per (layer id, decayed or not) that holds trainable parameters.

    Each group has ``params``, ``names`` (the parameters' names), ``weight_decay`` (0 for the
    parameters the model exempts) and ``lr_scale = layer_decay ** (num_layers - 1 - layer_id)``,
    so the head trains at the full lr and each layer below it at ``layer_decay`` times the one above.
    Groups are ordered by layer id, the undecayed group of a layer first. ``decay_a_log`` decays the
    SSM's ``A_log`` even where the model exempts it, as ARM's optimizer (which builds its groups from
    shapes and names, never reading the model's exemptions) does.
    """
    if not isinstance(model, LayeredModel):
        raise TypeError(f"{type(model).__name__} does not implement LayeredModel (num_layers, layer_id, ...)")
    num_layers = model.num_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = model.layer_id(name)
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer_id({name!r}) = {layer} is outside 0..{num_layers - 1}")
        decayed = not model.skips_weight_decay(name, param) or (decay_a_log and name.endswith(".A_log"))
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
