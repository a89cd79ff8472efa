"""The training engine: a ``TrainState``, the ``Task`` a job trains for, and ``train_one_epoch``.

Every random draw of a step is seeded from (seed, rank, micro-step) and every augmentation from
(seed, epoch, image), so a run resumed from a checkpoint repeats an uninterrupted one bit for bit
without saving any random state.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from starmamba.train.config import RunConfig
from starmamba.train.distributed import Processes, TrainSampler, all_reduce_sum
from starmamba.train.ema import ModelEma
from starmamba.train.optim import build_adamw
from starmamba.train.schedule import effective_lr, lr_at, set_lr


@dataclass
class Position:
    """How far a run has come: ``step`` optimizer steps into ``epoch``, ``global_step`` in all."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


class Task(Protocol):
    """What a kind of job (pretraining, finetuning) adds to the shared skeleton of ``run_job``."""

    def load(self, config: Any, processes: Processes) -> tuple[Any, Dataset]:
        """Load the data: the config completed by what the data says, and the training set."""
        ...

    def build_model(self, config: Any) -> tuple[nn.Module, str]:
        """The model to train, and a line saying what it is."""
        ...

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss of a batch and extra values to log; ``generator`` seeds the batch's own draws."""
        ...

    def evaluate(self, state: TrainState, epoch: int) -> dict[str, float]:
        """Metrics after ``epoch`` (0-based), or {}; runs on every process (evaluation is collective)."""
        ...

    def summary(self) -> dict[str, Any]:
        """What the job returns besides its steps, time and output folder."""
        ...


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """A seed per process and micro-batch, so that resuming needs no random state but the position."""
    return (seed * 1_000_003 + rank * 10_007 + micro_step) % (2**63)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as ARM trains), full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainState:
    """The model (DDP-wrapped when there are several processes), its EMA, the optimizer and the position.

    Build it with :meth:`create`. ``state_dict()`` / ``load_state_dict()`` cover what a checkpoint
    holds; ``run``, ``processes`` and the peak ``lr`` are how it was built, not state.
    """

    model: nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    run: RunConfig
    processes: Processes
    lr: float
    position: Position = field(default_factory=Position)

    @classmethod
    def create(cls, model: nn.Module, run: RunConfig, processes: Processes) -> TrainState:
        """Move ``model`` to the device, wrap it in DDP, then copy the EMA and build AdamW.

        DDP broadcasts rank 0's weights when it wraps the model, so the EMA, copied after that,
        starts from the same weights on every process however each process initialised its model.
        """
        model.to(processes.device)
        trained = DistributedDataParallel(model) if processes.world_size > 1 else model
        ema = ModelEma(model, run.ema_decay) if run.ema_decay is not None else None
        effective = run.batch_size * run.accum_iter * processes.world_size
        lr = run.lr if run.lr is not None else effective_lr(run.blr, effective)
        optimizer = build_adamw(
            model, lr, run.weight_decay, tuple(run.betas), run.layer_decay, decay_a_log=run.decay_a_log
        )
        return cls(trained, ema, optimizer, run, processes, lr)

    @property
    def module(self) -> nn.Module:
        """The model itself, outside its DDP wrapper."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "position": asdict(self.position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (the optimizer's tensors move to its parameters' device by themselves)."""
        self.module.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("the checkpoint has no EMA weights, but this run keeps an EMA (ema_decay is set)")
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(**state["position"])

    def set_lr(self, epoch: float) -> float:
        """Set the lr of fractional ``epoch`` (warmup, then cosine) in every group; return it."""
        lr = lr_at(epoch, self.lr, self.run.min_lr, self.run.warmup_epochs, self.run.epochs)
        set_lr(self.optimizer, lr)
        return lr

    def sync_gradients(self, now: bool):
        """A context for a backward pass: DDP averages gradients over processes only when ``now``."""
        if now or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def step(self) -> float | None:
        """Clip, take an optimizer step, update the EMA, move on one step; the gradient norm if clipped."""
        grad_norm = None
        if self.run.clip_grad is not None:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.clip_grad).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module)
        self.position.step += 1
        self.position.global_step += 1
        return grad_norm


class TrainLoader:
    """The training batches of every epoch: this process's share, resumable at any step."""

    def __init__(self, dataset: Dataset, run: RunConfig, processes: Processes) -> None:
        self.dataset, self.run = dataset, run
        self.sampler = TrainSampler(len(dataset), run.batch_size, processes, run.seed)
        self.steps_per_epoch = self.sampler.batches // run.accum_iter
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch of {self.sampler.batches} batches is shorter than accum_iter={run.accum_iter}")
        self.loader = DataLoader(
            dataset, batch_size=run.batch_size, sampler=self.sampler, num_workers=run.num_workers,
            pin_memory=processes.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip
        # A bar only on a terminal: in a log file its carriage-return frames pile up (run_job
        # prints plain lines there instead).
        self.show = run.progress and processes.is_main and sys.stderr.isatty()
        self.bar: tqdm | None = None

    @property
    def micro_batches(self) -> int:
        """Micro-batches per epoch that make whole steps (the rest of an epoch is left out)."""
        return self.steps_per_epoch * self.run.accum_iter

    def epoch(self, position: Position) -> Iterator[tuple[int, tuple[Tensor, Tensor]]]:
        """(micro-batch index in the epoch, (images, labels)) from ``position`` to the epoch's end."""
        start = position.step * self.run.accum_iter
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(position.epoch)
        self.sampler.set_epoch(position.epoch, skip_batches=start)
        self.bar = tqdm(
            self.loader, desc=f"epoch {position.epoch + 1}/{self.run.epochs}", total=self.micro_batches,
            initial=start, disable=not self.show, dynamic_ncols=True, leave=False,
        )  # fmt: skip
        with self.bar:
            for micro, batch in enumerate(self.bar, start=start):
                if micro >= self.micro_batches:
                    break
                yield micro, batch


class LossWindow:
    """The training loss and speed since the last logged step, summed over processes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.images, self.batches, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, images: int) -> None:
        self.loss, self.images, self.batches = self.loss + loss, self.images + images, self.batches + 1

    def read(self) -> dict[str, float]:
        """{'loss': mean over the window's micro-batches, 'images_per_s'}; starts a new window."""
        totals = all_reduce_sum(torch.tensor([self.loss, self.images, self.batches], dtype=torch.float64))
        elapsed = time.perf_counter() - self.start
        self.reset()
        return {"loss": totals[0].item() / totals[2].item(), "images_per_s": totals[1].item() / elapsed}


def train_one_epoch(
    state: TrainState,
    loader: TrainLoader,
    task: Task,
    after_step: Callable[[dict[str, float] | None], None],
    log_now: Callable[[Position], bool] = lambda position: False,
) -> None:
    """Train from ``state.position`` to the end of its epoch.

    ``after_step(values)`` follows every optimizer step; ``values`` (loss, lr, speed, ...) are given
    every ``log_every`` steps, at the epoch's last step and when ``log_now(position)`` says so (it is
    called after every step, on every process), None otherwise.
    """
    run, position, device = state.run, state.position, state.processes.device
    state.model.train()
    window = LossWindow()
    for micro, (images, labels) in loader.epoch(position):
        if micro % run.accum_iter == 0:
            lr = state.set_lr(position.epoch + micro / loader.micro_batches)
        seed = step_seed(run.seed, state.processes.rank, position.global_step * run.accum_iter + micro % run.accum_iter)
        torch.manual_seed(seed)  # the model's own draws (drop path)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        update = (micro + 1) % run.accum_iter == 0
        with state.sync_gradients(update):
            with autocast(device):
                loss, logs = task.loss(state.model, images, labels, torch.Generator().manual_seed(seed))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at epoch {position.epoch}, step {position.step}; stopping. "
                    "Lower the lr, or clip gradients (--clip_grad)."
                )
            (loss / run.accum_iter).backward()
        window.add(loss_value, images.shape[0])
        if not update:
            continue
        grad_norm = state.step()
        values = None
        # The run's first step is logged too: a short run shows its start before log_every steps.
        logged = log_now(position) or position.step % run.log_every == 0 or position.step == loader.steps_per_epoch
        if logged or position.global_step == 1:
            values = {"epoch": position.epoch + position.step / loader.steps_per_epoch, **window.read(), "lr": lr}
            values |= logs | ({"grad_norm": grad_norm} if grad_norm is not None else {})
        after_step(values)
