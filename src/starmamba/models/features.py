"""Which blocks' outputs ``forward_intermediates`` returns, and the feature extractor of ``features_only``,
in timm's conventions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

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


class FeatureInfo:
    """timm's ``feature_info`` of a feature extractor: per returned map its channels, its reduction (input
    pixels per map pixel) and the block it comes from."""

    def __init__(self, maps: list[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = maps
        self.out_indices = tuple(out_indices)

    def _get(self, key: str, idx: int | Sequence[int] | None) -> Any:
        if idx is None:
            return [entry[key] for entry in self.info]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        return self._get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> str | list[str]:
        return self._get("module", idx)

    def get_dicts(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self.info]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)


class FeatureGetter(nn.Module):
    """A classifier as a dense feature extractor (timm's ``features_only=True``): images (B, C, H, W) -> the
    maps of blocks ``out_indices``, each (B, dim, H/p, W/p) (or (B, H/p * W/p, dim) for "NLC").

    The blocks after the last chosen one, the head and (unless ``norm``) the final norm are pruned.
    """

    def __init__(
        self, model: nn.Module, out_indices: int | Sequence[int] = 3, norm: bool = False, output_fmt: str = "NCHW"
    ) -> None:
        super().__init__()
        self.out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        self.model, self.norm, self.output_fmt = model, norm, output_fmt
        patch = model.cfg.patch_size
        self.feature_info = FeatureInfo(
            [{"module": f"encoder.blocks.{i}", "num_chs": model.cfg.dim, "reduction": patch} for i in self.out_indices],
            self.out_indices,
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            images, self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True
        )
