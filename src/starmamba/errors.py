"""One-line reasons from the many-line errors of file loaders (torch.load, safetensors)."""

from __future__ import annotations

import re

_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+)")


def load_error_reason(error: BaseException) -> str:
    """The sentence of a loader's error that says what is wrong with the file.

    torch.load's errors run over several lines of advice; when it refused what it unpickled, the
    reason follows ``WeightsUnpickler error:``, otherwise it is the first sentence.
    """
    text = str(error).strip()
    found = _UNPICKLER.search(text)
    line = found[1] if found else (text.splitlines() or [type(error).__name__])[0]
    return line.strip().split(". ")[0].rstrip(".")
