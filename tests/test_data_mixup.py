"""Mixup / CutMix: draw statistics, exact CutMix lam, smoothed targets, soft-target cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from starmamba.data import MixupCutmix, soft_target_cross_entropy
from starmamba.data.mixup import cutmix_box


def two_images(height: int = 8, width: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of an all-0 image (label 2) and an all-1 image (label 5)."""
    x = torch.stack([torch.zeros(channels, height, width), torch.ones(channels, height, width)])
    return x, torch.tensor([2, 5])


def test_odd_batch_is_rejected():
    with pytest.raises(ValueError, match="batch size 3 is odd"):
        MixupCutmix(10)(torch.zeros(3, 3, 4, 4), torch.zeros(3, dtype=torch.long), torch.Generator())


def test_label_smoothing_values_without_mixing():
    x, y = two_images()
    out, targets = MixupCutmix(10, mixup_alpha=0.0, cutmix_alpha=0.0)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    expected = torch.full((2, 10), 0.01)
    expected[0, 2] = expected[1, 5] = 0.91
    torch.testing.assert_close(targets, expected)
    _, never = MixupCutmix(10, prob=0.0)(x, y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(never, expected)


def test_cutmix_is_chosen_half_the_time():
    mix = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0)
    generator = torch.Generator().manual_seed(0)
    x, y = two_images()
    cutmix = 0
    for _ in range(2000):
        out, _ = mix(x, y, generator)
        # CutMix copies pixels (values stay 0 or 1); Mixup blends them.
        cutmix += bool(((out == 0) | (out == 1)).all())
    assert cutmix / 2000 == pytest.approx(0.5, abs=0.05)


def test_mixup_lam_follows_beta():
    mix = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    generator = torch.Generator().manual_seed(1)
    x, y = two_images(2, 2)
    lams = []
    for _ in range(10000):
        out, targets = mix(x, y, generator)
        lam = targets[0, 2].item()
        # The first image is 0, the second 1: the mixed first image is 1 - lam everywhere.
        torch.testing.assert_close(out[0], torch.full_like(out[0], 1 - lam))
        lams.append(lam)
    beta_var = 0.8 * 0.8 / ((1.6**2) * (1.6 + 1))  # = 1 / (4 * (2 * 0.8 + 1)) ~ 0.0962
    assert np.mean(lams) == pytest.approx(0.5, abs=0.01)
    assert np.var(lams) == pytest.approx(beta_var, abs=0.005)
    assert abs(np.var(lams) - 1 / 12) > 0.008  # clearly not Uniform(0, 1)


def test_cutmix_lam_is_exactly_the_kept_fraction():
    mix = MixupCutmix(10, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    generator = torch.Generator().manual_seed(2)
    height, width = 12, 20
    x, y = two_images(height, width, channels=3)
    partial = 0
    for _ in range(300):
        out, targets = mix(x, y, generator)
        pasted = out[0, 0] == 1
        changed = pasted.sum().item() / (height * width)
        assert targets[0, 2].item() == pytest.approx(1 - changed, abs=1e-6)
        assert targets[0, 5].item() == pytest.approx(changed, abs=1e-6)
        assert torch.equal(out[0, 1], out[0, 0]) and torch.equal(out[0, 2], out[0, 0])
        # The pasted pixels form one rectangle, and the second image gets the same box from the first.
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        if len(rows):
            assert pasted.sum().item() == len(rows) * len(cols)
            assert torch.equal(out[1, 0] == 0, pasted)
        partial += 0 < changed < 1
    assert partial > 250


def test_cutmix_box_follows_timm_rand_bbox():
    class Fixed:
        def __init__(self, values):
            self.values = list(values)

        def integers(self, low, high):
            value = self.values.pop(0)
            assert low <= value < high
            return value

    # lam 0.64 -> side ratio 0.6 -> cut 6 x 12 on a 10 x 20 image, centre (1, 15), clipped at the borders.
    assert cutmix_box(10, 20, 0.64, Fixed([1, 15])) == (0, 4, 9, 20)
    # Odd cut sides lose a pixel: cut 3 x 3 (lam 0.91 on 10 x 10), centre (5, 5) -> rows and columns 4..5.
    assert cutmix_box(10, 10, 0.91, Fixed([5, 5])) == (4, 6, 4, 6)


def test_targets_are_smoothed_then_mixed_and_sum_to_one():
    mix = MixupCutmix(10, label_smoothing=0.1)
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 4])
    for _ in range(20):
        _, targets = mix(x, y, generator)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        lam = (targets[0, 0].item() - 0.01) / 0.9
        assert -1e-6 <= lam <= 1 + 1e-6
        # Row 0 mixes label 0 with the flipped batch's label 4; no other class gets more than 0.01.
        assert targets[0, 4].item() == pytest.approx(0.01 + 0.9 * (1 - lam), abs=1e-6)
        assert torch.allclose(targets[0, 1:4], torch.full((3,), 0.01))
        # Rows 2 and 3 swap labels under the flip, so each keeps its own label with the same weight.
        assert targets[2, 2].item() == pytest.approx(targets[3, 3].item(), abs=1e-6)


def test_same_generator_state_gives_the_same_result():
    mix = MixupCutmix(10)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    first = mix(x, y, torch.Generator().manual_seed(7))
    second = mix(x, y, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_soft_target_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # softmax rows: (1/4, 3/4) and (4/5, 1/5)
    expected = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) - math.log(0.8)) / 2
    assert soft_target_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    hard = torch.tensor([1, 0])
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, F.one_hot(hard, 2).float()), F.cross_entropy(logits, hard)
    )
