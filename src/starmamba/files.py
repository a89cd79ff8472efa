"""Writing files that are never seen half-written: a crash leaves the old version or the new one."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_name(name: str) -> str:
    """A hidden, unique name for a file or directory in the making (never reused, so never stale)."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file in this process: 0o666 less the umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux: read without changing it
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk before a rename makes it visible."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened on Windows; renames there are durable enough
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Create or replace ``path`` at once: ``write(temp)`` fills a hidden sibling, which is renamed over it.

    If ``write`` fails, ``path`` is left as it was and the sibling is removed. ``write`` must not
    rely on the file's suffix (e.g. pass ``format="png"`` to savers that guess from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(temp_name(path.name))
    try:
        write(temp)
        fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(payload, indent=2) + "\n")
