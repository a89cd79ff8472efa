"""A run's output folder: refuse one holding another run, lock it for the run's life, check it is writable.

The lock is ``fcntl.flock`` on ``<run_dir>/.starmamba.lock``: the kernel drops it when its holder
ends, however it ends, so a dead run never blocks the next one, and (on Linux NFS, where flock is
emulated with byte-range locks) it holds across hosts. The file records its holder (pid, host,
start time) to name it in errors; a holder that ended without releasing the lock leaves its record
behind, and the next run takes the lock over with a warning. POSIX only (``fcntl``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".starmamba.lock"
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "model.safetensors",
    "ema.safetensors",
    "curves.png",
    "reconstructions.png",
)
"""Files a run writes at the top of its output folder."""
RUN_DIRS = ("checkpoints", "tensorboard")
"""Folders a run writes in its output folder (they count as a run's only when not empty)."""


class OutputDirError(ValueError):
    """An output folder this run must not, or cannot, use."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run's lock: process id, host name, and when it took the lock (UTC, ISO 8601)."""

    pid: int
    host: str
    started: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


class RunLock:
    """An exclusive lock on a run's output folder, from :meth:`acquire` to :meth:`release` (or process end)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock at once, or raise :class:`OutputDirError` naming the run that holds it."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirError(
                f"{self.run_dir} is in use by another run ({holder or 'holder not recorded yet'}); "
                "wait for it to end, or choose another --output_dir"
            ) from None
        previous = _read_holder(fd)
        if previous is not None:
            gone = previous.host == socket.gethostname() and not _alive(previous.pid)
            ended = "is no longer running" if gone else "ended without releasing it"
            warnings.warn(
                f"taking over the lock of {self.run_dir} from {previous}, which {ended}", RuntimeWarning, stacklevel=2
            )
        me = LockHolder(os.getpid(), socket.gethostname(), datetime.now(timezone.utc).isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up; an empty lock file means released cleanly. Idempotent."""
        if self._fd is None:
            return
        # The file stays: unlinking it would let a run that opened it just before lock a file
        # no one else can see, while a third run locks a new one.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # also for DataLoader workers that share the descriptor
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_artefacts(run_dir: str | Path) -> list[str]:
    """The names of what a run leaves in ``run_dir`` that is there now (empty: no run there)."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).is_file()]
    found += [f"{name}/" for name in RUN_DIRS if (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    return found


def guard_output_dir(run_dir: str | Path, *, resume: str, overwrite: bool) -> None:
    """Refuse ``run_dir`` if it holds a run this one does not resume, unless told to ``overwrite`` it.

    A run resumes the one in ``run_dir`` with ``resume='auto'`` or a checkpoint inside ``run_dir``.
    ``overwrite`` removes the previous run's files and folders (only those a run writes) first.
    Raises :class:`OutputDirError`.
    """
    run_dir = Path(run_dir)
    found = run_artefacts(run_dir)
    if not found or (resume and _inside(resume, run_dir)):
        return
    if overwrite:
        for name in found:
            path = run_dir / name.rstrip("/")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    continue_it = "" if resume else "continue it with --resume auto, "
    raise OutputDirError(
        f"{run_dir} already holds a run ({', '.join(found)}); {continue_it}replace it with --overwrite, "
        "or choose another --output_dir"
    )


def check_writable(*dirs: str | Path) -> None:
    """Create each folder if needed and write (then remove) a file in it; raise :class:`OutputDirError` if not."""
    for folder in map(Path, dirs):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-", suffix=".tmp"):
                pass
        except OSError as err:
            raise OutputDirError(
                f"cannot write to {folder} ({err.strerror or err}); fix its permissions or choose another --output_dir"
            ) from None


def claim_output_dir(run_dir: str | Path, *, resume: str, overwrite: bool) -> RunLock:
    """Everything a run does to its output folder before it writes anything there, on rank 0 only.

    Creates ``run_dir``, locks it, refuses it if it holds another run (:func:`guard_output_dir`),
    and checks that it and its ``checkpoints/`` are writable. Returns the held lock; release it
    (or leave its ``with`` block) when the run ends. Raises :class:`OutputDirError`.
    """
    run_dir = Path(run_dir)
    check_writable(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        guard_output_dir(run_dir, resume=resume, overwrite=overwrite)
        check_writable(run_dir / "checkpoints")
        if (run_dir / "metrics.jsonl").is_file():
            _check_appendable(run_dir / "metrics.jsonl")
    except BaseException:
        lock.release()
        raise
    return lock


def _check_appendable(path: Path) -> None:
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write to {path} ({err.strerror or err}); fix its permissions") from None


def _inside(resume: str, run_dir: Path) -> bool:
    """Whether ``resume`` ('auto' or a checkpoint path) continues the run in ``run_dir``."""
    return resume == "auto" or Path(resume).resolve().is_relative_to(run_dir.resolve())


def _read_holder(fd: int) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(os.pread(fd, 4096, 0).decode()))
    except (ValueError, TypeError):  # empty (released cleanly, or not written yet) or not ours
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
