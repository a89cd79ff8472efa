"""Errors a user can act on, and one-line reasons from the many-line errors of file loaders."""

from __future__ import annotations

import errno
import re
from pathlib import Path

_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+)")


class RunError(Exception):
    """A run stopped for a reason its user can fix; the message is one line saying how."""


def load_error_reason(error: BaseException) -> str:
    """The sentence of a loader's error that says what is wrong with the file.

    torch.load's errors run over several lines of advice; when it refused what it unpickled, the
    reason follows ``WeightsUnpickler error:``, otherwise it is the first sentence.
    """
    text = str(error).strip()
    found = _UNPICKLER.search(text)
    line = found[1] if found else (text.splitlines() or [type(error).__name__])[0]
    return line.strip().split(". ")[0].rstrip(".")


def write_error(error: OSError, target: str | Path) -> OSError | RunError:
    """A :class:`RunError` for a full disk or a refused permission met while writing ``target``, else ``error``."""
    if error.errno == errno.ENOSPC:
        return RunError(f"no space left on device while writing {target}; free space or choose another --output_dir")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = error.filename or target
        return RunError(f"permission denied while writing {where} ({error.strerror}); fix its permissions or "
                        "choose another --output_dir")  # fmt: skip
    return error
