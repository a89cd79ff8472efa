"""Training metrics: one JSON line per record in ``metrics.jsonl``, mirrored to TensorBoard if installed."""

from __future__ import annotations

import json
import logging
import numbers
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from starmamba.files import write_text

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends ``{"step", "time", **values}`` records to ``run_dir/metrics.jsonl``.

    Scalars also go to ``run_dir/tensorboard`` when ``tensorboard`` is set and the package is
    installed. A log made with ``enabled=False`` (DDP ranks other than 0) does nothing.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A run killed mid-line leaves a partial record; start the next one on a fresh line.
        ends_mid_line = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open until close())
        if ends_mid_line:
            self._file.write("\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.debug("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, **values: Any) -> None:
        """Record ``values`` (numbers, strings, tensors, numpy values) at global ``step``."""
        if self._file is None:
            return
        record = {"step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record, default=_plain) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                scalar = _scalar(value)
                if scalar is not None:
                    self._writer.add_scalar(key, scalar, step)
            self._writer.flush()

    def rewind(self, step: int) -> None:
        """Forget the records after ``step``: a resumed run logs those steps again."""
        if self._file is None:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        self._file.close()
        write_text(self.path, "".join(json.dumps(r, default=_plain) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open until close())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in order; lines cut short by a crash are skipped."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d is not a complete JSON record; skipped", path, number)
    return records


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def _plain(value: Any) -> Any:
    """JSON form of tensors and numpy values (``json.dumps`` calls this for types it does not know)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot log a {type(value).__name__}")


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    return None
