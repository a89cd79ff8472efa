"""The skeleton every training job shares: ``run_job(config, task)``, and what a run writes.

``run_job`` goes through the same steps for pretraining and finetuning: join the processes, lock
the output folder, load the data (which completes the config), seed, build the model
(``TrainState``: DDP, EMA, optimizer), resume it when asked, and only then write to the folder:
set aside the run ``--overwrite`` replaces, write the config, open the metrics, train epoch by
epoch, export the weights. Whatever fails before that leaves the folder as it was. The ``Task``
supplies what differs: data, model, loss and evaluation.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from starmamba.errors import Interrupted, RunError, write_error
from starmamba.files import write_json
from starmamba.models import SIZES
from starmamba.models.weights import check_compatible
from starmamba.train.checkpoint import (
    checkpoint_step,
    export_weights,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from starmamba.train.config import FinetuneConfig, PretrainConfig, RunConfig, to_dict
from starmamba.train.distributed import Processes, all_reduce_sum, barrier, joined
from starmamba.train.engine import NonFiniteLoss, Position, Task, TrainLoader, TrainState, train_one_epoch
from starmamba.train.metrics import MetricsLog, read_metrics
from starmamba.train.outdir import Claim, OutputDirError, claim_output_dir, resumes_run_in, run_artefacts
from starmamba.train.plots import plot_curves
from starmamba.train.precision import resolve_precision

JobConfig = PretrainConfig | FinetuneConfig


def run_job(config: JobConfig, task: Task) -> dict[str, Any]:
    """Train ``task`` as ``config`` says; returns the task's summary with ``steps``, ``images``, ``seconds``,
    ``skipped_images`` and ``output_dir``."""
    with joined(config.device) as processes, surviving_closed_stdout(config), claimed(config, processes) as claim:
        # Everything that can fail at the start comes before the folder is written to: the data
        # (it completes the config: a classifier's number of classes), the model, the resume.
        config, train_set = task.load(config, processes)

        # Seed: the same initial weights on every process (DDP broadcasts rank 0's anyway).
        torch.manual_seed(config.seed)

        # Model: DDP, EMA and optimizer in one place, then the checkpoint to resume from.
        model, description = task.build_model(config)
        state = TrainState.create(model, config, processes)
        output = RunOutput(config, processes, claim)
        output.name_model(state.module)
        loader = TrainLoader(train_set, config, processes)
        start = resume(state, config) if config.resume else "no checkpoint, starting fresh"
        if state.position.epoch >= config.epochs:
            start = f"{start}: already complete ({config.epochs} epochs)"

        # The folder: the run this one replaces goes aside, the config (of a resume that worked) is written.
        output.begin()
        if processes.is_main:
            print(f"{output.title}, {description}")
            print(describe_batch(state, len(train_set), loader))
            print(start)

        # Metrics: a resumed run drops the records after its checkpoint and logs them again.
        with output.writing("metrics.jsonl"):
            metrics = MetricsLog(output.run_dir, enabled=processes.is_main, tensorboard=config.tensorboard)
            metrics.rewind(state.position.global_step)

        # Train, then export the final weights.
        started, first_step = time.perf_counter(), state.position.global_step
        try:
            with out_of_memory_hint(config, processes), non_finite_hint(state, output):
                train(state, loader, task, output, metrics)
            # A task that evaluates on images of its own exposes them as ``val_set``.
            skipped = skipped_images(train_set) + skipped_images(getattr(task, "val_set", None))
            if skipped:
                with output.writing("metrics.jsonl"):
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
def claimed(config: JobConfig, processes: Processes) -> Iterator[Claim | None]:
    """Hold ``config.output_dir`` for the run (:func:`claim_output_dir` on rank 0); every rank stops if it fails.

    Rank 0 checks and locks the folder before anything is loaded or written; the other ranks wait for
    its answer, so that a refused folder ends every process at once instead of leaving them at a barrier.
    Yields rank 0's claim (None on the other ranks). If the run fails before its first checkpoint, the
    run it was to replace is put back.
    """
    claim, refusal = None, None
    if processes.is_main:
        try:
            claim = claim_output_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)
        except OutputDirError as error:
            refusal = error
    failed = all_reduce_sum(torch.tensor([float(refusal is not None)]))
    if refusal is not None:
        raise refusal
    if failed.item():
        raise OutputDirError(f"rank 0 refused the output folder {config.output_dir}")
    run_dir = Path(config.output_dir)
    both = claim is not None and config.overwrite and config.resume
    if both and resumes_run_in(config.resume, run_dir) and run_artefacts(run_dir):
        print(f"note: --resume {config.resume} continues the run in {run_dir}; --overwrite is ignored "
              "(leave out --resume to replace the run)")  # fmt: skip
    try:
        yield claim
    except BaseException:
        if claim is not None:
            try:
                claim.replacement.restore()
            except OSError as error:
                warnings.warn(f"could not put the replaced run back from {claim.replacement.aside}: {error}",
                              stacklevel=1)  # fmt: skip
            claim.release(failed=True)
        raise
    if claim is not None:
        claim.release()


class _DiscardOnceClosed(io.TextIOBase):
    """stdout that, once its reader has gone (``| head``), discards what it is given and says so on stderr."""

    def __init__(self, stream: Any, note: str) -> None:
        self.stream, self.note = stream, note

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        # The descriptor itself goes to devnull, so that what the stream still buffers (and the
        # interpreter's last flush) find a reader.
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        print(self.note, file=sys.stderr, flush=True)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


@contextlib.contextmanager
def surviving_closed_stdout(config: JobConfig) -> Iterator[None]:
    """Keep training when stdout's reader goes away (``starmamba pretrain ... | head -1``): the printed
    lines are dropped, with one note on stderr; metrics and checkpoints still go to the run's folder."""
    note = (f"stdout was closed; training goes on without printing (follow it in "
            f"{Path(config.output_dir) / 'metrics.jsonl'})")  # fmt: skip
    original = sys.stdout
    sys.stdout = _DiscardOnceClosed(original, note)
    try:
        yield
    finally:
        sys.stdout = original


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


@contextlib.contextmanager
def non_finite_hint(state: TrainState, output: RunOutput) -> Iterator[None]:
    """Say what a loss that is no longer finite (the engine's :class:`NonFiniteLoss`, agreed by every process)
    usually means, and which checkpoint is kept, in one line."""
    try:
        yield
    except NonFiniteLoss as error:
        found = f"the loss is not finite (NaN or inf) at step {error.step} (epoch {error.epoch + 1})"
        raise RunError(non_finite_message(found, state, output)) from error


def non_finite_message(found: str, state: TrainState, output: RunOutput) -> str:
    """``found`` (what went NaN or inf, and when), its usual causes, and which checkpoint is kept."""
    precision = resolve_precision(state.processes.device, state.run.precision)
    kept = output.last_checkpoint
    last = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint of this run was written"
    return (
        f"{found}; the usual causes are a learning rate too high for the model (lr {state.lr:.3g} here: lower "
        f"--blr or --lr, or clip gradients with --clip_grad) or too little precision ({precision}); {last}"
    )


def skipped_images(dataset: Any) -> int:
    """Unreadable images of ``dataset`` skipped so far, over every process (0 for None, and for data sets that
    cannot have any)."""
    count = getattr(getattr(dataset, "dataset", dataset), "num_skipped", 0)
    return int(all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while training: the first asks the run to stop at the next step boundary,
    after a checkpoint; the same signal again stops at once.

    Every process checks the request at every step (:meth:`agreed`, a one-number all-reduce), so that
    under torchrun all ranks stop after the same step whichever of them the signal reached. Installed
    only in the main thread (where Python runs signal handlers).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.received, self.stopping, self.announce = 0, 0, announce
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the training process decides
            return
        name = signal.Signals(signum).name
        if signum == self.received:
            raise Interrupted(f"{name} again: stopped at once; continue from the last checkpoint with --resume auto",
                              signum)  # fmt: skip
        if not self.received:
            self.received = signum
            if self.announce:  # os.write: print() may be in the middle of a write of its own
                os.write(2, f"\n{name}: stopping after this step, with a checkpoint ({name} again stops at once)\n"
                         .encode())  # fmt: skip

    def agreed(self) -> int:
        """The signal to stop for, agreed by every process (0: go on); collective."""
        flag = torch.tensor([self.received], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopping = int(flag.item())
        return self.stopping


def train(state: TrainState, loader: TrainLoader, task: Task, output: RunOutput, metrics: MetricsLog) -> None:
    """Train epoch by epoch to ``run.epochs``: log, evaluate, checkpoint and plot as the run's options say.

    SIGINT and SIGTERM stop the run after the step under way, with a checkpoint (:class:`StopSignals`):
    it raises :class:`Interrupted`.
    """
    run, position = state.run, state.position

    def checkpoint_due() -> bool:
        # The epoch's last step is saved after the epoch, with its evaluation.
        due = bool(run.ckpt_every) and position.global_step % run.ckpt_every == 0
        return due and position.step < loader.steps_per_epoch

    def log_now(_: Position) -> bool:
        # A checkpoint closes the loss window, so that a run resumed from it logs the very lines of one
        # that was not stopped; and a stop request is agreed here, before the window is read.
        return bool(stop.agreed()) or checkpoint_due()

    def after_step(values: dict[str, float] | None) -> None:
        if values is not None:
            with output.writing("metrics.jsonl"):
                metrics.log(position.global_step, **values)
            loader.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
            if run.progress and not loader.show and state.processes.is_main:
                print(
                    f"epoch {position.epoch + 1}/{run.epochs}, step {position.step}/{loader.steps_per_epoch}: "
                    f"loss {values['loss']:.4f}, lr {values['lr']:.2e}, {values['images_per_s']:.1f} images/s"
                    + group_losses(values),
                    flush=True,
                )
        if stop.stopping or checkpoint_due():
            output.save(state)
        if stop.stopping:
            raise Interrupted(f"interrupted at step {position.global_step}; continue with --resume auto "
                              f"(checkpoint {output.last_checkpoint})", stop.stopping)  # fmt: skip

    with StopSignals(announce=state.processes.is_main) as stop:
        while position.epoch < run.epochs:
            train_one_epoch(state, loader, task, after_step, log_now)
            epoch = position.epoch
            position.epoch, position.step = epoch + 1, 0
            results = task.evaluate(state, epoch)
            if results:
                with output.writing("metrics.jsonl"):
                    metrics.log(position.global_step, epoch=float(epoch + 1), **results)
            output.save(state)
            output.plot()
            if position.epoch < run.epochs and stop.agreed():
                raise Interrupted(f"interrupted at step {position.global_step}; continue with --resume auto "
                                  f"(checkpoint {output.last_checkpoint})", stop.stopping)  # fmt: skip


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
    saved = checkpoint["run_config"]
    check_resumable(saved, run, run_dir if run.resume == "auto" else path)
    check_compatible(checkpoint["model"], state.module, source=str(path))
    state.load_state_dict(checkpoint)
    if state.processes.is_main and (saved.get("epochs"), saved.get("batch_size")) != (run.epochs, run.batch_size):
        changed = f"{saved.get('epochs')}/{saved.get('batch_size')}"
        print(f"note: resuming {path} with epochs/batch_size changed from {changed}")
    return f"resuming from step {state.position.global_step} ({path})"


def check_resumable(saved: dict[str, Any], run: JobConfig, source: Path) -> None:
    """Refuse to resume a checkpoint of another kind of job, or of another architecture, naming what differs.

    ``saved`` is the checkpoint's run config; ``source`` is what the user asked to resume (a run folder
    or a checkpoint). A resumed run keeps its checkpoint's architecture: options that change it are errors.
    """
    model = saved.get("model", "")
    if model and model.partition("_")[0] != run.model.partition("_")[0]:  # star_* pretrains, mambamlp_* finetunes
        if isinstance(run, FinetuneConfig):
            raise ValueError(f"{source} holds a pretraining run ({model}); to finetune from it use --finetune "
                             f"{source} with another --output_dir")  # fmt: skip
        raise ValueError(f"{source} holds a finetuning run ({model}), which pretraining cannot continue; "
                         "choose another --output_dir")  # fmt: skip
    saved_arch, arch = saved.get("arch", {}), to_dict(run).get("arch", {})
    differ = [key for key in arch if key in saved_arch and saved_arch[key] != arch[key]]
    if differ:
        was = ", ".join(f"{key} {saved_arch[key]}" for key in differ)
        now = ", ".join(f"{key} {arch[key]}" for key in differ)
        flags = " ".join(f"--{key}" for key in differ)
        raise ValueError(
            f"{source} holds a model of {was}; this run asks for {now}: a resumed run keeps its checkpoint's "
            f"architecture, so leave out {flags} (or give --config with the run's config.json)"
        )


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

    Nothing is written before :meth:`begin`. A full disk or a refused permission while writing is a
    :class:`RunError` naming the file.
    """

    def __init__(self, config: JobConfig, processes: Processes, claim: Claim | None) -> None:
        self.config, self.processes, self.claim = config, processes, claim
        self.run_dir = Path(config.output_dir)
        self.model_config = config.arch.to_dict()
        self.model_name, self.description, self.title = config.model, config.model, config.model
        self.last_checkpoint: str | None = None

    def name_model(self, model: nn.Module) -> None:
        """Title the run by what the model is, not by the preset its options started from.

        The weights' metadata keeps the preset as ``model``: with the saved config (which holds the real
        width and depth) it is what rebuilds the model; ``description`` holds this name.
        """
        self.description = model_title(self.config.model, self.config.arch)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        self.title = f"{self.description}: {count:.2f}M"

    def begin(self) -> None:
        """The run starts writing: the run it replaces goes aside (until :meth:`save` or :meth:`export`
        succeeds), and config.json is written (rerun with ``--config``; a resumed run's only once its
        checkpoint has loaded)."""
        if self.claim is None:
            return
        with self.writing(self.run_dir):
            self.claim.replacement.set_aside()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.writing("config.json"):
            write_json(self.run_dir / "config.json", to_dict(self.config))
        with contextlib.suppress(FileNotFoundError):  # a broken pointer: the resume has already warned
            latest = latest_checkpoint(self.run_dir)
            self.last_checkpoint = str(latest) if latest is not None else None

    @contextlib.contextmanager
    def writing(self, name: str | Path) -> Iterator[None]:
        """Name ``run_dir / name`` in the :class:`RunError` of a full disk or a refused permission."""
        with writing(self.run_dir / name):
            yield

    def save(self, state: TrainState) -> None:
        """A checkpoint of ``state`` (collective: every process waits for it), once its weights are finite."""
        if not all(torch.isfinite(p).all() for p in state.module.parameters()):  # the same on every process
            found = f"the weights are not finite (NaN or inf) after step {state.position.global_step}"
            raise RunError(non_finite_message(found, state, self))
        checkpoint = self.run_dir / "checkpoints" / f"step-{state.position.global_step:08d}"
        if self.processes.is_main:
            with self.writing(checkpoint):
                save_checkpoint(
                    self.run_dir, state.state_dict(), model_name=self.model_name, model_config=self.model_config,
                    run_config=to_dict(self.config), keep_last=self.config.keep_checkpoints,
                    description=self.description,
                )  # fmt: skip
            self.claim.replacement.discard()
        barrier()
        self.last_checkpoint = str(checkpoint)

    def plot(self) -> None:
        """curves.png from metrics.jsonl."""
        if self.processes.is_main:
            records = read_metrics(self.run_dir / "metrics.jsonl")
            with self.writing("curves.png"):
                plot_curves(records, self.run_dir / "curves.png", title=self.title)

    def export(self, state: TrainState) -> None:
        """model.safetensors (and ema.safetensors): the final weights, for finetuning and evaluation."""
        if not self.processes.is_main:
            return
        name, config, description = self.model_name, self.model_config, self.description
        with self.writing("model.safetensors"):
            export_weights(self.run_dir / "model.safetensors", state.module.state_dict(), name, config, description)
        if state.ema is not None:
            with self.writing("ema.safetensors"):
                export_weights(self.run_dir / "ema.safetensors", state.ema.state_dict(), name, config, description)
        self.claim.replacement.discard()

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
    """Name ``target`` in the :class:`RunError` of a full disk or a refused permission met while writing it
    (:func:`starmamba.errors.write_error`: also the writers' own errors that carry one)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        mapped = write_error(error, target)
        if mapped is error:
            raise
        raise mapped from error
