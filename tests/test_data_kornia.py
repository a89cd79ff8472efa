"""Pins of kornia behaviours that differ from timm's recipe, and are why starmamba.data does not use them."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

pytest.importorskip("kornia")
K = pytest.importorskip("kornia.augmentation")
auto = pytest.importorskip("kornia.augmentation.auto")


def test_mixup_v2_draws_lambda_uniformly_per_image():
    assert inspect.signature(K.RandomMixUpV2).parameters["lambda_val"].default is None  # None means [0, 1]
    torch.manual_seed(0)
    mix = K.RandomMixUpV2(data_keys=["input", "class"])
    x, y = torch.zeros(64, 1, 2, 2), torch.arange(64)
    lams = torch.cat([mix(x, y)[1][:, 2] for _ in range(200)])
    # Uniform(0, 1): variance 1/12 ~ 0.0833, where timm's Beta(0.8, 0.8) has ~0.0962.
    assert lams.mean().item() == pytest.approx(0.5, abs=0.01)
    assert lams.var().item() == pytest.approx(1 / 12, abs=0.003)
    assert abs(lams.var().item() - 1 / (4 * (2 * 0.8 + 1))) > 0.008
    # One lambda per image, not one per batch as in timm's batch mode.
    assert mix(x, y)[1][:, 2].unique().numel() > 32


@pytest.mark.parametrize("correct", [False, True])
def test_cutmix_v2_lambda_is_the_pasted_area_unless_corrected(correct):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cutmix = K.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=correct)
    # The backwards-compatible default warns that it will change.
    assert any(issubclass(w.category, DeprecationWarning) for w in caught) == (not correct)
    torch.manual_seed(1)
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    y = torch.tensor([0, 1])
    checked = 0
    for _ in range(100):
        out, labels = cutmix(x, y)
        for row in range(2):
            original, paired, lam = labels[0, row].tolist()
            if original == paired:
                continue  # paired with itself: the paste is invisible
            pasted = (out[row] != x[row]).float().mean().item()
            assert lam == pytest.approx(1 - pasted if correct else pasted, abs=1e-6)
            checked += 0 < pasted < 1
    assert checked > 20


def test_randaugment_picks_one_op_sequence_per_batch():
    torch.manual_seed(2)
    ra = auto.RandAugment(n=2, m=9)
    params = ra.forward_parameters(torch.Size((8, 3, 16, 16)))
    assert len(params) == 2  # two ops for the whole batch, not two per image
    # Restricted to ops without per-image signs or thresholds, identical images come out identical, while
    # the op choice still changes from batch to batch.
    policy = [
        [("auto_contrast", 0, 1)], [("equalize", 0, 1)], [("invert", 0, 1)], [("posterize", 4.0, 8.0)],
        [("solarize", 0.0, 1.0)], [("color", 0.1, 1.9)], [("contrast", 0.1, 1.9)], [("brightness", 0.1, 1.9)],
        [("sharpness", 0.1, 1.9)],
    ]  # fmt: skip
    ra = auto.RandAugment(n=2, m=9, policy=policy)
    images = torch.rand(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()
    outputs = []
    for _ in range(30):
        out = ra(images)
        assert all(torch.equal(out[0], out[i]) for i in range(1, 8))
        outputs.append(out[0])
    assert sum(not torch.equal(outputs[0], o) for o in outputs) > 20


def test_randaugment_signs_rotation_per_image():
    # With the default policy only the sign of a signed op (and solarize_add's threshold) varies by image.
    torch.manual_seed(3)
    ra = auto.RandAugment(n=1, m=9, policy=[[("rotate", -30.0, 30.0)]])
    params = ra.forward_parameters(torch.Size((64, 3, 8, 8)))
    degrees = params[0].data[0].data["degrees"]
    assert set(degrees.abs().tolist()) == {9.0}  # m / 30 of the 30-degree range, for every image
    assert {-9.0, 9.0} == set(degrees.tolist())
