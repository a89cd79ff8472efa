"""Exponential moving average of a model's weights, evaluated alongside the model when finetuning."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


class ModelEma:
    """A frozen copy of a model whose weights follow ``ema = decay * ema + (1 - decay) * weights``.

    Floating-point parameters and buffers are averaged; other buffers (counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights; call after each optimizer step."""
        weights = unwrap(model).state_dict()
        for name, average in self.module.state_dict().items():
            value = weights[name].detach()
            if average.is_floating_point():
                average.mul_(self.decay).add_(value.to(average.dtype), alpha=1.0 - self.decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)
