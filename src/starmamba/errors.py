"""Errors a user can act on, and one-line reasons from the many-line errors of file loaders."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+)")
_OS_CODE = re.compile(r"\bcode: (\d+)")
_ZIP_WRITE_FAILED = ("unexpected pos", "file write failed")


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


def write_error(error: BaseException, target: str | Path) -> BaseException:
    """A :class:`RunError` for a full disk or a refused permission met while writing ``target``, else ``error``.

    Besides ``OSError``, the writers' own errors carry these: safetensors' ``SafetensorError`` names the
    OS error's code (``IoError(Os { code: 28, ... })``), and ``torch.save`` on a full disk raises a
    ``RuntimeError`` of its zip writer ("unexpected pos ...", "file write failed").
    """
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None and type(error).__name__ == "SafetensorError":
        found = _OS_CODE.search(str(error))
        code = int(found[1]) if found else None
    if code is None and isinstance(error, RuntimeError) and any(s in str(error) for s in _ZIP_WRITE_FAILED):
        code = errno.ENOSPC
    if code == errno.ENOSPC:
        return RunError(f"no space left on device while writing {target}; free space or choose another --output_dir")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = (error.filename if isinstance(error, OSError) else None) or target
        reason = os.strerror(code)
        return RunError(f"permission denied while writing {where} ({reason}); fix its permissions or "
                        "choose another --output_dir")  # fmt: skip
    return error


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; the process ends with ``exit_code`` (128 + the signal), as a shell
    reports a process the signal ended. A KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
