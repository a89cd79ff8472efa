"""The skeleton every training job shares: ``run_job(config, task)``, and what a run writes.

``run_job`` goes through the same steps for pretraining and finetuning: join the processes, load
the data, complete and write the config, seed, build the model (``TrainState``: DDP, EMA,
optimizer, resumed when asked), open the metrics, train epoch by epoch, export the weights. The
``Task`` supplies what differs: data, model, loss and evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from starmamba.files import write_json
from starmamba.train.checkpoint import (
    checkpoint_step,
    export_weights,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from starmamba.train.config import FinetuneConfig, PretrainConfig, RunConfig, to_dict
from starmamba.train.distributed import Processes, barrier, joined
from starmamba.train.engine import Task, TrainLoader, TrainState, train_one_epoch
from starmamba.train.metrics import MetricsLog, read_metrics
from starmamba.train.plots import plot_curves

JobConfig = PretrainConfig | FinetuneConfig


def run_job(config: JobConfig, task: Task) -> dict[str, Any]:
    """Train ``task`` as ``config`` says; returns the task's summary with ``steps``, ``seconds``, ``output_dir``."""
    with joined(config.device) as processes:
        # Data first: it completes the config (a classifier's number of classes).
        config, train_set = task.load(config, processes)

        # Config: written before training, so that a run that fails can be rerun with --config.
        output = RunOutput(config, processes)
        output.write_config()

        # Seed: the same initial weights on every process (DDP broadcasts rank 0's anyway).
        torch.manual_seed(config.seed)

        # Model: DDP, EMA and optimizer in one place, then the checkpoint to resume from.
        model, description = task.build_model(config)
        state = TrainState.create(model, config, processes)
        loader = TrainLoader(train_set, config, processes)
        if processes.is_main:
            count = sum(p.numel() for p in state.module.parameters()) / 1e6
            print(f"{config.model}: {count:.2f}M parameters, {description}")
            print(describe_batch(state, len(train_set), loader))
        if config.resume:
            resume(state, config)

        # Metrics: a resumed run drops the records after its checkpoint and logs them again.
        metrics = MetricsLog(output.run_dir, enabled=processes.is_main, tensorboard=config.tensorboard)
        metrics.rewind(state.position.global_step)

        # Train, then export the final weights.
        started = time.perf_counter()
        try:
            train(state, loader, task, output, metrics)
        finally:
            metrics.close()

        output.export(state)
        return task.summary() | {
            "steps": state.position.global_step,
            "seconds": time.perf_counter() - started,
            "output_dir": str(output.run_dir),
        }


def train(state: TrainState, loader: TrainLoader, task: Task, output: RunOutput, metrics: MetricsLog) -> None:
    """Train epoch by epoch to ``run.epochs``: log, evaluate, checkpoint and plot as the run's options say."""
    run, position = state.run, state.position

    def after_step(values: dict[str, float] | None) -> None:
        if values is not None:
            metrics.log(position.global_step, **values)
            loader.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if run.ckpt_every and position.global_step % run.ckpt_every == 0 and position.step < loader.steps_per_epoch:
            output.save(state)  # the epoch's last step is saved below, after its evaluation

    while position.epoch < run.epochs:
        train_one_epoch(state, loader, task, after_step)
        epoch = position.epoch
        position.epoch, position.step = epoch + 1, 0
        results = task.evaluate(state, epoch)
        if results:
            metrics.log(position.global_step, epoch=float(epoch + 1), **results)
        output.save(state)
        output.plot()


def describe_batch(state: TrainState, images: int, loader: TrainLoader) -> str:
    """How the effective batch and lr were reached, and the steps an epoch makes."""
    run, world = state.run, state.processes.world_size
    effective = run.batch_size * run.accum_iter * world
    how = f"blr {run.blr:g} x {effective} / 256" if run.lr is None else "given"
    unused = loader.sampler.unused_per_epoch
    return (
        f"effective batch {effective} = {run.batch_size} per process x {run.accum_iter} accumulated x {world} "
        f"process(es); lr {state.lr:.3g} ({how})\n{images} training images: {loader.steps_per_epoch} steps per epoch"
        + (f", {unused} left out per epoch (partial batch)" if unused else "")
    )


def resume(state: TrainState, run: RunConfig) -> None:
    """Load ``run.resume`` into ``state`` ('auto': the run's latest checkpoint, if it has one)."""
    run_dir = Path(run.output_dir)
    latest = latest_checkpoint(run_dir)
    path = latest if run.resume == "auto" else Path(run.resume)
    if path is None:
        return
    if latest is not None and checkpoint_step(latest) > checkpoint_step(path):
        raise ValueError(
            f"{run_dir} already holds the later checkpoint {latest.name}; resuming from {path} would write over "
            "it: resume with --resume auto, or give the resumed run a new --output_dir"
        )
    checkpoint = load_checkpoint(path)
    state.load_state_dict(checkpoint)
    saved = checkpoint["run_config"]
    if state.processes.is_main and (saved.get("epochs"), saved.get("batch_size")) != (run.epochs, run.batch_size):
        changed = f"{saved.get('epochs')}/{saved.get('batch_size')}"
        print(f"note: resuming {path} with epochs/batch_size changed from {changed}")


class RunOutput:
    """What a run writes to its ``output_dir`` (only the main process writes; all meet at saves)."""

    def __init__(self, config: JobConfig, processes: Processes) -> None:
        self.config, self.processes = config, processes
        self.run_dir = Path(config.output_dir)
        self.model_config = config.arch.to_dict()

    def write_config(self) -> None:
        """config.json: rerun with ``--config``."""
        if self.processes.is_main:
            write_json(self.run_dir / "config.json", to_dict(self.config))

    def save(self, state: TrainState) -> None:
        """A checkpoint of ``state`` (collective: every process waits for it)."""
        if self.processes.is_main:
            save_checkpoint(
                self.run_dir, state.state_dict(), model_name=self.config.model, model_config=self.model_config,
                run_config=to_dict(self.config), keep_last=self.config.keep_checkpoints,
            )  # fmt: skip
        barrier()

    def plot(self) -> None:
        """curves.png from metrics.jsonl."""
        if self.processes.is_main:
            records = read_metrics(self.run_dir / "metrics.jsonl")
            plot_curves(records, self.run_dir / "curves.png", title=self.config.model)

    def export(self, state: TrainState) -> None:
        """model.safetensors (and ema.safetensors): the final weights, for finetuning and evaluation."""
        if not self.processes.is_main:
            return
        name, config = self.config.model, self.model_config
        export_weights(self.run_dir / "model.safetensors", state.module.state_dict(), name, config)
        if state.ema is not None:
            export_weights(self.run_dir / "ema.safetensors", state.ema.state_dict(), name, config)
