"""The skeleton every training job shares: ``run_job(config, task)``, and what a run writes.

``run_job`` goes through the same steps for pretraining and finetuning: join the processes, load
the data, complete and write the config, seed, build the model (``TrainState``: DDP, EMA,
optimizer, resumed when asked), open the metrics, train epoch by epoch, export the weights. The
``Task`` supplies what differs: data, model, loss and evaluation.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starmamba.errors import RunError, write_error
from starmamba.files import write_json
from starmamba.models import SIZES
from starmamba.train.checkpoint import (
    checkpoint_step,
    export_weights,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from starmamba.train.config import FinetuneConfig, PretrainConfig, RunConfig, to_dict
from starmamba.train.distributed import Processes, all_reduce_sum, barrier, joined
from starmamba.train.engine import Task, TrainLoader, TrainState, train_one_epoch
from starmamba.train.metrics import MetricsLog, read_metrics
from starmamba.train.outdir import OutputDirError, claim_output_dir
from starmamba.train.plots import plot_curves

JobConfig = PretrainConfig | FinetuneConfig


def run_job(config: JobConfig, task: Task) -> dict[str, Any]:
    """Train ``task`` as ``config`` says; returns the task's summary with ``steps``, ``images``, ``seconds``,
    ``skipped_images`` and ``output_dir``."""
    with joined(config.device) as processes, claimed(config, processes):
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
        output.name_model(state.module)
        loader = TrainLoader(train_set, config, processes)
        start = resume(state, config) if config.resume else "no checkpoint, starting fresh"
        if state.position.epoch >= config.epochs:
            start = f"{start}: already complete ({config.epochs} epochs)"
        if processes.is_main:
            print(f"{output.title}, {description}")
            print(describe_batch(state, len(train_set), loader))
            print(start)

        # Metrics: a resumed run drops the records after its checkpoint and logs them again.
        metrics = MetricsLog(output.run_dir, enabled=processes.is_main, tensorboard=config.tensorboard)
        metrics.rewind(state.position.global_step)

        # Train, then export the final weights.
        started, first_step = time.perf_counter(), state.position.global_step
        try:
            with out_of_memory_hint(config, processes):
                train(state, loader, task, output, metrics)
            skipped = skipped_images(train_set)
            if skipped:
                metrics.log(state.position.global_step, skipped_images=skipped)
        finally:
            metrics.close()

        output.export(state)
        steps = state.position.global_step - first_step
        summary = task.summary() | {
            "steps": state.position.global_step,
            "images": steps * config.batch_size * config.accum_iter * processes.world_size,
            "seconds": time.perf_counter() - started,
            "skipped_images": skipped,
            "output_dir": str(output.run_dir),
        }
        if processes.is_main:
            print(output.describe_end(summary, steps))
        return summary


@contextlib.contextmanager
def claimed(config: JobConfig, processes: Processes) -> Iterator[None]:
    """Hold ``config.output_dir`` for the run (:func:`claim_output_dir` on rank 0); every rank stops if it fails.

    Rank 0 checks and locks the folder before anything is loaded or written; the other ranks wait for
    its answer, so that a refused folder ends every process at once instead of leaving them at a barrier.
    """
    lock, refusal = None, None
    if processes.is_main:
        try:
            lock = claim_output_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)
        except OutputDirError as error:
            refusal = error
    failed = all_reduce_sum(torch.tensor([float(refusal is not None)]))
    if refusal is not None:
        raise refusal
    if failed.item():
        raise OutputDirError(f"rank 0 refused the output folder {config.output_dir}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def out_of_memory_hint(config: JobConfig, processes: Processes) -> Iterator[None]:
    """Turn running out of (GPU or CPU) memory into a :class:`RunError` that says how to need less."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as error:
        smaller = max(1, config.batch_size // 2)
        raise RunError(
            f"out of memory on {processes.device} with --batch_size {config.batch_size}: try --batch_size "
            f"{smaller} --accum_iter {config.accum_iter * config.batch_size // smaller} (the same effective batch)"
        ) from error


def skipped_images(train_set: Any) -> int:
    """Unreadable training images skipped so far, over every process (0 for data sets that cannot have any)."""
    count = getattr(getattr(train_set, "dataset", train_set), "num_skipped", 0)
    return int(all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())


def train(state: TrainState, loader: TrainLoader, task: Task, output: RunOutput, metrics: MetricsLog) -> None:
    """Train epoch by epoch to ``run.epochs``: log, evaluate, checkpoint and plot as the run's options say."""
    run, position = state.run, state.position

    def after_step(values: dict[str, float] | None) -> None:
        if values is not None:
            metrics.log(position.global_step, **values)
            loader.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
            if run.progress and not loader.show and state.processes.is_main:
                print(
                    f"epoch {position.epoch + 1}/{run.epochs}, step {position.step}/{loader.steps_per_epoch}: "
                    f"loss {values['loss']:.4f}, lr {values['lr']:.2e}, {values['images_per_s']:.1f} images/s"
                    + group_losses(values),
                    flush=True,
                )
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


def group_losses(values: dict[str, float]) -> str:
    """``; loss/floor by target group: separator 0.001/0.000, ...`` for the groups ``values`` holds, else ''.

    The floor is the loss of predicting the patch mean: a group whose loss stays near it learns nothing.
    """
    groups = [key.removeprefix("loss_") for key in values if key.startswith("loss_")]
    pairs = [f"{g} {values[f'loss_{g}']:.3f}/{values[f'floor_{g}']:.3f}" for g in groups if f"floor_{g}" in values]
    return f"; loss/floor by target group: {', '.join(pairs)}" if pairs else ""


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


def resume(state: TrainState, run: RunConfig) -> str:
    """Load ``run.resume`` into ``state`` ('auto': the run's latest checkpoint, if it has one); say from where.

    With 'auto', a newest checkpoint that cannot be read (truncated, corrupt) is passed over, with a
    warning, for the newest earlier one that can.
    """
    run_dir = Path(run.output_dir)
    if run.resume == "auto":
        candidates = complete_checkpoints(run_dir)
        if not candidates:
            return f"no checkpoint in {run_dir}, starting fresh"
    else:
        candidates = [Path(run.resume)]
        newest = complete_checkpoints(run_dir)
        if newest and checkpoint_step(newest[0]) > checkpoint_step(candidates[0]):
            raise ValueError(
                f"{run_dir} already holds the later checkpoint {newest[0].name}; resuming from {candidates[0]} "
                "would write over it: resume with --resume auto, or give the resumed run a new --output_dir"
            )
    for index, path in enumerate(candidates):
        try:
            checkpoint = load_checkpoint(path)
            break
        except ValueError as error:
            if index + 1 == len(candidates):
                raise
            warnings.warn(f"{error}; resuming from the checkpoint before it, {candidates[index + 1]}", stacklevel=2)
    state.load_state_dict(checkpoint)
    saved = checkpoint["run_config"]
    if state.processes.is_main and (saved.get("epochs"), saved.get("batch_size")) != (run.epochs, run.batch_size):
        changed = f"{saved.get('epochs')}/{saved.get('batch_size')}"
        print(f"note: resuming {path} with epochs/batch_size changed from {changed}")
    return f"resuming from step {state.position.global_step} ({path})"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first, those after the one ``latest`` names left out."""
    try:
        latest = latest_checkpoint(run_dir)
    except FileNotFoundError as error:
        warnings.warn(str(error), stacklevel=3)
        latest = None
    root = run_dir / "checkpoints"
    found = sorted(
        (p for p in root.glob("step-*") if p.is_dir() and _is_step_dir(p)), key=checkpoint_step, reverse=True
    )
    if latest is not None:
        found = [p for p in found if checkpoint_step(p) <= checkpoint_step(latest)]
    return found


def _is_step_dir(path: Path) -> bool:
    try:
        checkpoint_step(path)
    except ValueError:
        return False
    return True


class RunOutput:
    """What a run writes to its ``output_dir`` (only the main process writes; all meet at saves).

    A full disk or a refused permission while writing is a :class:`RunError` naming the file.
    """

    def __init__(self, config: JobConfig, processes: Processes) -> None:
        self.config, self.processes = config, processes
        self.run_dir = Path(config.output_dir)
        self.model_config = config.arch.to_dict()
        self.model_name, self.description, self.title = config.model, config.model, config.model

    def name_model(self, model: nn.Module) -> None:
        """Title the run by what the model is, not by the preset its options started from.

        The weights' metadata keeps the preset as ``model``: with the saved config (which holds the real
        width and depth) it is what rebuilds the model; ``description`` holds this name.
        """
        self.description = model_title(self.config.model, self.config.arch)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        self.title = f"{self.description}: {count:.2f}M"

    def write_config(self) -> None:
        """config.json: rerun with ``--config``."""
        if self.processes.is_main:
            with writing(self.run_dir / "config.json"):
                write_json(self.run_dir / "config.json", to_dict(self.config))

    def save(self, state: TrainState) -> None:
        """A checkpoint of ``state`` (collective: every process waits for it)."""
        if self.processes.is_main:
            with writing(self.run_dir / "checkpoints" / f"step-{state.position.global_step:08d}"):
                save_checkpoint(
                    self.run_dir, state.state_dict(), model_name=self.model_name, model_config=self.model_config,
                    run_config=to_dict(self.config), keep_last=self.config.keep_checkpoints,
                    description=self.description,
                )  # fmt: skip
        barrier()

    def plot(self) -> None:
        """curves.png from metrics.jsonl."""
        if self.processes.is_main:
            records = read_metrics(self.run_dir / "metrics.jsonl")
            with writing(self.run_dir / "curves.png"):
                plot_curves(records, self.run_dir / "curves.png", title=self.title)

    def export(self, state: TrainState) -> None:
        """model.safetensors (and ema.safetensors): the final weights, for finetuning and evaluation."""
        if not self.processes.is_main:
            return
        name, config, description = self.model_name, self.model_config, self.description
        with writing(self.run_dir / "model.safetensors"):
            export_weights(self.run_dir / "model.safetensors", state.module.state_dict(), name, config, description)
        if state.ema is not None:
            with writing(self.run_dir / "ema.safetensors"):
                export_weights(self.run_dir / "ema.safetensors", state.ema.state_dict(), name, config, description)

    def describe_end(self, summary: dict[str, Any], steps: int) -> str:
        """The run's last lines: what it did, its final metrics, and where its results are."""
        minutes, seconds = divmod(round(summary["seconds"]), 60)
        scores = ", ".join(f"{key} {value:.2f}" for key, value in summary.items() if key.endswith("acc1"))
        files = [name for name in ("model.safetensors", "ema.safetensors", "curves.png", "reconstructions.png")
                 if (self.run_dir / name).is_file()]  # fmt: skip
        return "\n".join(
            [
                f"done: {steps} steps ({summary['images']} images) in {minutes}m{seconds:02d}s, "
                f"at step {summary['steps']} of the run",
                *([f"final: {scores}"] if scores else []),
                f"unreadable images skipped: {summary['skipped_images']}",
                f"results in {self.run_dir}: {', '.join(files)}",
            ]
        )


def model_title(preset: str, arch: Any) -> str:
    """``preset`` if the architecture has its width and depth, else the family with them: ``star (dim 96, depth 6)``."""
    family, _, size = preset.partition("_")
    if SIZES.get(size) == (arch.dim, arch.depth):
        return preset
    return f"{family} (dim {arch.dim}, depth {arch.depth})"


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """Name ``target`` in the :class:`RunError` of a full disk or a refused permission met while writing it."""
    try:
        yield
    except OSError as error:
        raise write_error(error, target) from error
