"""Which blocks' outputs ``forward_intermediates`` returns, in timm's conventions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

OutputFormat = Literal["NCHW", "NLC"]


def feature_take_indices(num_blocks: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """0-based blocks to take and the last of them: None -> every block, an int n -> the last n blocks,
    a sequence -> those blocks (negative indices count from the end). As timm's ``feature_take_indices``."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks; the model has 1..{num_blocks}")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = [num_blocks + i if i < 0 else i for i in indices]
        if not take or not all(0 <= t < num_blocks for t in take):
            raise ValueError(
                f"indices={list(indices)}: block indices must lie in -{num_blocks}..{num_blocks - 1} (and name one)"
            )
    return take, max(take)
