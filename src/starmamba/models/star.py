"""STAR pretraining: a causal MambaMLP over packed image sequences, ARM's decoder, norm-pixel MSE."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from starmamba.checks import check_positive
from starmamba.models.backbone import AroundEncoder, BackboneConfig, MambaMLP
from starmamba.models.decoder import Decoder
from starmamba.models.layout import (
    TARGET_GROUPS,
    DecoderContext,
    SeparatorPosition,
    SeparatorType,
    SeparatorValue,
    SequenceLayout,
)
from starmamba.models.pos_embed import sincos_2d
from starmamba.models.registry import register


@dataclass
class StarConfig(BackboneConfig):
    """STAR pretraining. Defaults are the paper's: 192 px, 4x4-patch clusters, identity separator
    clusters before each image (SC), 8 images per sequence, one causal scan, a 4-layer 512-wide
    decoder fed by the encoder's blocks 6, 8, 10, 12 (of 12), norm-pixel targets.

    ``decoder_context`` is the paper-silent choice of what a decoder query may attend to (see
    :mod:`starmamba.models.layout`): ``"image"``, the units of its own image up to its source, is the
    default, since under ``"sequence"`` every query attends to all earlier images alike and cannot
    find its own (docs/ablations/decoder_context.md measures both)."""

    img_size: int = 192
    learnable_pos_embed: bool = False
    cluster_size: int = 4
    images_per_sequence: int = 8
    separator: SeparatorType = "cluster"
    separator_value: SeparatorValue = "identity"
    separator_position: SeparatorPosition = "SC"
    decoder_context: DecoderContext = "image"
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_head_dim: int = 64
    decoder_mlp_ratio: float = 4.0
    feature_layers: tuple[int, ...] = ()
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("decoder_dim", "decoder_depth", "decoder_head_dim", "decoder_mlp_ratio"):
            check_positive(name, getattr(self, name))
        if self.decoder_dim % self.decoder_head_dim or self.decoder_dim % 4:
            raise ValueError(
                f"decoder_dim={self.decoder_dim} must be divisible by decoder_head_dim={self.decoder_head_dim} "
                "and by 4 (2D sin-cos queries)"
            )
        self.feature_layers = tuple(self.feature_layers)
        if self.feature_layers and (
            len(self.feature_layers) != self.decoder_depth
            or not all(1 <= layer <= self.depth for layer in self.feature_layers)
        ):
            raise ValueError(
                f"feature_layers={self.feature_layers} must name {self.decoder_depth} blocks (one per decoder "
                f"layer) among 1..{self.depth}"
            )
        _ = self.layout  # builds and so validates the sequence geometry

    @staticmethod
    def saved_options(options: dict) -> dict:
        """Options read back from a file: one written before ``decoder_context`` existed describes a
        model trained with the "sequence" context."""
        return options if "decoder_context" in options else {**options, "decoder_context": "sequence"}

    @property
    def layout(self) -> SequenceLayout:
        return SequenceLayout(
            self.grid,
            self.cluster_size,
            self.images_per_sequence,
            self.separator,
            self.separator_value,
            self.separator_position,
            self.decoder_context,
        )

    @property
    def levels(self) -> tuple[int, ...]:
        """Blocks (1-based) whose outputs feed the decoder: evenly spaced over the top half by default."""
        if self.feature_layers:
            return self.feature_layers
        top, count = self.depth - self.depth // 2, self.decoder_depth
        return tuple(max(1, self.depth - (count - 1 - i) * top // max(count - 1, 1)) for i in range(count))


@dataclass
class StarOutput:
    """What one forward pass gives: the loss, predictions and targets (B, Q, patch*patch*C) in the
    layout's query order (for drawing reconstructions), and per target group present in the layout
    ``loss_<group>`` and ``floor_<group>``, 0-dim: the group's loss and the loss of predicting 0
    (the patch mean under norm_pix), the level a model that learns nothing stays at."""

    loss: Tensor
    pred: Tensor
    target: Tensor
    groups: dict[str, Tensor]


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), patches row-major, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, patch: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify` for square images: (B, P, p*p*C) -> (B, C, H, W)."""
    b, count, _ = patches.shape
    side = int(count**0.5)
    x = patches.reshape(b, side, side, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, side * patch, side * patch)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's norm_pix: each patch (last dim) to zero mean, unit variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


@register("star", StarConfig)
class StarPretrainer(AroundEncoder):
    """Pretraining model. ``forward(images)`` with images (B*N, C, H, W) or (B, N, C, H, W), N images
    per sequence, returns a :class:`StarOutput` whose loss is the MSE over every predicted token."""

    embeddings = ("separator_pos_embed", "separator_value_token")

    def __init__(self, cfg: StarConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layout = self.layout
        self.encoder = MambaMLP(cfg)
        if cfg.separator != "none":
            # The separator's tokens bypass the patch embedding and share one position encoding.
            self.separator_pos_embed = nn.Parameter(torch.zeros(1, cfg.dim))
            nn.init.trunc_normal_(self.separator_pos_embed, std=0.02)
            self.decoder_separator_pos_embed = nn.Parameter(torch.zeros(1, cfg.decoder_dim))
            nn.init.trunc_normal_(self.decoder_separator_pos_embed, std=0.02)
            if cfg.separator_value == "embedding":
                self.separator_value_token = nn.Parameter(torch.zeros(1, cfg.dim))
                nn.init.normal_(self.separator_value_token, std=0.02)
        levels = len(cfg.levels)
        self.feature_norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(levels))
        self.enc2dec = nn.Linear(levels * cfg.dim, levels * cfg.decoder_dim)
        nn.init.zeros_(self.enc2dec.bias)
        self.ar_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        nn.init.trunc_normal_(self.ar_token, std=0.02)
        self.decoder = Decoder(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_head_dim, cfg.decoder_mlp_ratio)
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.pixel_head = nn.Linear(cfg.decoder_dim, cfg.patch_size**2 * cfg.in_chans)
        nn.init.zeros_(self.pixel_head.bias)

        patches = layout.patches_per_image
        self.register_buffer("decoder_pos_embed", sincos_2d(cfg.decoder_dim, cfg.grid, cfg.grid), persistent=False)
        self.register_buffer("separator_pattern", layout.separator_pattern, persistent=False)
        self.register_buffer("encoder_index", layout.encoder_index, persistent=False)
        self.register_buffer("target_index", layout.target_index, persistent=False)
        query_pos = torch.where(layout.query_patch < 0, patches, layout.query_patch)
        self.register_buffer("query_pos_index", query_pos, persistent=False)
        self.register_buffer("decoder_mask", layout.decoder_mask, persistent=False)
        self.target_groups = layout.target_groups
        present = torch.tensor([TARGET_GROUPS.index(group) for group in self.target_groups])
        members = (layout.query_group[:, None] == present[None, :]).float()
        self.register_buffer("group_weights", members / members.sum(0), persistent=False)

    @cached_property
    def layout(self) -> SequenceLayout:
        return self.cfg.layout

    def _sequences(self, images: Tensor) -> Tensor:
        """Group images into sequences: (B*N, C, H, W) or (B, N, C, H, W) -> (B, N, C, H, W)."""
        n = self.cfg.images_per_sequence
        if images.dim() == 5:
            if images.shape[1] != n:
                raise ValueError(f"got {images.shape[1]} images per sequence, the model packs {n}")
            return images
        if images.dim() != 4 or images.shape[0] % n:
            raise ValueError(
                f"images of shape {tuple(images.shape)} do not form sequences of images_per_sequence={n}: "
                f"pass (B*{n}, C, H, W) or (B, {n}, C, H, W)"
            )
        return images.view(images.shape[0] // n, n, *images.shape[1:])

    def separator_tokens(self) -> Tensor:
        """(T, dim) encoder tokens of one separator unit: its value pattern plus the shared position."""
        if self.cfg.separator_value == "embedding":
            value = self.separator_value_token.expand(len(self.separator_pattern), -1)
        else:
            # Constant across channels, so every LayerNorm removes it: zeros, ones and identity
            # act alike; only the shared position embedding marks the separator.
            value = self.separator_pattern[:, None].expand(-1, self.cfg.dim)
        return value + self.separator_pos_embed

    def encode(self, images: Tensor) -> list[Tensor]:
        """(B, N, C, H, W) -> per decoder layer, memory (B, num_tokens, decoder_dim)."""
        batch = images.shape[0]
        tokens = self.encoder.embed(images.flatten(0, 1)).reshape(batch, -1, self.cfg.dim)
        if self.cfg.separator != "none":
            tokens = torch.cat([tokens, self.separator_tokens().expand(batch, -1, -1)], dim=1)
        tokens = tokens.index_select(1, self.encoder_index)
        _, features = self.encoder(tokens, None, keep=self.cfg.levels)
        features = [norm(f) for norm, f in zip(self.feature_norms, features, strict=True)]
        return list(self.enc2dec(torch.cat(features, dim=-1)).chunk(len(features), dim=-1))

    def pooled_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, dim): each image read alone as in pretraining, the mean of its patch tokens.

        One causal scan over the image's clusters in pretraining order, its separator unit where the
        first image of a sequence has it (the separator is what every image followed in training, and
        the first image's state starts from zero as here). Each token is layer-normalised; separator
        tokens are left out of the mean. The mean, not the last token: the last cluster was trained to
        predict what follows the image, while every patch token holds its own patch and what preceded it.
        """
        tokens = self.encoder.embed(images)
        if self.cfg.separator != "none":
            tokens = torch.cat([tokens, self.separator_tokens().expand(len(images), -1, -1)], dim=1)
        layout = self.layout
        out, _ = self.encoder(tokens.index_select(1, layout.image_index.to(tokens.device)), None)
        out = F.layer_norm(out[:, layout.image_is_patch.to(out.device)].float(), (out.shape[-1],))
        return out.mean(dim=1)

    def decode(self, memories: list[Tensor]) -> Tensor:
        """Memories -> pixel predictions (B, num_queries, patch*patch*C)."""
        pos = self.decoder_pos_embed
        if self.cfg.separator != "none":
            pos = torch.cat([pos, self.decoder_separator_pos_embed], dim=0)
        queries = (self.ar_token + pos.index_select(0, self.query_pos_index)).expand(memories[0].shape[0], -1, -1)
        return self.pixel_head(self.decoder_norm(self.decoder(queries, memories, self.decoder_mask)))

    def targets(self, images: Tensor) -> Tensor:
        """(B, N, C, H, W) -> the pixels every query predicts (B, num_queries, patch*patch*C)."""
        batch = images.shape[0]
        bank = patchify(images.flatten(0, 1), self.cfg.patch_size).reshape(batch, -1, self.pixel_head.out_features)
        if self.cfg.separator != "none":
            pattern = self.separator_pattern[:, None].expand(-1, bank.shape[-1]).to(bank.dtype)
            bank = torch.cat([bank, pattern.expand(batch, -1, -1)], dim=1)
        bank = bank.index_select(1, self.target_index)
        return normalize_patches(bank) if self.cfg.norm_pix_loss else bank

    def forward(self, images: Tensor) -> StarOutput:
        images = self._sequences(images)
        pred = self.decode(self.encode(images))
        target = self.targets(images)
        error = (pred.float() - target.float()).pow(2).mean(-1)
        floor = target.float().pow(2).mean(-1)
        by_group = torch.stack([error.mean(0), floor.mean(0)]) @ self.group_weights.to(error.dtype)
        groups = {}
        for i, name in enumerate(self.target_groups):
            groups[f"loss_{name}"], groups[f"floor_{name}"] = by_group[0, i].detach(), by_group[1, i]
        return StarOutput(error.mean(), pred, target, groups)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, output: StarOutput) -> Tensor:
        """The predicted images (B*N, C, H, W): predicted patches pasted in place, un-normalised with
        the true patch statistics under norm_pix_loss; patches never predicted are zero."""
        images = self._sequences(images)
        batch, n = images.shape[:2]
        truth = patchify(images.flatten(0, 1), self.cfg.patch_size).reshape(batch, -1, output.pred.shape[-1])
        is_patch = self.layout.query_patch >= 0
        index = self.target_index[is_patch.to(self.target_index.device)]
        pred = output.pred[:, is_patch.to(output.pred.device)].float()
        if self.cfg.norm_pix_loss:
            true = truth.index_select(1, index)
            pred = pred * (true.var(-1, keepdim=True) + 1e-6).sqrt() + true.mean(-1, keepdim=True)
        canvas = torch.zeros_like(truth, dtype=pred.dtype)
        canvas[:, index] = pred
        return unpatchify(canvas.reshape(batch * n, -1, canvas.shape[-1]), self.cfg.patch_size, self.cfg.in_chans)
