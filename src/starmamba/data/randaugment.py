"""RandAugment with timm's op lists, magnitude mappings and config strings, drawn per image.

Every random choice comes from the ``random.Random`` passed in, so one image's augmentation is
reproducible on its own. ``sample`` returns the drawn operations, ``apply`` performs them.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0  # magnitudes are on timm's 0..10 scale

STANDARD_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
_ENHANCERS = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
}
OP_PROB = 0.5


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed ``rand-m{M}-n{N}-mstd{S}-inc{0|1}`` string (timm's defaults: M 10, N 2, mstd 0, inc 0)."""

    magnitude: int = 10
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False


def parse_rand_augment(config: str) -> RandAugmentConfig:
    """Parse timm's notation, e.g. 'rand-m9-mstd0.5-inc1'; an mstd above 100 means uniform in [0, M]."""
    head, *sections = config.split("-")
    if head != "rand":
        raise ValueError(f"RandAugment config must start with 'rand', got {config!r}")
    values: dict[str, float | int | bool] = {}
    for section in sections:
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None:
            raise ValueError(f"cannot read section {section!r} of RandAugment config {config!r}")
        key, value = match.groups()
        try:
            if key == "m":
                values["magnitude"] = int(value)
            elif key == "n":
                values["num_ops"] = int(value)
            elif key == "mstd":
                std = float(value)
                values["magnitude_std"] = math.inf if std > 100 else std
            elif key == "inc":
                values["increasing"] = bool(int(value))
            else:
                raise ValueError(f"unknown section {section!r} (known: m, n, mstd, inc)")
        except ValueError as err:
            raise ValueError(f"RandAugment config {config!r}: {err}") from err
    return RandAugmentConfig(**values)


@dataclass(frozen=True)
class DrawnOp:
    """One operation RandAugment will apply: its name, drawn magnitude (0..10) and PIL argument."""

    name: str
    magnitude: float
    arg: float | int | None


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() > 0.5 else value


def op_argument(name: str, magnitude: float, rng: random.Random) -> float | int | None:
    """timm's mapping from a 0..10 magnitude to the op's argument (random sign for the signed ops)."""
    level = magnitude / MAX_LEVEL
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return _signed(level * 30.0, rng)
    if name in ("ShearX", "ShearY"):
        return _signed(level * 0.3, rng)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(level * 0.45, rng)
    if name == "Posterize":
        return int(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return int(level * 256)
    if name == "SolarizeIncreasing":
        return 256 - int(level * 256)
    if name == "SolarizeAdd":
        return int(level * 110)
    if name in _ENHANCERS:
        return level * 1.8 + 0.1
    if name.removesuffix("Increasing") in _ENHANCERS:
        # 1.0 leaves the image unchanged; stronger magnitudes move further from it either way.
        return max(0.1, 1.0 + _signed(level * 0.9, rng))
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_op(img: Image.Image, op: DrawnOp, fill: tuple[int, ...]) -> Image.Image:
    """``img`` (RGB) with one drawn operation applied; geometric ops fill uncovered pixels with ``fill``."""
    name, arg = op.name, op.arg
    geometry = {"resample": Image.Resampling.BICUBIC, "fillcolor": fill}
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **geometry)
    if name.startswith("Posterize"):
        # A LUT rather than ImageOps.posterize, which recent Pillow rejects for 0 bits (all black in timm).
        mask = 0xFF & ~(2 ** (8 - min(arg, 8)) - 1)
        return img.point([v & mask for v in range(256)] * len(img.getbands()))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        lut = [min(255, v + arg) if v < 128 else v for v in range(256)]
        return img.point(lut * len(img.getbands()))
    if name.removesuffix("Increasing") in _ENHANCERS:
        return _ENHANCERS[name.removesuffix("Increasing")](img).enhance(arg)
    affine = {
        "ShearX": (1, arg, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, arg, 1, 0),
        "TranslateXRel": (1, 0, arg * img.width, 0, 1, 0),
        "TranslateYRel": (1, 0, 0, 0, 1, arg * img.height),
    }
    if name in affine:
        return img.transform(img.size, Image.Transform.AFFINE, affine[name], **geometry)
    raise ValueError(f"unknown RandAugment op {name!r}")


class RandAugment:
    """timm's RandAugment: N ops drawn uniformly with replacement per image, each applied with p=0.5."""

    def __init__(self, config: str | RandAugmentConfig, fill: tuple[int, int, int] = (128, 128, 128)) -> None:
        self.config = parse_rand_augment(config) if isinstance(config, str) else config
        self.ops = INCREASING_OPS if self.config.increasing else STANDARD_OPS
        self.fill = tuple(fill)

    def _magnitude(self, rng: random.Random) -> float:
        magnitude, std = float(self.config.magnitude), self.config.magnitude_std
        if std == math.inf:
            magnitude = rng.uniform(0, magnitude)
        elif std > 0:
            magnitude = rng.gauss(magnitude, std)
        return min(max(magnitude, 0.0), MAX_LEVEL)

    def sample(self, rng: random.Random) -> list[DrawnOp]:
        """The operations one image gets, in order (those whose p=0.5 coin came up)."""
        chosen = [rng.choice(self.ops) for _ in range(self.config.num_ops)]
        drawn = []
        for name in chosen:
            if rng.random() > OP_PROB:
                continue
            magnitude = self._magnitude(rng)
            drawn.append(DrawnOp(name, magnitude, op_argument(name, magnitude, rng)))
        return drawn

    def apply(self, img: Image.Image, ops: list[DrawnOp]) -> Image.Image:
        """``img`` converted to RGB with ``ops`` applied in order."""
        img = img.convert("RGB")
        for op in ops:
            img = apply_op(img, op, self.fill)
        return img

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        return self.apply(img, self.sample(rng))
