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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from starmamba.errors import RunError
from starmamba.train.config import RunConfig
from starmamba.train.distributed import Processes, TrainSampler, all_reduce_min, all_reduce_sum
from starmamba.train.ema import ModelEma
from starmamba.train.optim import build_adamw
from starmamba.train.precision import autocast, grad_scaler
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
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The loss of a batch (0-dim) and extra values to log (0-dim tensors, left on the device, or floats);
        ``generator`` seeds the batch's own draws. Logged values are averaged like the loss."""
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


@dataclass
class TrainState:
    """The model (DDP-wrapped when there are several processes), its EMA, the optimizer, the fp16 loss
    scaler (a pass-through at other precisions) and the position.

    Build it with :meth:`create`. ``state_dict()`` / ``load_state_dict()`` cover what a checkpoint
    holds; ``run``, ``processes`` and the peak ``lr`` are how it was built, not state.
    """

    model: nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    run: RunConfig
    processes: Processes
    lr: float
    scaler: torch.amp.GradScaler
    position: Position = field(default_factory=Position)

    @classmethod
    def create(cls, model: nn.Module, run: RunConfig, processes: Processes) -> TrainState:
        """Move ``model`` to the device, wrap it in DDP, then copy the EMA and build AdamW.

        DDP broadcasts rank 0's weights when it wraps the model, so the EMA, copied after that,
        starts from the same weights on every process however each process initialised its model.
        Its buffers are not broadcast again every step: they are constant (position tables, scan
        orders, layout indices). ``run.grad_checkpointing`` turns on the model's activation checkpointing.
        """
        model.to(processes.device)
        if run.grad_checkpointing:
            model.set_grad_checkpointing(True)
        trained = DistributedDataParallel(model, broadcast_buffers=False) if processes.world_size > 1 else model
        ema = ModelEma(model, run.ema_decay) if run.ema_decay is not None else None
        effective = run.batch_size * run.accum_iter * processes.world_size
        lr = run.lr if run.lr is not None else effective_lr(run.blr, effective)
        optimizer = build_adamw(
            model, lr, run.weight_decay, tuple(run.betas), run.layer_decay, decay_a_log=run.decay_a_log
        )
        return cls(trained, ema, optimizer, run, processes, lr, grad_scaler(processes.device, run.precision))

    @property
    def module(self) -> nn.Module:
        """The model itself, outside its DDP wrapper."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
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
        if state.get("scaler"):  # empty when saved at a precision without loss scaling
            self.scaler.load_state_dict(state["scaler"])
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

    def step(self) -> Tensor | None:
        """Clip, take an optimizer step, update the EMA, move on one step; the gradient norm (0-dim, on the
        device, not read) if clipped.

        In fp16 the gradients are unscaled first, and the scaler skips the optimizer step (and lowers
        its scale) when they overflowed.
        """
        grad_norm = None
        self.scaler.unscale_(self.optimizer)
        if self.run.clip_grad is not None:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module)
        self.position.step += 1
        self.position.global_step += 1
        return grad_norm


class _EpochTagged(Sampler[tuple[int, int]]):
    """A :class:`TrainSampler`'s indices as (epoch, index): DataLoader workers kept alive across epochs hold
    their own copy of the data set, so the epoch its augmentations are drawn for travels with each index."""

    def __init__(self, sampler: TrainSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.sampler.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _AtEpoch(Dataset):
    """Items (epoch, index) of :class:`_EpochTagged`: ``dataset[index]`` as augmented in ``epoch``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class TrainLoader:
    """The training batches of every epoch: this process's share, resumable at any step. Its data-loading
    workers live as long as it does."""

    def __init__(self, dataset: Dataset, run: RunConfig, processes: Processes) -> None:
        self.dataset, self.run = dataset, run
        self.sampler = TrainSampler(len(dataset), run.batch_size, processes, run.seed)
        self.steps_per_epoch = self.sampler.batches // run.accum_iter
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch of {self.sampler.batches} batches is shorter than accum_iter={run.accum_iter}")
        self.loader = DataLoader(
            _AtEpoch(dataset), batch_size=run.batch_size, sampler=_EpochTagged(self.sampler),
            num_workers=run.num_workers, pin_memory=processes.device.type == "cuda",
            persistent_workers=run.num_workers > 0,
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


class NonFiniteLoss(RunError):
    """The training loss became NaN or infinite at optimizer ``step`` (1-based) of ``epoch`` (0-based)."""

    def __init__(self, message: str, step: int, epoch: int) -> None:
        super().__init__(message)
        self.step, self.epoch = step, epoch


def stop_if_not_finite(first_step: float, epoch: int) -> None:
    """Raise :class:`NonFiniteLoss` naming ``first_step``, the first optimizer step (1-based) whose loss was
    NaN or infinite, or inf if there was none. Given the same value on every process (the minimum over
    them), every process stops with the same line, before its weights are checkpointed."""
    if math.isfinite(first_step):
        raise NonFiniteLoss(
            f"the training loss is not finite (NaN or inf) at step {int(first_step)} (epoch {epoch + 1}); "
            "stopping, the last checkpoint is kept: lower the lr, or clip gradients (--clip_grad)",
            int(first_step),
            epoch,
        )


class LossWindow:
    """The loss and every logged value since the last logged step, averaged over the window's micro-batches
    on every process, and the speed.

    Values stay where they are (on the device) until :meth:`read`, so that steps between logged ones never
    wait for the device; so does the step of the first non-finite loss, which :meth:`first_non_finite`
    agrees on over the processes.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.images, self.start = 0, time.perf_counter()

    def add(self, values: Mapping[str, Tensor | float]) -> None:
        """Add one value of each of ``values`` (0-dim tensors or numbers) to the window."""
        for key, value in values.items():
            value = value.detach().double() if isinstance(value, Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def add_batch(self, loss: Tensor, logs: Mapping[str, Tensor | float], images: int, step: int) -> None:
        """One micro-batch of ``images`` images in optimizer step ``step`` (1-based): its loss and logs."""
        loss = loss.detach()
        bad = torch.where(torch.isfinite(loss), math.inf, float(step))
        self.first_bad = bad if self.first_bad is None else torch.minimum(self.first_bad, bad)
        self.add({"loss": loss, **logs})
        self.images += images

    def first_non_finite(self) -> float:
        """The first step (over every process) whose loss was not finite, or inf (collective)."""
        bad = self.first_bad if self.first_bad is not None else torch.tensor(math.inf)
        return all_reduce_min(bad.to(self.device, torch.float64).reshape(1)).item()

    def read(self) -> dict[str, float]:
        """Every value's mean over the window and the processes, and 'images_per_s'; starts a new window
        (collective: the one time the window waits for the device)."""
        keys = list(self.sums)
        sums = [torch.as_tensor(self.sums[key], dtype=torch.float64, device=self.device) for key in keys]
        counts = torch.tensor([*(self.counts[key] for key in keys), self.images], dtype=torch.float64)
        totals = all_reduce_sum(torch.cat([torch.stack(sums), counts.to(self.device)])).tolist()
        elapsed = time.perf_counter() - self.start
        self.reset()
        means = {key: totals[i] / totals[len(keys) + i] for i, key in enumerate(keys)}
        return means | {"images_per_s": totals[-1] / elapsed}


def train_one_epoch(
    state: TrainState,
    loader: TrainLoader,
    task: Task,
    after_step: Callable[[dict[str, float] | None], None],
    log_now: Callable[[Position], bool] = lambda position: False,
) -> None:
    """Train from ``state.position`` to the end of its epoch.

    ``after_step(values)`` follows every optimizer step; ``values`` (loss and the task's logged values,
    averaged since the last logged step; lr, speed, the mean clipped gradient norm) are given every
    ``log_every`` steps, at the epoch's last step and when ``log_now(position)`` says so (it is called
    after every step, on every process), None otherwise. Nothing is read from the device between those
    steps. At them, and at checkpoint steps, every process checks that no loss was NaN or infinite and
    stops with :class:`NonFiniteLoss` otherwise.
    """
    run, position, device = state.run, state.position, state.processes.device
    state.model.train()
    window = LossWindow(device)
    for micro, (images, labels) in loader.epoch(position):
        if micro % run.accum_iter == 0:
            lr = state.set_lr(position.epoch + micro / loader.micro_batches)
        seed = step_seed(run.seed, state.processes.rank, position.global_step * run.accum_iter + micro % run.accum_iter)
        torch.manual_seed(seed)  # the model's own draws (drop path)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        update = (micro + 1) % run.accum_iter == 0
        with state.sync_gradients(update):
            with autocast(device, run.precision):
                loss, logs = task.loss(state.model, images, labels, torch.Generator().manual_seed(seed))
            state.scaler.scale(loss / run.accum_iter).backward()
        window.add_batch(loss, logs, images.shape[0], position.global_step + 1)
        if not update:
            continue
        grad_norm = state.step()
        if grad_norm is not None:
            window.add({"grad_norm": grad_norm})
        # The run's first step is logged too: a short run shows its start before log_every steps.
        logged = log_now(position) or position.step % run.log_every == 0 or position.step == loader.steps_per_epoch
        logged = logged or position.global_step == 1
        if logged or (run.ckpt_every and position.global_step % run.ckpt_every == 0):
            stop_if_not_finite(window.first_non_finite(), position.epoch)
        values = None
        if logged:
            values = {"epoch": position.epoch + position.step / loader.steps_per_epoch, **window.read(), "lr": lr}
        after_step(values)
