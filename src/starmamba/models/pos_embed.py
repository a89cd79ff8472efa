"""Fixed 2D sine-cosine position embeddings (MAE's layout) and their resizing to a new grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): sines of dim/2 frequencies, then the cosines."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, rows: int, cols: int) -> Tensor:
    """(rows * cols, dim) float32 embedding of a row-major patch grid.

    The first half of the channels encodes the column, the second half the row (as MAE does).
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], dim=1)
    return emb.float()


def resize_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> Tensor:
    """Bicubically resample a (1, rows * cols, dim) patch-grid embedding to ``new_grid``.

    ``old_grid`` defaults to the square grid that the token count implies.
    """
    _, count, dim = pos_embed.shape
    if old_grid is None:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"cannot infer a square grid from {count} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = pos_embed.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
