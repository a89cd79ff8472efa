"""The training loop shared by pretraining and finetuning.

One plain loop: per-iteration lr (warmup + cosine), gradient accumulation, clipping, AdamW with
layer-wise lr decay, EMA of weights, checkpoints at step boundaries, and exact resumption. Every
random draw of a step is seeded from (seed, rank, micro-step) and every augmentation from
(seed, epoch, image), so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from starmamba.train.checkpoint import (
    export_weights,
    latest_checkpoint,
    load_training_state,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from starmamba.train.config import RunConfig, to_dict
from starmamba.train.distributed import Processes, TrainSampler, all_reduce_sum, barrier
from starmamba.train.ema import ModelEma
from starmamba.train.metrics import MetricsLog, read_metrics
from starmamba.train.optim import build_adamw
from starmamba.train.plots import plot_curves
from starmamba.train.schedule import effective_lr, lr_at, set_lr

# loss(model, images, labels, generator) -> (loss, values to log); the generator seeds the step's draws.
LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], tuple[Tensor, dict[str, float]]]
# end_of_epoch(epoch, model, ema) -> metrics to log; runs on every process (evaluation is collective).
EpochFn = Callable[[int, nn.Module, ModelEma | None], dict[str, float]]


@dataclass
class Position:
    """How far a run has come: ``step`` optimizer steps into ``epoch``, ``global_step`` in all."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """A seed per process and micro-batch, so that resuming needs no random state but the position."""
    return (seed * 1_000_003 + rank * 10_007 + micro_step) % (2**63)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as ARM trains), full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_batch(run: RunConfig, processes: Processes) -> tuple[int, float, str]:
    """Effective batch, absolute lr, and a line saying how they were reached."""
    effective = run.batch_size * run.accum_iter * processes.world_size
    lr = run.lr if run.lr is not None else effective_lr(run.blr, effective)
    how = f"lr {lr:.3g} (given)" if run.lr is not None else f"lr {lr:.3g} = blr {run.blr:g} x {effective} / 256"
    return (
        effective,
        lr,
        (
            f"effective batch {effective} = {run.batch_size} per process x {run.accum_iter} accumulated "
            f"x {processes.world_size} process(es); {how}"
        ),
    )


def fit(
    run: RunConfig,
    *,
    model: nn.Module,
    model_name: str,
    model_config: dict,
    train_set: Dataset,
    loss_fn: LossFn,
    end_of_epoch: EpochFn,
    processes: Processes,
    metrics: MetricsLog,
    layer_decay: float = 1.0,
    ema_decay: float | None = None,
) -> Position:
    """Train ``model`` on ``train_set`` for ``run.epochs`` epochs; returns where it ended."""
    run_dir = Path(run.output_dir)
    device = processes.device
    model.to(device)
    ema = ModelEma(model, ema_decay) if ema_decay is not None else None
    _, lr, line = describe_batch(run, processes)
    optimizer = build_adamw(model, lr, run.weight_decay, tuple(run.betas), layer_decay)
    sampler = TrainSampler(len(train_set), run.batch_size, processes, run.seed)
    steps_per_epoch = sampler.batches // run.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch of {sampler.batches} batches is shorter than accum_iter={run.accum_iter}")
    if processes.is_main:
        print(line)
        print(
            f"{len(train_set)} training images: {steps_per_epoch} steps per epoch"
            + (f", {sampler.unused_per_epoch} left out per epoch (partial batch)" if sampler.unused_per_epoch else "")
        )
    position = _resume(run, model, ema, optimizer, device) if run.resume else Position()
    metrics.rewind(position.global_step)
    trained = DistributedDataParallel(model) if processes.world_size > 1 else model
    loader = DataLoader(
        train_set, batch_size=run.batch_size, sampler=sampler, num_workers=run.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )  # fmt: skip

    def checkpoint() -> None:
        if processes.is_main:
            save_checkpoint(
                run_dir, global_step=position.global_step, model_name=model_name, model_config=model_config,
                model_state=model.state_dict(), ema_state=ema.state_dict() if ema else None,
                optimizer_state=optimizer.state_dict(), epoch=position.epoch, step_in_epoch=position.step,
                run_config=to_dict(run), keep_last=run.keep_checkpoints,
            )  # fmt: skip
        barrier()

    while position.epoch < run.epochs:
        epoch = position.epoch
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, skip_batches=position.step * run.accum_iter)
        model.train()
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{run.epochs}", total=steps_per_epoch * run.accum_iter,
            initial=position.step * run.accum_iter, disable=not (run.progress and processes.is_main),
            dynamic_ncols=True, leave=False,
        )  # fmt: skip
        window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
        for micro, (images, labels) in enumerate(bar, start=position.step * run.accum_iter):
            if micro >= steps_per_epoch * run.accum_iter:
                break  # the tail of an epoch that does not fill a whole accumulation
            if micro % run.accum_iter == 0:
                current_lr = lr_at(epoch + micro / (steps_per_epoch * run.accum_iter), lr, run.min_lr,
                                   run.warmup_epochs, run.epochs)  # fmt: skip
                set_lr(optimizer, current_lr)
            seed = step_seed(run.seed, processes.rank, position.global_step * run.accum_iter + micro % run.accum_iter)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            update = (micro + 1) % run.accum_iter == 0
            no_sync = trained.no_sync() if isinstance(trained, DistributedDataParallel) and not update else None
            with no_sync or contextlib.nullcontext():
                with autocast(device):
                    loss, logs = loss_fn(trained, images, labels, generator)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"loss is {loss_value} at epoch {epoch}, step {position.step}; stopping. "
                        "Lower the lr, or clip gradients (--clip_grad)."
                    )
                (loss / run.accum_iter).backward()
            window_loss += loss_value
            window_images += images.shape[0]
            if not update:
                continue
            grad_norm = None
            if run.clip_grad is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip_grad).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            position.step += 1
            position.global_step += 1
            if position.step % run.log_every == 0 or position.step == steps_per_epoch:
                elapsed = time.perf_counter() - window_start
                totals = all_reduce_sum(torch.tensor([window_loss, window_images], dtype=torch.float64))
                micro_batches = window_images / images.shape[0] * processes.world_size
                values = {
                    "epoch": epoch + position.step / steps_per_epoch,
                    "loss": totals[0].item() / micro_batches,
                    "lr": current_lr,
                    "images_per_s": totals[1].item() / elapsed,
                    **logs,
                }
                if grad_norm is not None:
                    values["grad_norm"] = grad_norm
                metrics.log(position.global_step, **values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{current_lr:.2e}",
                                img_s=f"{values['images_per_s']:.0f}")  # fmt: skip
                window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
            if run.ckpt_every and position.global_step % run.ckpt_every == 0 and position.step < steps_per_epoch:
                checkpoint()
        bar.close()
        position.epoch, position.step = epoch + 1, 0
        epoch_metrics = end_of_epoch(epoch, model, ema)
        if epoch_metrics:
            metrics.log(position.global_step, epoch=float(epoch + 1), **epoch_metrics)
        checkpoint()
        if processes.is_main:
            plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png", title=model_name)
    if processes.is_main:
        export_weights(run_dir / "model.safetensors", model.state_dict(), model_name, model_config)
        if ema is not None:
            export_weights(run_dir / "ema.safetensors", ema.state_dict(), model_name, model_config)
    return position


def _resume(
    run: RunConfig, model: nn.Module, ema: ModelEma | None, optimizer: torch.optim.Optimizer, device: torch.device
) -> Position:
    """Load weights, EMA, optimizer and position from ``run.resume`` ('auto': the run's latest)."""
    path = latest_checkpoint(Path(run.output_dir)) if run.resume == "auto" else Path(run.resume)
    if path is None:
        return Position()
    state, _ = load_weights(path)
    model.load_state_dict(state)
    training = load_training_state(path)
    if ema is not None:
        ema_state, _ = load_weights(path / "ema.safetensors")
        ema.load_state_dict(ema_state)
    optimizer.load_state_dict(training["optimizer"])
    for group_state in optimizer.state.values():
        for key, value in group_state.items():
            if isinstance(value, Tensor) and key != "step":
                group_state[key] = value.to(device)
    restore_rng_state(training["rng"])
    saved = json.loads(training["run_config"])
    if saved.get("epochs") != run.epochs or saved.get("batch_size") != run.batch_size:
        print(
            f"note: resuming {path} with epochs/batch_size changed from {saved.get('epochs')}/{saved.get('batch_size')}"
        )
    return Position(training["epoch"], training["step_in_epoch"], training["global_step"])
