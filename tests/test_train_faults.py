"""A failed start costs nothing: run_job checks data, model and resume before it writes to the output folder;
Ctrl-C and SIGTERM save a checkpoint; a closed stdout, a NaN loss, a full disk and bad options end in one line."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from starmamba.cli import main
from starmamba.errors import Interrupted, RunError
from starmamba.models import model_config
from starmamba.train import checkpoint as checkpoint_module
from starmamba.train.config import PretrainConfig, load_config_file
from starmamba.train.finetune import run_finetune
from starmamba.train.job import StopSignals
from starmamba.train.metrics import read_metrics
from starmamba.train.outdir import LOCK_NAME, leftover_replacements
from starmamba.train.pretrain import PretrainTask, run_pretrain
from test_train_jobs import PRETRAIN_FLAGS, TINY, cli, tiny_finetune, tiny_pretrain

NO_SPACE = 'kind: StorageFull, message: "No space left on device"'


def quick(out: Path, **overrides) -> PretrainConfig:
    """A 2-step pretraining run (16 images, batch 8, one epoch)."""
    return tiny_pretrain(out, **({"epochs": 1, "limit_train": 16, "limit_val": 4} | overrides))


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
            and p.name != LOCK_NAME}  # fmt: skip


def nan_loss_from_step(step: int):
    """PretrainTask.loss, NaN from the ``step``-th call on."""
    calls = []
    real = PretrainTask.loss

    def loss(task, model, images, labels, generator):
        calls.append(1)
        value, logs = real(task, model, images, labels, generator)
        return (value * float("nan") if len(calls) >= step else value), logs

    return loss


@pytest.fixture
def finished(tmp_path) -> tuple[Path, dict[str, bytes]]:
    run_pretrain(quick(tmp_path / "run"))
    return tmp_path / "run", files_of(tmp_path / "run")


def corrupt_idx_folder(root: Path) -> str:
    root.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (root / name).write_bytes(b"\x00\x00\x08\x03\x00\x00")  # a header cut short
    return str(root)


@pytest.mark.parametrize(
    "bad",
    [
        {"data_path": "synthetc"},  # a typo
        {"batch_size": 32},  # more than the 16 images
        {"data_path": "corrupt"},
        {
            "resume": "auto",
            "arch": model_config(
                "star_tiny",
                **(TINY | {"dim": 64}),
                cluster_size=2,
                images_per_sequence=2,
                decoder_dim=32,
                decoder_head_dim=16,
            ),
        },
    ],
    ids=["data_path typo", "batch larger than the data", "corrupt data", "resume another architecture"],
)
def test_overwrite_with_a_start_that_fails_keeps_the_previous_run(finished, tmp_path, bad):
    run_dir, before = finished
    if bad.get("data_path") == "corrupt":
        bad = {"data_path": corrupt_idx_folder(tmp_path / "corrupt")}
    with pytest.raises((ValueError, FileNotFoundError)):
        run_pretrain(quick(run_dir, overwrite=True, **bad))
    assert files_of(run_dir) == before
    assert leftover_replacements(run_dir) == []


def test_overwrite_with_a_run_that_fails_before_its_first_checkpoint_puts_the_previous_run_back(finished, monkeypatch):
    run_dir, before = finished
    monkeypatch.setattr(PretrainTask, "loss", nan_loss_from_step(1))
    with pytest.raises(RunError, match="not finite"):
        run_pretrain(quick(run_dir, overwrite=True, seed=1))
    assert files_of(run_dir) == before


def test_overwrite_deletes_the_previous_run_only_once_the_new_one_has_a_checkpoint(finished, monkeypatch):
    run_dir, before = finished
    aside_at_save = []
    real_save = checkpoint_module.save_checkpoint

    def save(*args, **kwargs):
        (aside,) = leftover_replacements(run_dir)
        aside_at_save.append(sorted(str(p.relative_to(aside)) for p in aside.rglob("*") if p.is_file()))
        return real_save(*args, **kwargs)

    monkeypatch.setattr("starmamba.train.job.save_checkpoint", save)
    run_pretrain(quick(run_dir, overwrite=True, seed=1))
    assert aside_at_save == [sorted(before)]  # the whole old run, still there when the first checkpoint is written
    assert leftover_replacements(run_dir) == []
    assert load_file(run_dir / "model.safetensors").keys() == load_file(run_dir / "checkpoints" / "step-00000002"
                                                                        / "model.safetensors").keys()  # fmt: skip
    assert files_of(run_dir)["model.safetensors"] != before["model.safetensors"]  # seed 1: new weights


def test_overwrite_given_with_resume_auto_says_that_the_resume_wins(finished, capsys):
    run_dir, before = finished
    run_pretrain(quick(run_dir, overwrite=True, resume="auto"))
    assert f"note: --resume auto continues the run in {run_dir}; --overwrite is ignored" in capsys.readouterr().out
    assert (
        files_of(run_dir)["checkpoints/step-00000002/training_state.pt"]
        == before["checkpoints/step-00000002/training_state.pt"]
    )  # the run was resumed (already complete), not replaced


def test_finetuning_resumed_in_a_pretraining_run_is_refused_before_anything_is_written(finished, capsys):
    run_dir, before = finished
    flags = ["--data_path", "synthetic", "--model", "mambamlp_tiny", "--img_size", "16", "--patch_size", "4",
             "--dim", "32", "--depth", "2", "--num_workers", "0", "--no_progress", "--no_tensorboard"]  # fmt: skip
    assert main(["finetune", *flags, "--output_dir", str(run_dir), "--resume", "auto"]) == 2
    assert capsys.readouterr().err == (
        f"starmamba finetune: error: {run_dir} holds a pretraining run (star_tiny); to finetune from it use "
        f"--finetune {run_dir} with another --output_dir\n"
    )
    assert files_of(run_dir) == before


def test_resuming_with_another_architecture_names_the_fields_and_keeps_the_config(finished, capsys):
    run_dir, before = finished
    flags = [*PRETRAIN_FLAGS, "--output_dir", str(run_dir)]
    assert main(["pretrain", *flags, "--resume", "auto", "--dim", "64", "--depth", "3"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"starmamba pretrain: error: {run_dir} holds a model of dim 32, depth 2; this run asks for dim 64, depth 3: "
        "a resumed run keeps its checkpoint's architecture, so leave out --dim --depth (or give --config with the "
        "run's config.json)\n"
    )
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    assert main(["pretrain", *flags, "--resume", str(checkpoint), "--dim", "64"]) == 2
    assert capsys.readouterr().err.startswith(f"starmamba pretrain: error: {checkpoint} holds a model of dim 32;")
    assert files_of(run_dir) == before

    # The run's own config.json (still dim 32) resumes it.
    config = load_config_file(run_dir / "config.json", PretrainConfig, PretrainConfig())
    summary = run_pretrain(PretrainConfig(**(vars(config) | {"resume": "auto", "epochs": 2})))
    assert summary["steps"] == 4


def test_a_nan_loss_is_one_line_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(PretrainTask, "loss", nan_loss_from_step(4))
    monkeypatch.setattr("starmamba.cli.COMMANDS", {"pretrain": lambda argv: run_pretrain(
        quick(tmp_path / "run", epochs=2, ckpt_every=1, keep_checkpoints=3))})  # fmt: skip
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err
    good = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert err == (
        "starmamba pretrain: error: the loss is not finite (NaN or inf) at step 4 (epoch 2); the usual causes are a "
        "learning rate too high for the model (lr 3.13e-05 here: lower --blr or --lr, or clip gradients with "
        f"--clip_grad) or too little precision (fp32); the last good checkpoint, {good}, is kept\n"
    )
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000003\n"
    assert all(torch.isfinite(t).all() for t in load_file(good / "model.safetensors").values())


def test_weights_that_went_non_finite_are_not_saved(tmp_path, monkeypatch):
    real_step = checkpoint_module.torch.optim.AdamW.step

    def poisoned(optimizer, *args, **kwargs):
        result = real_step(optimizer, *args, **kwargs)
        optimizer.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(RunError, match=r"^the weights are not finite \(NaN or inf\) after step 1; .* no checkpoint of"):
        run_pretrain(quick(tmp_path / "run", ckpt_every=1))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("option", ["--lr inf", "--lr nan", "--min_lr inf", "--betas 0.9 nan", "--warmup_epochs inf"])
def test_non_finite_options_are_refused_when_parsed(tmp_path, capsys, option):
    out = tmp_path / "run"
    assert main(["pretrain", *PRETRAIN_FLAGS, "--output_dir", str(out), *option.split()]) == 2
    flag, *values = option.split()
    value = values[0] if len(values) == 1 else f"({', '.join(values)})"
    assert f"{flag[2:]}={value} is not a finite number" in capsys.readouterr().err
    assert not out.exists()


def test_a_huge_learning_rate_stops_with_the_nan_line_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *PRETRAIN_FLAGS, "--output_dir", str(out), "--lr", "1e30", "--clip_grad", "None"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("starmamba pretrain: error: the ") and " is not finite (NaN or inf) at step " in err
    assert "lr 1e+30 here" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("writer", "failure"),
    [
        ("save_file", SafetensorError(f"Error while serializing: IoError(Os {{ code: 28, {NO_SPACE} }})")),
        ("torch.save", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1010")),
        ("torch.save", RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")),
        ("save_file", OSError(errno.ENOSPC, "No space left on device")),
    ],
    ids=["safetensors", "torch.save unexpected pos", "torch.save write failed", "OSError"],
)
def test_a_full_disk_is_the_one_line_disk_full_error_whatever_the_writer_raises(tmp_path, monkeypatch, capsys,
                                                                               writer, failure):  # fmt: skip
    def full(*args, **kwargs):
        raise failure

    if writer == "save_file":
        monkeypatch.setattr(checkpoint_module, "save_file", full)
    else:
        monkeypatch.setattr(checkpoint_module.torch, "save", full)
    monkeypatch.setattr("starmamba.cli.COMMANDS", {"pretrain": lambda argv: run_pretrain(quick(tmp_path / "run"))})
    assert main(["pretrain"]) == 2
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert capsys.readouterr().err == (
        f"starmamba pretrain: error: no space left on device while writing {step}; free space or choose another "
        "--output_dir\n"
    )


def test_a_one_class_data_set_is_refused_for_finetuning(tmp_path):
    from test_train_run import write_folder

    write_folder(tmp_path / "data", unreadable=0)
    for split in ("train", "val"):
        for path in (tmp_path / "data" / split / "b").iterdir():
            path.unlink()
        (tmp_path / "data" / split / "b").rmdir()
    with pytest.raises(ValueError, match=r"data has 1 class \(a\); a classifier needs at least 2"):
        run_finetune(tiny_finetune(tmp_path / "run", data_path=str(tmp_path / "data")))
    assert not (tmp_path / "run").exists()
    run_pretrain(quick(tmp_path / "pre", data_path=str(tmp_path / "data")))  # pretraining takes it


def _without_root_file_access() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that even root cannot list a mode-0 folder."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_class_folder_that_cannot_be_listed_is_an_error_naming_it(tmp_path):
    from test_train_run import write_folder

    write_folder(tmp_path / "data", unreadable=0)
    locked = tmp_path / "data" / "train" / "b"
    locked.chmod(0)
    code = (
        "import sys\nfrom starmamba.data import build_dataset\n"
        "try:\n    build_dataset(sys.argv[1], 'train')\nexcept PermissionError as error:\n    sys.exit(str(error))\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], capture_output=True, text=True,
                                preexec_fn=_without_root_file_access, timeout=60)  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert result.stderr == f"cannot list {locked} (Permission denied); fix its permissions (a data set folder " \
                            "must be readable and searchable)\n"  # fmt: skip


def test_unreadable_validation_images_are_in_the_skipped_count(tmp_path, capsys):
    from test_train_run import write_folder

    write_folder(tmp_path / "data", unreadable=0)
    (tmp_path / "data" / "val" / "a" / "0.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        summary = run_pretrain(quick(tmp_path / "run", data_path=str(tmp_path / "data"), max_unreadable=0.3))
    assert summary["skipped_images"] == 1
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["skipped_images"] == 1
    assert "unreadable images skipped: 1" in capsys.readouterr().out


def test_a_separator_position_with_no_separator_is_refused(tmp_path, capsys):
    flags = [*PRETRAIN_FLAGS, "--output_dir", str(tmp_path / "run"), "--separator", "none"]
    assert main(["pretrain", *flags, "--separator_position", "SC"]) == 2
    assert capsys.readouterr().err == (
        "starmamba pretrain: error: --separator_position given with --separator none: there is no separator to "
        "place; leave it out, or choose a --separator\n"
    )
    assert not (tmp_path / "run").exists()


def test_the_same_signal_twice_stops_at_once():
    with StopSignals(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert (stop.received, stop.agreed()) == (signal.SIGTERM, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # another signal: already stopping
        with pytest.raises(Interrupted, match=r"^SIGTERM again: stopped at once") as caught:
            os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back


def test_a_forked_data_loader_worker_leaves_the_signal_to_the_training_process():
    with StopSignals(announce=True) as stop:
        child = os.fork()
        if child == 0:  # as a DataLoader worker is: it inherits the handler; Ctrl-C reaches it too
            try:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                os._exit(3 if stop.received else 0)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stop.received == 0


LONG = [*PRETRAIN_FLAGS, "--limit_train", "400", "--epochs", "1"]  # 50 steps


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_epoch_saves_a_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path, signum,
                                                                                                code):  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"  # every step logged: the loss of each
    subprocess.run(cli("pretrain", *LONG, "--log_every", "1", "--output_dir", str(whole)), check=True, env=env,
                   capture_output=True)  # fmt: skip
    run_dir, flags = tmp_path / "run", [*LONG, "--log_every", "7", "--output_dir", str(tmp_path / "run")]
    process = subprocess.Popen(cli("pretrain", *flags), env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    wait_for_step(run_dir / "metrics.jsonl", 1, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert 1 <= step < 45, last  # the epoch has 50 steps: it stopped in the middle
    checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
    assert last == (
        f"starmamba pretrain: interrupted at step {step}; continue with --resume auto (checkpoint {checkpoint})"
    )
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{step:08d}\n"

    subprocess.run(cli("pretrain", *flags, "--resume", "auto"), check=True, env=env, capture_output=True)
    expected, resumed = load_file(whole / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    # Each logged loss is the mean of the steps since the line before, the interrupted step's line
    # and the first after the resume included.
    per_step = {r["step"]: r["loss"] for r in read_metrics(whole / "metrics.jsonl") if "loss" in r}
    logged = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(logged) == sorted({1, step, *range(7, 50, 7), 50})
    steps = sorted(logged)
    for before, at in itertools.pairwise([0, *steps]):
        expected_mean = sum(per_step[s] for s in range(before + 1, at + 1)) / (at - before)
        assert logged[at] == pytest.approx(expected_mean, rel=1e-9), at


@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_training(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` after its line: every write fails
    try:
        result = subprocess.run(cli("pretrain", *PRETRAIN_FLAGS, "--output_dir", str(tmp_path / "run")),
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert f"stdout was closed; training goes on without printing (follow it in {tmp_path / 'run'}" in result.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 12


def test_evaluate_reads_an_exported_folder_s_own_config(tmp_path):
    from starmamba.train.config import EvaluateConfig
    from starmamba.train.evaluate import run_evaluate
    from starmamba.train.export import export_run

    fine = run_finetune(tiny_finetune(tmp_path / "fine", epochs=1))
    export_run(tmp_path / "fine", tmp_path / "hub")
    result = run_evaluate(EvaluateConfig(checkpoint=str(tmp_path / "hub"), data_path="synthetic", limit_val=32,
                                         num_workers=0))  # fmt: skip
    assert result["acc1"] == pytest.approx(fine["acc1"])  # the same weights, and crop_pct 1.0 from the export
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["model_args"]["dim"] == 32


def child_with_rank(parent: int, rank: int) -> int:
    """The pid of the process torchrun (``parent``) started for ``rank``."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            with contextlib.suppress(OSError):
                if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                    return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no process of rank {rank} under {parent}")


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "starmamba.cli", "pretrain", *LONG, "--output_dir", str(run_dir)]  # fmt: skip
    process = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        rank1 = child_with_rank(process.pid, 1)
        wait_for_step(run_dir / "metrics.jsonl", 1, process)  # rank 0 logs: both ranks are training
        os.kill(rank1, signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the next step's all-reduce
        _, err = process.communicate(timeout=180)
    finally:
        process.kill()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert 1 <= step < 25, err  # 25 steps an epoch over 2 processes: stopped in the middle
    assert not (run_dir / "model.safetensors").exists()
    # Both ranks stopped after that step (rank 0 wrote the checkpoint, rank 1 waited for it).
    assert err.count(f"interrupted at step {step}; continue with --resume auto") == 2, err


def test_resuming_a_checkpoint_that_does_not_exist_says_so(tmp_path, capsys):
    assert main(["pretrain", *PRETRAIN_FLAGS, "--output_dir", str(tmp_path / "run"), "--resume", "/nonexistent/c"]) == 2
    assert capsys.readouterr().err == "starmamba pretrain: error: no checkpoint at /nonexistent/c\n"
    assert not (tmp_path / "run").exists()
