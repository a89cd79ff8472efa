"""MambaMLP: patch embedding, sin-cos positions and blocks of (LN -> Mamba, LN -> SwiGLU); the classifier."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from starmamba.checks import check_choice, check_fraction, check_positive
from starmamba.models.features import OutputFormat, feature_take_indices
from starmamba.models.hub import HubMixin
from starmamba.models.mixer import MambaMixer, scan_orders
from starmamba.models.pos_embed import sincos_2d
from starmamba.models.registry import register

ClassToken = Literal["tail", "middle", "none"]
GlobalPool = Literal["avg", "token", ""]
"""timm's readouts: the mean of the patch tokens, the class token, or every token (no pooling)."""


@dataclass
class BackboneConfig:
    """The MambaMLP trunk. Defaults are MambaMLP-Base at 224 px; one causal scan (the classifier has 4)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1
    drop_path: float = 0.0
    learnable_pos_embed: bool = True

    @staticmethod
    def saved_options(options: dict) -> dict:
        """Options read back from a file (a run's config, weights metadata, a Hub folder), completed for
        fields added since it was written with the value the file's version used."""
        return options

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "dim", "depth", "d_state", "d_conv", "expand"):
            check_positive(name, getattr(self, name))
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.dim % 4:
            raise ValueError(f"dim={self.dim} must be divisible by 4 (2D sin-cos position embedding)")
        check_fraction("drop_path", self.drop_path)

    @property
    def scans(self) -> int:
        """Scan directions per mixer: one causal scan unless the config makes it an option."""
        return 1

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClassifierConfig(BackboneConfig):
    """A MambaMLP image classifier: trunk, final LayerNorm and a linear head."""

    scans: Literal[1, 4] = 4
    num_classes: int = 1000
    cls_token: ClassToken = "tail"
    """where the class token sits: after the last patch (STAR), in the middle (Vim/ARM), or nowhere"""
    global_pool: bool = True
    """the readout: the mean of the patch tokens (ARM's finetuning recipe, --global_pool there), or with
    --no_global_pool the class token (with 4 scans a tail token hears nothing from the backward scans);
    timm's names 'avg' and 'token' are taken for True and False"""
    head_init_std: float = 2e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.global_pool, str) and self.global_pool in ("avg", "token"):
            self.global_pool = self.global_pool == "avg"
        if not isinstance(self.global_pool, bool):
            raise ValueError(
                f"global_pool={self.global_pool!r} is not one of True / 'avg' (the mean of the patch tokens), "
                "False / 'token' (the class token); no pooling ('') is set on a model: "
                "create_model(..., global_pool='') or model.reset_classifier(n, '')"
            )
        check_choice("scans", self.scans, Literal[1, 4])
        check_choice("cls_token", self.cls_token, ClassToken)
        check_positive("num_classes", self.num_classes, allow_zero=True)
        if self.cls_token == "none" and not self.global_pool:
            raise ValueError("cls_token='none' needs global_pool=True: without a class token, pool the patches")


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch): (B, C, H, W) -> (B, grid*grid, dim)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        fan_in = in_chans * patch_size * patch_size
        nn.init.trunc_normal_(self.proj.weight, std=math.sqrt(1.0 / fan_in))  # LeCun normal
        nn.init.zeros_(self.proj.bias)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1:] != (self.proj.in_channels, self.img_size, self.img_size):
            raise ValueError(
                f"expected images of shape (batch, {self.proj.in_channels}, {self.img_size}, {self.img_size}), "
                f"got {tuple(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), hidden width dim * 4 * 2 // 3."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = dim * 4 * 2 // 3
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        for linear in (self.w1, self.w2, self.w3):
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """x + drop_path(mixer(LN(x))), then x + drop_path(SwiGLU(LN(x))); (B, L, dim) -> (B, L, dim)."""

    def __init__(self, cfg: BackboneConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.mixer = MambaMixer(cfg.dim, cfg.scans, cfg.expand, cfg.d_state, cfg.d_conv)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, orders: Tensor | None) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x), orders))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MambaMLP(nn.Module):
    """The trunk shared by STAR and the classifier: embed patches, run the blocks.

    Weights follow ARM: LeCun-normal patch embedding, zero biases, PyTorch's default elsewhere,
    and every mixer's out_proj scaled by 1/sqrt(depth) (GPT-2's residual rescaling). With
    ``grad_checkpointing`` a block keeps only its input for the backward pass and recomputes the rest.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim)
        pos = sincos_2d(cfg.dim, cfg.grid, cfg.grid)[None]
        if cfg.learnable_pos_embed:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos)
        # ARM prepends a 0 to this list, so its block i drops at our block i - 1's rate (and its top
        # rate goes unused): a one-block shift too small to matter; we keep the plain linear rise.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        with torch.no_grad():
            for block in self.blocks:
                block.mixer.out_proj.weight.div_(math.sqrt(cfg.depth))

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, grid*grid, dim) patch tokens with their position embedding."""
        return self.patch_embed(images) + self.pos_embed

    def forward(self, x: Tensor, orders: Tensor | None, keep: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Run the blocks over tokens (B, L, dim); also return the outputs of blocks ``keep`` (1-based).

        ``orders`` are the scan orders of multi-scan mixers (see ``scan_orders``), None for one scan.
        """
        kept = []
        for i, block in enumerate(self.blocks, start=1):
            x = self.run_block(block, x, orders)
            kept += [x] * keep.count(i)
        return x, kept

    def run_block(self, block: Block, x: Tensor, orders: Tensor | None) -> Tensor:
        """``block(x, orders)``, checkpointed when ``grad_checkpointing`` is on and gradients are recorded.

        The recomputation replays the block's random draws (drop path), so gradients are unchanged.
        """
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, orders, use_reentrant=False)
        return block(x, orders)


def skips_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, position/class/learned tokens, A_log and D are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf in ("A_log", "D") or leaf.endswith(("_token", "_embed"))


class AroundEncoder(nn.Module, HubMixin):
    """A model built around a MambaMLP ``encoder``: timm's optimizer protocol, and Hub folders.

    ``no_weight_decay`` and ``group_matcher`` (the stem: the encoder's embeddings and the
    ``embeddings`` this model adds; each block; the head: everything after the last block) are what
    ``train.optim`` builds weight decay and layer-wise lr decay from.
    """

    embeddings: tuple[str, ...] = ()

    def no_weight_decay(self) -> set[str]:
        """timm's protocol: names of every parameter that is not decayed (see ``skips_weight_decay``)."""
        return {name for name, param in self.named_parameters() if skips_weight_decay(name, param)}

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's regex-dict parameter groups: the stem (embeddings), each block (its number captured),
        then the head (everything after the last block). Blocks are the finest unit, so ``coarse``
        changes nothing, as for timm's ViT."""
        own = [re.escape(name) for name in self.embeddings]
        stem = "|".join([r"encoder\.patch_embed\.", r"encoder\.pos_embed$", *own])
        head = "|".join([r"encoder\.", *own])
        return {"stem": f"^(?:{stem})", "blocks": r"^encoder\.blocks\.(\d+)\.", "head": f"^(?!{head})"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's protocol: recompute every encoder block in the backward pass instead of keeping its activations."""
        self.encoder.grad_checkpointing = enable


@register("mambamlp", ClassifierConfig)
class MambaMLPClassifier(AroundEncoder):
    """MambaMLP image classifier: (B, C, H, W) -> logits (B, num_classes).

    The class token goes after the last patch ("tail", STAR's choice), in the middle ("middle",
    Vim/ARM), or nowhere ("none"). The readout, ``global_pool`` in timm's names, is the mean of the
    patch tokens ('avg', the config's ``global_pool=True``), the class token ('token'), or no
    pooling ('', set by ``create_model`` or ``reset_classifier``): the head then classifies every token.
    """

    embeddings = ("cls_token",)

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = MambaMLP(cfg)
        patches = cfg.grid * cfg.grid
        self.cls_index = {"tail": patches, "middle": patches // 2, "none": None}[cfg.cls_token]
        if self.cls_index is not None:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = self._new_head()
        self.global_pool: GlobalPool = "avg" if cfg.global_pool else "token"
        orders = scan_orders(cfg.grid, cfg.grid, self.cls_index) if cfg.scans == 4 else None
        self.register_buffer("scan_orders", orders, persistent=False)

    def _new_head(self) -> nn.Module:
        """A freshly initialised head for ``cfg.num_classes`` classes (Identity for 0)."""
        if not self.cfg.num_classes:
            return nn.Identity()
        head = nn.Linear(self.cfg.dim, self.cfg.num_classes)
        nn.init.trunc_normal_(head.weight, std=self.cfg.head_init_std)
        nn.init.zeros_(head.bias)
        return head

    def tokens(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> the encoder's input (B, L, dim): patch tokens, the class token at ``cls_index``."""
        x = self.encoder.embed(images)
        if self.cls_index is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, : self.cls_index], cls, x[:, self.cls_index :]], dim=1)
        return x

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> every token after the last block and the final norm (B, L, dim), as in timm."""
        x, _ = self.encoder(self.tokens(images), self.scan_orders)
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        """The readout ``global_pool`` names: tokens (B, L, dim) -> (B, dim), or with no pooling the tokens."""
        if self.global_pool == "avg":
            return self.patch_tokens(x).mean(dim=1)
        if self.global_pool == "token":
            return x[:, self.cls_index]
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens from ``forward_features`` (B, L, dim) -> logits (B, num_classes), or with ``pre_logits``
        the pooled features (B, dim); with no pooling, per token: (B, L, num_classes) or (B, L, dim)."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    @property
    def num_features(self) -> int:
        """Width of the pooled features (timm's name)."""
        return self.cfg.dim

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: GlobalPool | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none, ``forward`` gives pooled features), as timm's:
        ``global_pool`` 'avg', 'token' or '' (no pooling) replaces the readout, None keeps it. The config
        (and the ``pretrained_cfg``'s class count) follow; a class count that changes drops its label names."""
        changes = {"num_classes": num_classes}
        if global_pool is not None:
            check_choice("global_pool", global_pool, GlobalPool)
            if global_pool:
                changes["global_pool"] = global_pool == "avg"
        self.cfg = dataclasses.replace(self.cfg, **changes)
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = self._new_head().to(self.encoder.patch_embed.proj.weight)
        self.classes_changed()

    def patch_tokens(self, x: Tensor) -> Tensor:
        """(B, L, dim) tokens -> (B, grid*grid, dim): the class token removed, patches row-major."""
        if self.cls_index is None:
            return x
        return torch.cat([x[:, : self.cls_index], x[:, self.cls_index + 1 :]], dim=1)

    def pooled_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, dim): the mean of the patch tokens after the final norm (the class token,
        if any, left out whatever the readout, so that every checkpoint is probed alike)."""
        return self.patch_tokens(self.forward_features(images)).mean(dim=1)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: OutputFormat = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Feature maps after chosen blocks, for dense heads (detection, segmentation); timm's API.

        ``indices``: None for every block, an int n for the last n, a sequence for those blocks
        (0-based, negative from the end). ``norm`` applies the final norm to each map. Maps come in
        block order without the class token: (B, dim, H/p, W/p) for "NCHW", (B, H/p * W/p, dim)
        for "NLC". Returns ``(forward_features-like final tokens, maps)`` or, with
        ``intermediates_only``, the maps; ``stop_early`` (or ``intermediates_only``) skips the blocks
        after the last chosen one, so the final tokens are then that block's, normed.
        """
        check_choice("output_fmt", output_fmt, OutputFormat)
        take, last = feature_take_indices(len(self.encoder.blocks), indices)
        blocks = self.encoder.blocks[: last + 1] if stop_early or intermediates_only else self.encoder.blocks
        tokens, maps = self.tokens(x), []
        for i, block in enumerate(blocks):
            tokens = self.encoder.run_block(block, tokens, self.scan_orders)
            if i in take:
                maps.append(self.patch_tokens(self.norm(tokens) if norm else tokens))
        if output_fmt == "NCHW":
            grid = self.cfg.grid
            maps = [m.transpose(1, 2).reshape(m.shape[0], m.shape[2], grid, grid) for m in maps]
        return maps if intermediates_only else (self.norm(tokens), maps)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm, the head) for a model that
        only serves ``forward_intermediates``; returns the blocks to take. A pruned model no longer
        matches its config: save it before pruning."""
        take, last = feature_take_indices(len(self.encoder.blocks), indices)
        self.encoder.blocks = self.encoder.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take
