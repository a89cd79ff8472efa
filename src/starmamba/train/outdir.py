"""A run's output folder: refuse one holding another run, lock it for the run's life, check it is writable.

The lock is ``fcntl.flock`` on ``<run_dir>/.starmamba.lock``: the kernel drops it when its holder
ends, however it ends, so a dead run never blocks the next one, and (on Linux NFS, where flock is
emulated with byte-range locks) it holds across hosts. The file records its holder (pid, host,
start time) to name it in errors; a holder that ended without releasing the lock leaves its record
behind, and the next run takes the lock over with a warning. POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
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
REPLACED_PREFIX = ".replaced-run-"
"""Hidden folder in a run folder that holds the previous run while ``--overwrite`` replaces it."""


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
    """The names of what a run leaves in ``run_dir`` that is there now (empty: no run there).

    A config.json alone is what a start that failed leaves: it does not make a run.
    """
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).is_file()]
    found += [f"{name}/" for name in RUN_DIRS if (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    return [] if found == ["config.json"] else found


def guard_output_dir(run_dir: str | Path, *, resume: str, overwrite: bool) -> list[str]:
    """Refuse ``run_dir`` if it holds a run this one does not resume, unless told to ``overwrite`` it.

    A run resumes the one in ``run_dir`` with ``resume='auto'`` or a checkpoint inside ``run_dir``.
    Returns what ``overwrite`` is to replace (the previous run's files and folders, only those a run
    writes), for :class:`Replacement` to set aside once the new run has started; nothing is removed
    here. Raises :class:`OutputDirError`.
    """
    run_dir = Path(run_dir)
    found = run_artefacts(run_dir)
    if not found or (resume and resumes_run_in(resume, run_dir)):
        return []
    if overwrite:
        return found
    continue_it = "" if resume else "continue it with --resume auto, "
    raise OutputDirError(
        f"{run_dir} already holds a run ({', '.join(found)}); {continue_it}replace it with --overwrite, "
        "or choose another --output_dir"
    )


class Replacement:
    """The previous run that ``--overwrite`` replaces: set aside when the new run starts, deleted once it
    has a checkpoint (or has finished), put back if it fails before that.

    Set aside means moved into a hidden folder inside ``run_dir`` (renames: nothing is copied). A run
    killed before it could delete or restore the old one leaves that folder behind; the next start
    there warns about it (:func:`leftover_replacements`).
    """

    def __init__(self, run_dir: str | Path, names: list[str]) -> None:
        self.run_dir, self.names = Path(run_dir), [name.rstrip("/") for name in names]
        self.aside: Path | None = None

    def set_aside(self) -> None:
        if not self.names:
            return
        self.aside = self.run_dir / f"{REPLACED_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.{os.getpid()}"
        self.aside.mkdir()
        for name in self.names:
            os.replace(self.run_dir / name, self.aside / name)

    def discard(self) -> None:
        """The new run has a checkpoint: the old one goes for good. Idempotent."""
        if self.aside is not None:
            shutil.rmtree(self.aside)
            self.aside = None

    def restore(self) -> None:
        """The new run failed before its first checkpoint: remove what it wrote and put the old run back."""
        if self.aside is None:
            return
        for name in (*RUN_FILES, *RUN_DIRS):
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for name in self.names:
            os.replace(self.aside / name, self.run_dir / name)
        self.aside.rmdir()
        self.aside = None


def leftover_replacements(run_dir: str | Path) -> list[Path]:
    """Folders of previous runs that an ``--overwrite`` start set aside and, killed, never deleted or put back."""
    run_dir = Path(run_dir)
    return sorted(run_dir.glob(f"{REPLACED_PREFIX}*")) if run_dir.is_dir() else []


def check_writable(*dirs: str | Path) -> None:
    """Create each folder if needed and write (then remove) a file in it; raise :class:`OutputDirError` if not."""
    for folder in map(Path, dirs):
        if folder.exists() and not folder.is_dir():
            raise OutputDirError(f"{folder} is a file, not a folder; choose another --output_dir")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-", suffix=".tmp"):
                pass
        except OSError as err:
            raise OutputDirError(
                f"cannot write to {folder} ({err.strerror or err}); fix its permissions or choose another --output_dir"
            ) from None


@dataclass
class Claim:
    """A run's hold on its output folder: the lock, and the previous run it replaces (if any)."""

    lock: RunLock
    replacement: Replacement
    created: bool
    """the folder did not exist before: a failed start removes it again"""

    def release(self, *, failed: bool = False) -> None:
        """Let the lock go; after a ``failed`` start, also remove the folder if this claim created it and it
        holds nothing else."""
        self.lock.release()
        run_dir = self.lock.run_dir
        if failed and self.created and [entry.name for entry in run_dir.iterdir()] == [LOCK_NAME]:
            with contextlib.suppress(OSError):  # another process put something there meanwhile
                self.lock.path.unlink()
                run_dir.rmdir()


def claim_output_dir(run_dir: str | Path, *, resume: str, overwrite: bool) -> Claim:
    """Everything a run does to its output folder before it has loaded its data and model, on rank 0 only.

    Creates ``run_dir``, locks it, refuses it if it holds another run (:func:`guard_output_dir`),
    and checks that it and its ``checkpoints/`` are writable. Writes nothing else: a run that
    replaces another sets the old one aside only when it starts training (``claim.replacement``).
    Release the claim when the run ends. Raises :class:`OutputDirError`.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    check_writable(run_dir)
    claim = Claim(RunLock(run_dir).acquire(), Replacement(run_dir, []), created)
    try:
        claim.replacement = Replacement(run_dir, guard_output_dir(run_dir, resume=resume, overwrite=overwrite))
        for leftover in leftover_replacements(run_dir):
            warnings.warn(
                f"{leftover} holds a run that an --overwrite start set aside and, stopped, never put back or "
                "deleted: move its files back into the folder, or delete it",
                RuntimeWarning,
                stacklevel=2,
            )
        if (run_dir / "checkpoints").is_dir():
            check_writable(run_dir / "checkpoints")
        if (run_dir / "metrics.jsonl").is_file():
            _check_appendable(run_dir / "metrics.jsonl")
    except BaseException:
        claim.release(failed=True)
        raise
    return claim


def _check_appendable(path: Path) -> None:
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write to {path} ({err.strerror or err}); fix its permissions") from None


def resumes_run_in(resume: str, run_dir: Path) -> bool:
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
