"""Mixup / CutMix on a batch with label smoothing, as timm's ``Mixup`` in 'batch' mode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MixDraw:
    """One batch's draw: the weight of each image's own label, and the CutMix box (None for Mixup)."""

    lam: float
    box: tuple[int, int, int, int] | None = None  # top, bottom, left, right


def smoothed_one_hot(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) labels -> (B, num_classes): off = smoothing / num_classes, on = 1 - smoothing + off."""
    off = smoothing / num_classes
    targets = torch.full((y.shape[0], num_classes), off, dtype=torch.float32, device=y.device)
    return targets.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox: sides sqrt(1 - lam) of the image's, centre uniform, clipped at the borders."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


class MixupCutmix:
    """Per batch, with probability ``prob``: CutMix (``switch_prob`` of the time when both are on) or Mixup
    of the batch with its flip.

    lam ~ Beta(alpha, alpha); CutMix corrects lam to the fraction of pixels kept. Targets are smoothed
    one-hot labels mixed with the same lam. An alpha of 0 disables that method.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}")
        fractions = {"prob": prob, "switch_prob": switch_prob, "label_smoothing": label_smoothing}
        for name, value in fractions.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def sample(self, generator: torch.Generator, height: int, width: int) -> MixDraw:
        """Draw one batch's lam (and CutMix box) from ``generator``."""
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            return MixDraw(1.0)
        # numpy's Beta sampler (what timm uses), seeded from the generator so the step's seed decides all.
        seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=generator.device))
        rng = np.random.default_rng(seed)
        if rng.random() >= self.prob:
            return MixDraw(1.0)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixDraw(lam)
        top, bottom, left, right = cutmix_box(height, width, lam, rng)
        return MixDraw(1.0 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right))

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) images, (B,) labels -> mixed images, (B, num_classes) soft targets; B must be even."""
        if x.shape[0] % 2:
            raise ValueError(f"batch size {len(x)} is odd; Mixup/CutMix pairs images with the flipped batch")
        draw = self.sample(generator, x.shape[-2], x.shape[-1])
        if draw.box is not None:
            top, bottom, left, right = draw.box
            x = x.clone()
            x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
        elif draw.lam != 1.0:
            x = x * draw.lam + x.flip(0) * (1.0 - draw.lam)
        targets = smoothed_one_hot(y, self.num_classes, self.label_smoothing)
        return x, targets * draw.lam + targets.flip(0) * (1.0 - draw.lam)


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum_k target_k * log_softmax(logits)_k; (B, K) each."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
