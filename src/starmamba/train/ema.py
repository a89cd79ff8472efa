"""Exponential moving average of a model's weights, evaluated alongside the model when finetuning."""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import get_ema_multi_avg_fn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


class ModelEma:
    """A frozen copy of a model whose parameters follow ``ema = decay * ema + (1 - decay) * weights``.

    torch's EMA function (``get_ema_multi_avg_fn``: one foreach lerp per device and dtype) does the
    averaging. Not through ``AveragedModel``: its update copies a CPU step counter to the device, which
    makes the host wait for the GPU at every step; an update here only queues the lerps and the copy of
    the buffers, which follow the model (ours are fixed tables and indices). The average starts at the
    model's weights, so the first update already moves it by ``1 - decay``. ``state_dict()`` is the
    averaged model's own, so checkpoints hold a plain model state dict.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self._lerp = get_ema_multi_avg_fn(decay)

    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights; call after each optimizer step."""
        groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for averaged, current in zip(self.module.parameters(), unwrap(model).parameters(), strict=True):
            averaged_list, current_list = groups[averaged.device, averaged.dtype]
            averaged_list.append(averaged)
            current_list.append(current.detach())
        for averaged_list, current_list in groups.values():
            self._lerp(averaged_list, current_list, None)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, [b.detach() for b in unwrap(model).buffers()])

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)
