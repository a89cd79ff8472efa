"""Exponential moving average of a model's weights, evaluated alongside the model when finetuning."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


class ModelEma:
    """A frozen copy of a model whose parameters follow ``ema = decay * ema + (1 - decay) * weights``.

    torch's ``AveragedModel`` with its EMA function does the averaging (one foreach lerp per device and
    dtype); buffers follow the model (ours are fixed tables and indices, no running statistics). The
    average starts at the model's weights, so the first update already moves it by ``1 - decay``.
    ``state_dict()`` is the averaged model's own, so checkpoints hold a plain model state dict.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        model = unwrap(model)
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        # AveragedModel's first update copies the weights; done here, every update() is an EMA step.
        self.averaged.update_parameters(model)
        self.averaged.eval().requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model, in eval mode."""
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights; call after each optimizer step."""
        self.averaged.update_parameters(unwrap(model))

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)
