"""The STAR sequence: several images, each with its separators, packed into one autoregressive stream.

An image of ``grid`` patches is cut into clusters of ``cluster`` patches, taken in cluster-priority
order (clusters row-major over the cluster grid, patches row-major inside a cluster). Each image
becomes a block of units, separators and clusters, laid out by ``separator_position``; the blocks of
``images_per_sequence`` images follow one another. Every unit predicts the next one. The stream is
thought of as continuing with another image block, so the last unit predicts that block's first
unit when it is a separator (its content is known: ``c_{L*N+1} := c_sp`` in the paper) and predicts
nothing otherwise, in which case it is not fed to the encoder at all (as ARM drops its 9th cluster).

ARM, the baseline, is ``images_per_sequence=1, separator="none"``: 8 clusters in, clusters 2..9 out.

The decoder's context (``decoder_context``) is what a prediction's queries may attend to, always
units up to the prediction's source (causal between units, bidirectional within one):
``"sequence"`` lets them see every earlier unit of the stream, across images; ``"image"`` only the
units of the image the prediction belongs to (the encoder still scans the whole stream, so earlier
images reach it through the scan state). A prediction belongs to the image of its target when the
target is a cluster, and to the image of its source when the target is a separator (a separator
closes the image before it). An image's context opens at the earliest source among its
predictions: its own first unit, or, where its first cluster is predicted from the unit before its
block (separator after the clusters, CS / CSC, or no separator), that unit.

Tensor indices refer to a "bank": the ``N * P`` patch tokens of the sequence's images (image-major,
patches row-major) followed by the ``T`` tokens of one separator unit.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from starmamba.checks import check_choice

SeparatorType = Literal["none", "token", "cluster"]
SeparatorValue = Literal["zeros", "ones", "embedding", "identity"]
SeparatorPosition = Literal["SC", "CS", "SCS", "CSC"]
UnitKind = Literal["separator", "cluster"]
DecoderContext = Literal["sequence", "image"]
TargetGroup = Literal["separator", "first_cluster", "cluster"]
TARGET_GROUPS: tuple[TargetGroup, ...] = ("separator", "first_cluster", "cluster")


@dataclass(frozen=True)
class Unit:
    """One prediction unit: a separator or a cluster of one image of the sequence."""

    kind: UnitKind
    image: int
    cluster: int  # row-major index over the image's cluster grid; -1 for a separator
    num_tokens: int


@dataclass(frozen=True)
class Prediction:
    """The encoder tokens of units 0..source predict unit ``target`` (== len(units): trailing separator)."""

    source: int
    target: int


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class SequenceLayout:
    """Geometry of one STAR sequence. Sizes count patches; see the module docstring for the rules."""

    grid: int | tuple[int, int] = 12
    cluster: int | tuple[int, int] = 4
    images_per_sequence: int = 8
    separator: SeparatorType = "cluster"
    separator_value: SeparatorValue = "identity"
    separator_position: SeparatorPosition = "SC"
    decoder_context: DecoderContext = "sequence"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", _pair(self.grid))
        object.__setattr__(self, "cluster", _pair(self.cluster))
        check_choice("separator", self.separator, SeparatorType)
        check_choice("separator_value", self.separator_value, SeparatorValue)
        check_choice("separator_position", self.separator_position, SeparatorPosition)
        check_choice("decoder_context", self.decoder_context, DecoderContext)
        if min(self.grid) < 1:
            raise ValueError(f"grid={self.grid} must have at least one patch per side")
        if min(self.cluster) < 1:
            raise ValueError(f"cluster={self.cluster} must have at least one patch per side")
        if self.grid[0] % self.cluster[0] or self.grid[1] % self.cluster[1]:
            raise ValueError(
                f"cluster={self.cluster} does not divide the grid of {self.grid} patches per image "
                f"(choose a cluster size that divides both sides)"
            )
        if self.images_per_sequence < 1:
            raise ValueError(f"images_per_sequence={self.images_per_sequence} must be >= 1")
        rows, cols = self.cluster_grid
        if self.separator != "none" and self.separator_position in ("SCS", "CSC") and rows != cols:
            raise ValueError(
                f"separator_position={self.separator_position!r} puts a separator every n clusters of an "
                f"n x n cluster grid, but this grid has {rows} x {cols} clusters"
            )

    @property
    def cluster_grid(self) -> tuple[int, int]:
        """Clusters per image along (height, width)."""
        return self.grid[0] // self.cluster[0], self.grid[1] // self.cluster[1]

    @property
    def patches_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cluster_tokens(self) -> int:
        return self.cluster[0] * self.cluster[1]

    @property
    def separator_tokens(self) -> int:
        """Tokens in one separator unit: a whole cluster, one token, or none."""
        return {"none": 0, "token": 1, "cluster": self.cluster_tokens}[self.separator]

    @cached_property
    def units(self) -> tuple[Unit, ...]:
        """Every unit of the stream, in order."""
        return tuple(unit for image in range(self.images_per_sequence) for unit in self._image_block(image))

    def _image_block(self, image: int) -> list[Unit]:
        rows, cols = self.cluster_grid
        clusters = [Unit("cluster", image, i, self.cluster_tokens) for i in range(rows * cols)]
        if self.separator == "none":
            return clusters
        sep = Unit("separator", image, -1, self.separator_tokens)
        if self.separator_position == "SC":
            return [sep, *clusters]
        if self.separator_position == "CS":
            return [*clusters, sep]
        block = []
        for r in range(rows):
            row = clusters[r * cols : (r + 1) * cols]
            block += [sep, *row] if self.separator_position == "SCS" else [*row, sep]
        return block

    @property
    def trailing_separator(self) -> Unit | None:
        """The unit after the stream, when it is known: a separator that would open the next image."""
        first = self._image_block(self.images_per_sequence)[0]
        return first if first.kind == "separator" else None

    @cached_property
    def predictions(self) -> tuple[Prediction, ...]:
        """Every prediction in stream order; the first unit of the stream is never a target."""
        last = len(self.units) - (0 if self.trailing_separator else 1)
        return tuple(Prediction(i, i + 1) for i in range(last))

    def target_unit(self, prediction: Prediction) -> Unit:
        if prediction.target == len(self.units):
            assert self.trailing_separator is not None
            return self.trailing_separator
        return self.units[prediction.target]

    @property
    def encoder_units(self) -> tuple[Unit, ...]:
        """Units fed to the encoder: every unit that is the source of a prediction."""
        return self.units[: len(self.predictions)]

    @property
    def num_tokens(self) -> int:
        """Encoder sequence length."""
        return sum(u.num_tokens for u in self.encoder_units)

    @property
    def num_queries(self) -> int:
        """Decoder query count: one per token of every predicted unit."""
        return sum(self.target_unit(p).num_tokens for p in self.predictions)

    @property
    def tokens_per_image(self) -> int:
        """Tokens of one image block, separators included (160 for the paper's geometry)."""
        return sum(u.num_tokens for u in self._image_block(0))

    def cluster_patches(self, cluster: int) -> list[int]:
        """Row-major patch indices of one cluster, in cluster-priority (row-major inside) order."""
        cols = self.cluster_grid[1]
        r, c = divmod(cluster, cols)
        ch, cw = self.cluster
        return [(r * ch + i) * self.grid[1] + c * cw + j for i in range(ch) for j in range(cw)]

    def _unit_bank_index(self, unit: Unit) -> list[int]:
        if unit.kind == "separator":
            first = self.images_per_sequence * self.patches_per_image
            return list(range(first, first + unit.num_tokens))
        offset = unit.image * self.patches_per_image
        return [offset + p for p in self.cluster_patches(unit.cluster)]

    def _unit_patch_index(self, unit: Unit) -> list[int]:
        return [-1] * unit.num_tokens if unit.kind == "separator" else self.cluster_patches(unit.cluster)

    @cached_property
    def encoder_index(self) -> Tensor:
        """(num_tokens,) bank index of every encoder token."""
        return _per_token(self.encoder_units, self._unit_bank_index)

    @cached_property
    def token_patch(self) -> Tensor:
        """(num_tokens,) patch index (row-major in its image) of every encoder token; -1 for separators."""
        return _per_token(self.encoder_units, self._unit_patch_index)

    @cached_property
    def token_image(self) -> Tensor:
        """(num_tokens,) image of every encoder token."""
        return _per_token(self.encoder_units, lambda u: [u.image] * u.num_tokens)

    @cached_property
    def _targets(self) -> list[Unit]:
        return [self.target_unit(p) for p in self.predictions]

    @cached_property
    def target_index(self) -> Tensor:
        """(num_queries,) bank index of the target of every decoder query."""
        return _per_token(self._targets, self._unit_bank_index)

    @cached_property
    def query_patch(self) -> Tensor:
        """(num_queries,) patch index of every query's target token; -1 for separator targets."""
        return _per_token(self._targets, self._unit_patch_index)

    @cached_property
    def query_image(self) -> Tensor:
        """(num_queries,) image of every query's target (images_per_sequence for the trailing separator)."""
        return _per_token(self._targets, lambda u: [u.image] * u.num_tokens)

    def owner_image(self, prediction: Prediction) -> int:
        """The image a prediction belongs to: its target's for a cluster, its source's for a separator."""
        target = self.target_unit(prediction)
        return target.image if target.kind == "cluster" else self.units[prediction.source].image

    @cached_property
    def context_start(self) -> tuple[int, ...]:
        """Per prediction, the first unit its queries may see (0 for ``decoder_context="sequence"``)."""
        if self.decoder_context == "sequence":
            return (0,) * len(self.predictions)
        owners = [self.owner_image(p) for p in self.predictions]
        opens: dict[int, int] = {}
        for owner, prediction in zip(owners, self.predictions, strict=True):
            opens.setdefault(owner, prediction.source)  # predictions come in stream order
        return tuple(opens[owner] for owner in owners)

    @cached_property
    def decoder_mask(self) -> Tensor:
        """(num_queries, num_tokens) bool, True where a query may attend.

        A query predicting from unit ``source`` sees the encoder tokens of units ``start..source``,
        ``start`` set by ``decoder_context``: causal between units, every token of a unit visible to
        every query of the prediction.
        """
        starts = list(itertools.accumulate((u.num_tokens for u in self.encoder_units), initial=0))
        bounds = [
            (starts[first], starts[p.source + 1])
            for p, first in zip(self.predictions, self.context_start, strict=True)
            for _ in range(self.target_unit(p).num_tokens)
        ]
        low, high = torch.tensor(bounds).unbind(1)
        keys = torch.arange(self.num_tokens)[None, :]
        return (keys >= low[:, None]) & (keys < high[:, None])

    def target_group(self, unit: Unit) -> TargetGroup:
        """A target's group: a separator, the first cluster of an image (cluster 0: every position keeps
        the clusters in order), or another cluster."""
        return "separator" if unit.kind == "separator" else "first_cluster" if unit.cluster == 0 else "cluster"

    @cached_property
    def target_groups(self) -> tuple[TargetGroup, ...]:
        """The groups this layout's targets fall in, in ``TARGET_GROUPS`` order."""
        present = {self.target_group(unit) for unit in self._targets}
        return tuple(group for group in TARGET_GROUPS if group in present)

    @cached_property
    def query_group(self) -> Tensor:
        """(num_queries,) index into ``TARGET_GROUPS`` of every query's :meth:`target_group`."""
        return _per_token(self._targets, lambda u: [TARGET_GROUPS.index(self.target_group(u))] * u.num_tokens)

    @cached_property
    def image_index(self) -> Tensor:
        """(tokens_per_image,) one image's block read alone, as the first image of a sequence reads it: the
        index of every token in a one-image bank (the image's patches row-major, then one separator unit)."""
        one_image = dataclasses.replace(self, images_per_sequence=1)
        return _per_token(self._image_block(0), one_image._unit_bank_index)

    @cached_property
    def image_is_patch(self) -> Tensor:
        """(tokens_per_image,) bool: which tokens of :attr:`image_index` are patches (not separator)."""
        return _per_token(self._image_block(0), self._unit_patch_index) >= 0

    @cached_property
    def separator_pattern(self) -> Tensor:
        """(separator_tokens,) the separator value per token: 1 where a token is a one-vector.

        Identity puts ones on the diagonal of the separator cluster. Learned embeddings have no
        pixel-space meaning; as a target they count as zeros (which per-patch normalisation makes
        of every constant patch anyway).
        """
        tokens = self.separator_tokens
        if self.separator_value == "ones":
            return torch.ones(tokens)
        if self.separator_value == "identity":
            rows, cols = self.cluster if self.separator == "cluster" else (1, 1)
            return torch.tensor([float(i == j) for i in range(rows) for j in range(cols)])
        return torch.zeros(tokens)

    def describe(self, image: int = 0) -> str:
        """One image block as text, e.g. ``S C0 C1 ... C8`` (for logs and docs)."""
        return " ".join("S" if u.kind == "separator" else f"C{u.cluster}" for u in self._image_block(image))


def _per_token(units: list[Unit], values: Callable[[Unit], list[int]]) -> Tensor:
    """(sum of the units' tokens,) long: ``values(unit)`` for every unit, one entry per token, concatenated."""
    return torch.tensor([v for unit in units for v in values(unit)], dtype=torch.long)
