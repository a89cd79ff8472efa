"""Transforms: crop geometry, reproducibility per (seed, epoch, index), eval resize, RandAugment, erasing."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from starmamba.data import (
    Augmented,
    EvalTransform,
    FinetuneTransform,
    PretrainTransform,
    RandAugment,
    RandomErasing,
    SyntheticImages,
    parse_rand_augment,
    sample_rng,
)
from starmamba.data.randaugment import INCREASING_OPS, STANDARD_OPS, DrawnOp, RandAugmentConfig, op_argument
from starmamba.data.transforms import random_resized_crop_box

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def gradient_image(width: int, height: int) -> Image.Image:
    """R = 10 * x + y, G = 2 * x, B = 3 * y: every pixel's position can be read back."""
    ys, xs = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([10 * xs + ys, 2 * xs, 3 * ys], -1).astype(np.uint8))


def normalised(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) as the transforms normalise it."""
    scaled = (pixels.astype(np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return scaled.transpose(2, 0, 1)


def test_random_resized_crop_boxes_stay_within_scale_and_ratio():
    rng = random.Random(0)
    width, height = 400, 300
    fractions, ratios = [], []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(width, height, (0.2, 1.0), rng)
        assert 0 <= left <= width - w and 0 <= top <= height - h
        fractions.append(w * h / (width * height))
        ratios.append(w / h)
    # Rounding w and h to pixels moves the area and ratio by well under 1% at this size.
    assert 0.2 - 0.01 <= min(fractions) < 0.25 and 0.9 < max(fractions) <= 1.0
    assert 3 / 4 - 0.01 <= min(ratios) < 0.8 and 1.25 < max(ratios) <= 4 / 3 + 0.01


def test_random_resized_crop_falls_back_to_a_clamped_centre_crop():
    rng = random.Random(0)
    # No box of >= 8% of the area fits a 1000 x 2 strip with a ratio in [3/4, 4/3]: w = round(2 * 4/3) = 3.
    assert random_resized_crop_box(1000, 2, (0.08, 1.0), rng) == (498, 0, 3, 2)
    assert random_resized_crop_box(2, 1000, (0.08, 1.0), rng) == (0, 498, 2, 3)


def test_sample_rng_is_a_function_of_seed_epoch_index():
    assert sample_rng(3, 1, 7).random() == sample_rng(3, 1, 7).random()
    keys = [(3, 1, 7), (3, 2, 7), (3, 1, 8), (4, 1, 7), (3, 7, 1)]
    draws = {sample_rng(*key).random() for key in keys}
    assert len(draws) == 5


@pytest.mark.parametrize("transform_class", [PretrainTransform, FinetuneTransform])
def test_augmentation_is_reproducible_per_sample_and_varies_by_epoch(transform_class):
    data = Augmented(SyntheticImages(8, size=24), transform_class(16, MEAN, STD), seed=5)
    first, label = data[3]
    assert first.shape == (3, 16, 16) and first.dtype == torch.float32 and label == data.dataset[3][1]
    torch.testing.assert_close(data[3][0], first, rtol=0, atol=0)
    data.set_epoch(1)
    assert not torch.equal(data[3][0], first)
    data.set_epoch(0)
    torch.testing.assert_close(data[3][0], first, rtol=0, atol=0)
    assert not torch.equal(Augmented(data.dataset, data.transform, seed=6)[3][0], first)


def test_dataloader_workers_do_not_change_the_augmentation():
    data = Augmented(SyntheticImages(12, size=20), FinetuneTransform(16, MEAN, STD), seed=1)
    data.set_epoch(2)
    serial, parallel = (
        torch.cat([x for x, _ in DataLoader(data, batch_size=4, num_workers=workers)]) for workers in (0, 2)
    )
    torch.testing.assert_close(serial, parallel, rtol=0, atol=0)


def test_finetune_without_randaugment_and_erasing_is_the_pretrain_pipeline():
    img = gradient_image(30, 20)
    plain = FinetuneTransform(12, MEAN, STD, scale=(0.3, 1.0), rand_augment="", reprob=0.0)
    pretrain = PretrainTransform(12, MEAN, STD, scale=(0.3, 1.0))
    for index in range(5):
        expected = pretrain(img, sample_rng(0, 0, index))
        torch.testing.assert_close(plain(img, sample_rng(0, 0, index)), expected, rtol=0, atol=0)


def test_eval_transform_hand_computed_crop_and_normalisation():
    # 16 x 8 at size 8, crop_pct 1: the shorter side is already 8, so no resampling; the centre crop
    # takes columns 4..11.
    out = EvalTransform(8, MEAN, STD, crop_pct=1.0)(gradient_image(16, 8))
    assert out.shape == (3, 8, 8)
    assert out[0, 0, 0].item() == pytest.approx((40 / 255 - 0.5) / 0.2, abs=1e-6)  # R at x=4, y=0
    assert out[0, 3, 7].item() == pytest.approx((113 / 255 - 0.5) / 0.2, abs=1e-6)  # R at x=11, y=3
    assert out[2, 5, 2].item() == pytest.approx((15 / 255 - 0.3) / 0.5, abs=1e-6)  # B = 3 * 5
    torch.testing.assert_close(out, torch.from_numpy(normalised(np.array(gradient_image(16, 8))[:, 4:12])))
    value = 200
    constant = EvalTransform(8, MEAN, STD)(Image.new("L", (13, 9), value))
    for channel in range(3):
        expected = (value / 255 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(constant[channel], torch.full((8, 8), expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "expected_resize", "expected_box"),
    [((40, 20), (32, 16), (12, 4)), ((20, 40), (16, 32), (4, 12))],
)
def test_eval_transform_resizes_the_shorter_side_then_centre_crops(size, expected_resize, expected_box):
    # size 8 / crop_pct 0.5 -> shorter side 16; the longer keeps the 2:1 aspect.
    img = gradient_image(*size)
    left, top = expected_box
    reference = img.resize(expected_resize, Image.Resampling.BICUBIC).crop((left, top, left + 8, top + 8))
    out = EvalTransform(8, MEAN, STD, crop_pct=0.5)(img, random.Random(0))
    torch.testing.assert_close(out, torch.from_numpy(normalised(np.array(reference))))
    assert EvalTransform(224, MEAN, STD).resize_to == 256


def test_eval_transform_square_resize_drops_the_aspect_as_arm_does():
    # size 8 / crop_pct 0.5 -> the whole 40 x 20 image becomes 16 x 16; the crop is its centre 8 x 8.
    img = gradient_image(40, 20)
    reference = img.resize((16, 16), Image.Resampling.BICUBIC).crop((4, 4, 12, 12))
    out = EvalTransform(8, MEAN, STD, crop_pct=0.5, resize="square")(img)
    torch.testing.assert_close(out, torch.from_numpy(normalised(np.array(reference))))
    with pytest.raises(ValueError, match="resize must be 'shorter' or 'square'"):
        EvalTransform(8, MEAN, STD, resize="longer")


def test_parse_rand_augment():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugmentConfig(9, 2, 0.5, True)
    assert parse_rand_augment("rand-m7-n3") == RandAugmentConfig(7, 3, 0.0, False)
    assert parse_rand_augment("rand") == RandAugmentConfig(10, 2, 0.0, False)
    assert parse_rand_augment("rand-inc0-mstd101").magnitude_std == math.inf
    for bad in ("auto-m9", "rand-w0x", "rand-q3", "rand-mstd"):
        with pytest.raises(ValueError, match="RandAugment config"):
            parse_rand_augment(bad)


def test_randaugment_draws_ops_per_image():
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    assert ra.ops == INCREASING_OPS and RandAugment("rand-m9").ops == STANDARD_OPS
    draws = [ra.sample(random.Random(seed)) for seed in range(2000)]
    sequences = {tuple(op.name for op in ops) for ops in draws}
    assert len(sequences) > 100  # different images, different choices
    assert {op.name for ops in draws for op in ops} == set(INCREASING_OPS)
    # Two ops chosen, each kept with p = 0.5: one op per image on average.
    assert np.mean([len(ops) for ops in draws]) == pytest.approx(1.0, abs=0.05)
    magnitudes = np.array([op.magnitude for ops in draws for op in ops])
    assert magnitudes.min() >= 0 and magnitudes.max() <= 10
    assert magnitudes.mean() == pytest.approx(9.0, abs=0.05)
    assert magnitudes.std() == pytest.approx(0.5, abs=0.05)
    # Identical images with different generators come out different.
    img = gradient_image(16, 16)
    outputs = {np.array(ra(img, random.Random(seed))).tobytes() for seed in range(10)}
    assert len(outputs) > 5


def test_randaugment_magnitude_to_argument_mapping():
    rng = random.Random(0)
    assert abs(op_argument("Rotate", 5, rng)) == 15
    assert abs(op_argument("ShearX", 10, rng)) == pytest.approx(0.3)
    assert abs(op_argument("TranslateYRel", 10, rng)) == pytest.approx(0.45)
    assert op_argument("PosterizeIncreasing", 9, rng) == 4 - 3
    assert op_argument("Posterize", 9, rng) == 3
    assert op_argument("SolarizeIncreasing", 9, rng) == 256 - 230
    assert op_argument("Solarize", 9, rng) == 230
    assert op_argument("SolarizeAdd", 9, rng) == 99
    assert op_argument("Color", 5, rng) == pytest.approx(1.0)
    assert op_argument("Contrast", 10, rng) == pytest.approx(1.9)
    assert op_argument("AutoContrast", 10, rng) is None
    increasing = {round(op_argument("BrightnessIncreasing", 5, rng), 6) for _ in range(50)}
    assert increasing == {0.55, 1.45}
    assert {math.copysign(1, op_argument("Rotate", 3, rng)) for _ in range(50)} == {-1.0, 1.0}


def test_randaugment_ops_act_on_pixels_and_fill_with_the_mean_colour():
    transform = FinetuneTransform(8, (0.2860,) * 3, (0.3530,) * 3)
    ra = transform.rand_augment
    assert ra.fill == (73, 73, 73)  # round(255 * 0.286)
    img = gradient_image(8, 8)
    pixels = np.array(img)
    shifted = np.array(ra.apply(img, [DrawnOp("TranslateXRel", 5.6, 0.25)]))  # 2 pixels left
    np.testing.assert_array_equal(shifted[:, :6], pixels[:, 2:])
    assert (shifted[:, 6:] == 73).all()
    flat = Image.new("RGB", (2, 1))
    flat.putpixel((0, 0), (100, 200, 127))
    flat.putpixel((1, 0), (128, 0, 255))
    added = np.array(ra.apply(flat, [DrawnOp("SolarizeAdd", 9.0, 99)]))
    assert added.tolist() == [[[199, 200, 226], [128, 99, 255]]]  # only values < 128 get + 99
    solarized = np.array(ra.apply(flat, [DrawnOp("SolarizeIncreasing", 9.0, 128)]))
    assert solarized.tolist() == [[[100, 55, 127], [127, 0, 0]]]
    posterized = np.array(ra.apply(flat, [DrawnOp("PosterizeIncreasing", 10.0, 0)]))
    assert posterized.max() == 0  # 0 bits kept: black, as timm on Pillow < 10
    grey = ra.apply(Image.new("L", (4, 4), 10), [DrawnOp("Invert", 9.0, None)])
    assert grey.mode == "RGB" and np.array(grey).tolist() == [[[245] * 3] * 4] * 4


def test_random_erasing_box_bounds():
    erasing = RandomErasing(prob=1.0)
    rng = random.Random(0)
    fractions, aspects = [], []
    for _ in range(2000):
        top, left, h, w = erasing.sample_box(64, 64, rng)
        assert 0 <= top <= 64 - h and 0 <= left <= 64 - w
        fractions.append(h * w / 64**2)
        aspects.append(h / w)
    assert 0.015 <= min(fractions) < 0.03 and 0.3 < max(fractions) <= 0.36
    assert 0.28 <= min(aspects) < 0.4 and 2.5 < max(aspects) <= 3.6
    erased = [RandomErasing(0.25).sample_box(64, 64, rng) is not None for _ in range(4000)]
    assert np.mean(erased) == pytest.approx(0.25, abs=0.03)


def test_random_erasing_fills_one_box_with_standard_normal_noise():
    x = torch.full((3, 32, 32), 7.0)
    out = RandomErasing(prob=1.0)(x, random.Random(3))
    top, left, h, w = RandomErasing(prob=1.0).sample_box(32, 32, random.Random(3))
    changed = out != 7.0
    assert changed.sum().item() == 3 * h * w
    assert changed[:, top : top + h, left : left + w].all()
    noise = out[:, top : top + h, left : left + w]
    assert noise.std().item() == pytest.approx(1.0, abs=0.3) and noise.unique().numel() == 3 * h * w
    assert torch.equal(x, torch.full((3, 32, 32), 7.0))  # the input is left alone
    assert torch.equal(RandomErasing(prob=0.0)(x, random.Random(3)), x)
