"""The tables of the demo and the ablations: means over seeds, their cells, Markdown."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float | None]) -> dict | None:
    """{"mean", "std" (sample std; None for one value: unmeasured), "values"}; None when a value is missing."""
    if not values or any(value is None for value in values):
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def cell(stat: dict | None, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` of a :func:`mean_std` (or a paired difference, ``signed``); the mean alone when the std
    is unmeasured, '-' for no value."""
    if stat is None:
        return "-"
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    return mean + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned (labels), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
