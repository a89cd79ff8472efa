"""The output-folder guard: another run's folder refused, one run at a time, unwritable folders found first."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from starmamba.train.outdir import (
    LOCK_NAME,
    OutputDirError,
    RunLock,
    claim_output_dir,
    guard_output_dir,
    leftover_replacements,
    run_artefacts,
)

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1


def finished_run(run_dir: Path) -> dict[str, bytes]:
    """A folder as a finished run leaves it; returns every file's bytes by relative path."""
    files = {
        "config.json": b'{"epochs": 2}\n',
        "metrics.jsonl": b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n',
        "model.safetensors": b"weights",
        "curves.png": b"png",
        "checkpoints/latest": b"step-00000002\n",
        "checkpoints/step-00000002/model.safetensors": b"ckpt weights",
    }
    for name, data in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(data)
    return files


def contents(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_NAME
    }


def test_a_second_run_into_a_finished_folder_is_refused_and_nothing_is_lost(tmp_path):
    files = finished_run(tmp_path / "run")
    with pytest.raises(OutputDirError) as caught:
        claim_output_dir(tmp_path / "run", resume="", overwrite=False)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'run'} already holds a run (config.json, metrics.jsonl")
    assert "--resume auto" in message and "--overwrite" in message and "\n" not in message
    assert isinstance(caught.value, ValueError)  # the CLI's error path: one line, exit code 2
    assert contents(tmp_path / "run") == files
    RunLock(tmp_path / "run").acquire().release()  # the refused run let the lock go


def test_resuming_the_run_is_allowed_and_keeps_it(tmp_path):
    files = finished_run(tmp_path / "run")
    claim_output_dir(tmp_path / "run", resume="auto", overwrite=False).release()
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step-00000002")
    claim_output_dir(tmp_path / "run", resume=checkpoint, overwrite=True).release()  # resume wins: nothing removed
    assert contents(tmp_path / "run") == files


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(tmp_path):
    finished_run(tmp_path / "run")
    with pytest.raises(OutputDirError, match=r"already holds a run .*; replace it with --overwrite"):
        guard_output_dir(tmp_path / "run", resume=str(tmp_path / "other" / "checkpoints" / "step-1"), overwrite=False)


def test_overwrite_claims_without_removing_then_sets_aside_and_discards_only_what_a_run_writes(tmp_path):
    run_dir = tmp_path / "run"
    files = finished_run(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    claim = claim_output_dir(run_dir, resume="", overwrite=True)
    assert contents(run_dir) == files | {"notes.txt": b"mine"}  # claiming removes nothing
    claim.replacement.set_aside()
    (aside,) = leftover_replacements(run_dir)
    assert {name.split("/", 1)[1] for name in contents(run_dir) if name.startswith(aside.name)} == set(files)
    assert {name for name in contents(run_dir) if not name.startswith(aside.name)} == {"notes.txt"}
    claim.replacement.discard()
    claim.release()
    assert contents(run_dir) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "notes.txt"]


def test_a_replacement_that_fails_to_start_puts_the_old_run_back_and_drops_the_new_runs_files(tmp_path):
    run_dir = tmp_path / "run"
    files = finished_run(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    claim = claim_output_dir(run_dir, resume="", overwrite=True)
    claim.replacement.set_aside()
    (run_dir / "config.json").write_text('{"epochs": 3}')  # what the new run wrote before it failed
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (run_dir / "tensorboard").mkdir()
    claim.replacement.restore()
    claim.release(failed=True)
    assert contents(run_dir) == files | {"notes.txt": b"mine"}
    assert leftover_replacements(run_dir) == [] and not (run_dir / "tensorboard").exists()


def test_a_replaced_run_left_aside_by_a_killed_start_is_warned_about(tmp_path):
    run_dir = tmp_path / "run"
    finished_run(run_dir)
    claim = claim_output_dir(run_dir, resume="", overwrite=True)
    claim.replacement.set_aside()
    claim.lock.release()  # as a kill -9 would: neither discarded nor restored
    (aside,) = leftover_replacements(run_dir)
    with pytest.warns(RuntimeWarning, match=f"{aside} holds a run that an --overwrite start set aside"):
        claim_output_dir(run_dir, resume="", overwrite=False).release()


def test_a_folder_holding_only_a_config_is_not_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"epochs": 2}')  # left by a start that failed
    assert run_artefacts(tmp_path / "run") == []
    claim_output_dir(tmp_path / "run", resume="", overwrite=False).release()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    assert run_artefacts(tmp_path / "run") == ["config.json", "metrics.jsonl"]


def test_a_failed_start_removes_the_folder_it_created_and_only_that(tmp_path):
    claim_output_dir(tmp_path / "new", resume="", overwrite=False).release(failed=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    claim_output_dir(tmp_path / "mine", resume="", overwrite=False).release(failed=True)
    assert (tmp_path / "mine").is_dir()  # the user's own folder stays
    claim = claim_output_dir(tmp_path / "used", resume="", overwrite=False)
    (tmp_path / "used" / "config.json").write_text("{}")
    claim.release(failed=True)
    assert (tmp_path / "used" / "config.json").is_file()


def test_a_folder_without_a_run_is_used_as_is(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # left empty by a run refused earlier
    (tmp_path / "run" / "notes.txt").write_text("mine")
    claim_output_dir(tmp_path / "run", resume="", overwrite=False).release()
    claim_output_dir(tmp_path / "new" / "deeper", resume="auto", overwrite=False).release()
    assert (tmp_path / "new" / "deeper").is_dir()


HOLD = """
import sys
from starmamba.train.outdir import claim_output_dir
lock = claim_output_dir(sys.argv[1], resume="", overwrite=False)
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes stdin (or kills this process)
lock.release()
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that claims ``run_dir`` and holds it."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "locked\n"
    return child


def test_two_runs_at_once_the_second_fails_at_once_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = hold_lock(run_dir)
    try:
        with pytest.raises(OutputDirError) as caught:
            claim_output_dir(run_dir, resume="auto", overwrite=False)
        message = str(caught.value)
        assert f"{run_dir} is in use by another run (pid {first.pid} on {socket.gethostname()}, started 20" in message
        assert "\n" not in message
    finally:
        first.stdin.close()
        assert first.wait(timeout=30) == 0
    assert (run_dir / LOCK_NAME).read_text() == ""  # released cleanly
    with RunLock(run_dir) as lock:  # free again, and taken without a warning
        holder = json.loads(lock.path.read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    dead = hold_lock(run_dir)
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    with pytest.warns(RuntimeWarning, match=f"from pid {dead.pid} on {socket.gethostname()}, .* no longer running"):
        lock = claim_output_dir(run_dir, resume="auto", overwrite=False)
    lock.release()


def test_one_process_cannot_hold_a_folder_twice(tmp_path):
    with RunLock(tmp_path), pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()


def _without_root_override() -> None:
    """In the child: drop CAP_DAC_OVERRIDE so that even root is refused by file permissions."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def claim_in_child(run_dir: Path, resume: str = "") -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        from starmamba.train.outdir import OutputDirError, claim_output_dir
        try:
            claim_output_dir({str(run_dir)!r}, resume={resume!r}, overwrite=False).release()
        except OutputDirError as error:
            raise SystemExit(f"refused: {{error}}")
    """)
    return subprocess.run(
        [sys.executable, "-c", code], preexec_fn=_without_root_override, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("read_only", ["run", "run/checkpoints"])
def test_a_read_only_folder_is_found_before_training(tmp_path, read_only):
    run_dir = tmp_path / "run"
    finished_run(run_dir)
    (tmp_path / read_only).chmod(0o555)
    try:
        result = claim_in_child(run_dir, resume="auto")
    finally:
        (tmp_path / read_only).chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        f"refused: cannot write to {tmp_path / read_only} (Permission denied); fix its permissions or choose "
        "another --output_dir"
    )


def test_a_read_only_metrics_log_is_found_before_training(tmp_path):
    run_dir = tmp_path / "run"
    finished_run(run_dir)
    (run_dir / "metrics.jsonl").chmod(0o444)
    result = claim_in_child(run_dir, resume="auto")
    assert result.returncode == 1, result.stderr
    assert f"refused: cannot write to {run_dir / 'metrics.jsonl'} (Permission denied)" in result.stderr


def test_an_output_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "run").write_text("mine")
    with pytest.raises(OutputDirError, match=r"/run is a file, not a folder; choose another --output_dir$"):
        claim_output_dir(tmp_path / "run", resume="", overwrite=False)
    assert (tmp_path / "run").read_text() == "mine"
