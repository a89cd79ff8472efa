"""Per-sample transforms: PIL image + ``random.Random`` -> normalised (3, size, size) float32 tensor.

All randomness comes from the generator passed in; ``Augmented`` derives it from (seed, epoch, index),
so a sample's augmentation does not depend on the DataLoader's workers or the order of loading.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from starmamba.data.datasets import DatasetInfo
from starmamba.data.randaugment import RandAugment

BICUBIC = Image.Resampling.BICUBIC


class Transform(Protocol):
    """What ``Augmented`` applies: (PIL image, per-sample generator) -> (3, S, S) tensor."""

    def __call__(self, img: Image.Image, rng: random.Random) -> Tensor: ...


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for one sample's augmentation in one epoch."""
    # A string seed goes through SHA-512, so neighbouring triples give unrelated streams, and unlike
    # hash() it does not change between processes.
    return random.Random(f"{seed}:{epoch}:{index}")


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """RGB image -> (3, H, W) float32, scaled to [0, 1] and then normalised per channel."""
    pixels = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels.float() / 255 - mean_t) / std_t


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: random.Random,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, w, h): area fraction in ``scale``, log-uniform ratio.

    After 10 draws that do not fit, the centre crop of the whole image, narrowed to the allowed ratios.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: tuple[float, float],
    rng: random.Random,
) -> Image.Image:
    """A random box of ``img`` resized (bicubic) to size x size."""
    left, top, w, h = random_resized_crop_box(img.width, img.height, scale, rng)
    return img.crop((left, top, left + w, top + h)).resize((size, size), BICUBIC)


def random_hflip(img: Image.Image, rng: random.Random) -> Image.Image:
    """``img`` mirrored left-right with probability 0.5."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


class RandomErasing:
    """timm's RandomErasing, 'pixel' mode: with probability ``prob``, one box of per-pixel N(0, 1) noise."""

    def __init__(
        self,
        prob: float = 0.25,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.prob = prob
        self.area = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def sample_box(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of the box to erase, or None (not drawn, or 10 attempts did not fit)."""
        if rng.random() >= self.prob:
            return None
        for _ in range(10):
            target_area = rng.uniform(*self.area) * height * width
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(target_area * aspect))
            w = round(math.sqrt(target_area / aspect))
            if w < width and h < height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        return None

    def __call__(self, x: Tensor, rng: random.Random) -> Tensor:
        """(C, H, W) normalised image -> a copy with the drawn box replaced by N(0, 1) noise."""
        box = self.sample_box(x.shape[-2], x.shape[-1], rng)
        if box is None:
            return x
        top, left, h, w = box
        noise = torch.randn((x.shape[0], h, w), generator=torch.Generator().manual_seed(rng.getrandbits(63)))
        x = x.clone()
        x[:, top : top + h, left : left + w] = noise.to(x.dtype)
        return x


class PretrainTransform:
    """MAE's pretraining pipeline: RandomResizedCrop (bicubic), horizontal flip, normalise."""

    def __init__(
        self, size: int, mean: Sequence[float], std: Sequence[float], scale: tuple[float, float] = (0.2, 1.0)
    ) -> None:
        self.size, self.mean, self.std, self.scale = size, tuple(mean), tuple(std), scale

    def __call__(self, img: Image.Image, rng: random.Random) -> Tensor:
        img = random_hflip(random_resized_crop(img.convert("RGB"), self.size, self.scale, rng), rng)
        return to_tensor(img, self.mean, self.std)


class FinetuneTransform:
    """timm's training transform as MAE finetunes: crop, flip, RandAugment, normalise, RandomErasing.

    ``rand_augment`` is timm's notation ('' or None disables it); ``reprob`` 0 disables erasing.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
    ) -> None:
        self.size, self.mean, self.std, self.scale = size, tuple(mean), tuple(std), scale
        # timm fills uncovered pixels of geometric ops with the data set's mean colour.
        fill = tuple(min(255, round(255 * m)) for m in self.mean)
        self.rand_augment = RandAugment(rand_augment, fill) if rand_augment else None
        self.erasing = RandomErasing(reprob) if reprob > 0 else None

    def __call__(self, img: Image.Image, rng: random.Random) -> Tensor:
        img = random_hflip(random_resized_crop(img.convert("RGB"), self.size, self.scale, rng), rng)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        x = to_tensor(img, self.mean, self.std)
        return self.erasing(x, rng) if self.erasing is not None else x


INTERPOLATIONS = {
    "bicubic": BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
"""timm's interpolation names and Pillow's filters."""


class EvalTransform:
    """Resize (bicubic, or ``interpolation``) so that a centre crop of ``size`` keeps ``crop_pct`` of it,
    crop, normalise.

    ``resize="shorter"`` makes the shorter side int(size / crop_pct), keeping the aspect (timm,
    torchvision); ``resize="square"`` makes the whole image that square, aspect not kept (ARM:
    256 x 256 for the 224 crop).
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_pct: float = 0.875,
        resize: Literal["shorter", "square"] = "shorter",
        interpolation: str = "bicubic",
    ) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if resize not in ("shorter", "square"):
            raise ValueError(f"resize must be 'shorter' or 'square', got {resize!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        self.size, self.mean, self.std, self.resize = size, tuple(mean), tuple(std), resize
        self.filter = INTERPOLATIONS[interpolation]
        self.resize_to = int(size / crop_pct)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Tensor:
        """Deterministic; ``rng`` is accepted only so every transform has the same signature."""
        img = img.convert("RGB")
        w, h = img.size
        if self.resize == "square":
            w = h = self.resize_to
        elif w <= h:  # torchvision's Resize(int): the longer side keeps the aspect (rounded down)
            w, h = self.resize_to, int(self.resize_to * h / w)
        else:
            w, h = int(self.resize_to * w / h), self.resize_to
        img = img.resize((w, h), self.filter)
        top, left = round((h - self.size) / 2), round((w - self.size) / 2)
        return to_tensor(img.crop((left, top, left + self.size, top + self.size)), self.mean, self.std)


class Augmented(Dataset):
    """A (PIL image, label) data set seen through a transform: items (tensor (3, S, S), label).

    Sample ``i`` of epoch ``e`` is transformed with ``sample_rng(seed, e, i)``; call ``set_epoch`` before
    each epoch (DataLoader workers must be started after it, i.e. not persistent).
    """

    def __init__(self, dataset: Dataset, transform: Transform, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def info(self) -> DatasetInfo:
        return self.dataset.info

    @property
    def num_skipped(self) -> int:
        """The inner data set's count of unreadable images (AttributeError when it does not keep one)."""
        if not hasattr(self.dataset, "num_skipped"):
            raise AttributeError(f"{type(self.dataset).__name__} does not count skipped images")
        return self.dataset.num_skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, label = self.dataset[index]
        return self.transform(img, sample_rng(self.seed, self.epoch, index)), label
