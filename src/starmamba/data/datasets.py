"""Image classification data sets: Fashion-MNIST (IDX files), ImageNet-style folders, synthetic images."""

from __future__ import annotations

import colorsys
import gzip
import multiprocessing
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from starmamba.models.hub import IMAGENET_MEAN, IMAGENET_STD

Split = Literal["train", "val"]

FASHION_MNIST_DIR_ENV = "STARMAMBA_FASHION_MNIST"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"})
# What PIL raises for a corrupt, truncated or absurdly large file.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

SYNTHETIC_SIZES = {"train": 512, "val": 128}
UNLABELLED = -1
"""The label of every image of an unlabelled data set (a folder of images without class folders)."""
MAX_UNREADABLE = 0.01
"""Default fraction of a split's images that may be unreadable (skipped) before loading stops."""
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set: its classes and normalisation statistics."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of samples or None, got {limit}")


def _check_max_unreadable(max_unreadable: float) -> None:
    if not 0.0 <= max_unreadable <= 1.0:
        raise ValueError(f"max_unreadable={max_unreadable!r} must lie in [0, 1] (a fraction of the split)")


class UnreadableImagesError(ValueError):
    """More of a split's images are unreadable than ``max_unreadable`` allows."""

    def __init__(self, message: str) -> None:
        # A DataLoader re-raises a worker's error as its type with "Caught ... Original Traceback ..."
        # as the message; the traceback's last line holds the message the worker raised.
        if message.startswith("Caught ") and f"{type(self).__name__}: " in message:
            message = message.rsplit(f"{type(self).__name__}: ", 1)[1].strip()
        super().__init__(message)


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``img``, high bit depths scaled down rather than clipped.

    Pillow's own conversion clips 16-bit values at 255 (a 16-bit image comes out nearly white).
    Integer modes (``I;16*``, and ``I``, which is how Pillow widens 16-bit data) are read as
    16-bit, 0..65535 -> 0..255; float images (``F``) as 0..1. 16-bit RGB(A) PNGs already open as
    8-bit RGB(A) (Pillow keeps each sample's high byte).
    """
    if img.mode in _SIXTEEN_BIT:
        pixels = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) * (255 / 65535)
        img = Image.fromarray(np.round(pixels).astype(np.uint8))
    elif img.mode == "F":
        pixels = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return img.convert("RGB")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzip or raw): (N, rows, cols) for images, (N,) for labels."""
    raw = Path(path).read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected or 0 in dims:
        raise ValueError(
            f"{path}: dimensions {dims} need {expected} bytes of data, the file holds {len(raw) - header} "
            "(truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_file(root: Path, base: str) -> Path:
    for name in (f"{base}.gz", base):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {base}[.gz] not found in {root}. Install the Debian package "
        f"{FASHION_MNIST_PACKAGE} (files in {FASHION_MNIST_DEFAULT_DIR}) or set {FASHION_MNIST_DIR_ENV} to a "
        "directory holding the four IDX files."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files; items are (28x28 RGB PIL image, label). 'val' is the t10k set."""

    def __init__(
        self,
        root: str | Path | None = None,
        split: Split = "train",
        limit: int | None = None,
    ) -> None:
        _check_split(split)
        _check_limit(limit)
        if root is None:
            root = os.environ.get(FASHION_MNIST_DIR_ENV, FASHION_MNIST_DEFAULT_DIR)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST directory {root} does not exist. Install the Debian package "
                f"{FASHION_MNIST_PACKAGE} or set {FASHION_MNIST_DIR_ENV} to a directory holding the IDX "
                "files."
            )
        image_file, label_file = (_find_idx_file(root, base) for base in _FASHION_MNIST_FILES[split])
        images = read_idx(image_file, IDX_IMAGES_MAGIC)
        labels = read_idx(label_file, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{label_file}: label {labels.max()} is not one of the 10 Fashion-MNIST classes")
        self.root = root
        self.images = images[:limit]
        self.labels = labels[:limit]
        self.info = DatasetInfo("fashion_mnist", 10, (0.2860,) * 3, (0.3530,) * 3, FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])


def _unlistable(error: OSError) -> PermissionError:
    """A folder of the data set that cannot be listed: an error naming it (rather than a class silently lost)."""
    return PermissionError(
        f"cannot list {error.filename} ({error.strerror or error}); fix its permissions (a data set folder must be "
        "readable and searchable)"
    )


def _class_names(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{split_dir} is not a directory; expected the layout root/{{train,val}}/<class>/<image>"
        )
    try:
        return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:
        raise _unlistable(error) from None


def _image_files(class_dir: Path) -> list[str]:
    """The images under ``class_dir`` (in subfolders too), sorted; a folder that cannot be listed is an error."""

    def refuse(error: OSError) -> None:
        raise _unlistable(error) from None

    return sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(class_dir, onerror=refuse)
        for name in names
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS
        and not name.startswith(".")
        and os.path.isfile(os.path.join(folder, name))
    )


class ImageFolder(Dataset):
    """ImageNet layout ``root/{train,val}/<class>/<image>``; items are (8-bit RGB PIL image, class index).

    Classes are the sorted subdirectories of ``root/train`` for both splits. An unreadable image
    (truncated, empty, not an image) is skipped for the next readable one, with one warning per
    file, and counted once in ``num_skipped`` across DataLoader workers; once more than
    ``max_unreadable`` of the split is unreadable, loading raises :class:`UnreadableImagesError`.
    ``limit`` keeps that many images evenly spaced over the sorted list, so every class stays represented.
    """

    def __init__(
        self,
        root: str | Path,
        split: Split = "train",
        limit: int | None = None,
        max_unreadable: float = MAX_UNREADABLE,
    ) -> None:
        _check_split(split)
        _check_limit(limit)
        _check_max_unreadable(max_unreadable)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        classes = _class_names(root / "train")
        if not classes:
            raise ValueError(f"{root / 'train'} has no class subdirectories")
        split_dir = root / split
        split_classes = _class_names(split_dir)
        unknown = sorted(set(split_classes) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir} has classes missing from {root / 'train'}: {unknown[:5]}")
        index = {name: i for i, name in enumerate(classes)}
        paths, labels = [], []
        for name in split_classes:
            files = _image_files(split_dir / name)
            paths += files
            labels += [index[name]] * len(files)
        if not paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {split_dir}")
        info = DatasetInfo(root.name, len(classes), IMAGENET_MEAN, IMAGENET_STD, tuple(classes))
        self._set_images(paths, labels, split_dir, info, limit, max_unreadable)

    def _set_images(
        self, paths: list[str], labels: list[int], location: Path, info: DatasetInfo, limit: int | None,
        max_unreadable: float,
    ) -> np.ndarray:  # fmt: skip
        """Keep ``limit`` of the images (evenly spaced) and set up the count of unreadable ones; the kept indices."""
        keep = np.arange(len(paths))
        if limit is not None and limit < len(paths):
            keep = np.arange(limit) * len(paths) // limit
        # numpy arrays rather than lists of Python objects: workers reading a list touch its refcounts
        # and so copy its pages, which grows memory per worker on large data sets.
        self.paths = np.array(paths)[keep]
        self.labels = np.array(labels, dtype=np.int64)[keep]
        self.location = location
        self.info = info
        self.max_unreadable = max_unreadable
        # Shared with DataLoader workers: which images were found unreadable, and how many.
        self._unreadable = multiprocessing.RawArray("b", len(self.paths))
        self._skipped = multiprocessing.Value("q", 0)
        return keep

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable images met so far, by this process and its DataLoader workers."""
        return self._skipped.value

    def check_unreadable(self, count: int | None = None) -> None:
        """Raise :class:`UnreadableImagesError` when ``count`` (default ``num_skipped``) is over the limit.

        Under DDP each rank meets only its share of the split: pass the count summed over ranks.
        """
        count = self.num_skipped if count is None else count
        if count > self.max_unreadable * len(self):
            raise UnreadableImagesError(
                f"{count} of the {len(self)} images under {self.location} are unreadable "
                f"({count / len(self):.1%}), more than max_unreadable={self.max_unreadable:g} allows; "
                "fix or remove them, or raise --max_unreadable"
            )

    def _skip(self, i: int, err: Exception) -> None:
        with self._skipped.get_lock():
            first = not self._unreadable[i]
            if first:
                self._unreadable[i] = 1
                self._skipped.value += 1
        if first:
            warnings.warn(f"skipping unreadable image {self.paths[i]}: {err}", stacklevel=3)
        self.check_unreadable()

    def __len__(self) -> int:
        return len(self.labels)

    def _open(self, i: int) -> Image.Image:
        # str(): PIL names the file by repr() in its errors, which shows np.str_('...').
        return Image.open(str(self.paths[i]))

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        count = len(self)
        index = range(count)[index]
        for offset in range(count):
            i = (index + offset) % count
            if self._unreadable[i]:
                continue
            try:
                with self._open(i) as img:
                    return to_rgb(img), int(self.labels[i])
            except _UNREADABLE as err:
                self._skip(i, err)
        raise UnreadableImagesError(f"none of the {count} images under {self.location} can be read")


class UnlabelledImages(ImageFolder):
    """Every image under ``folder`` (subfolders included), without labels: items are (8-bit RGB PIL image, -1).

    For pretraining, which uses no labels: ``info.num_classes`` is 0. Unreadable images and ``limit``
    are handled as in :class:`ImageFolder`.
    """

    def __init__(self, folder: str | Path, limit: int | None = None, max_unreadable: float = MAX_UNREADABLE) -> None:
        _check_limit(limit)
        _check_max_unreadable(max_unreadable)
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        paths = _image_files(folder)
        if not paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {folder}")
        info = DatasetInfo(folder.name, 0, IMAGENET_MEAN, IMAGENET_STD, ())
        self._set_images(paths, [UNLABELLED] * len(paths), folder, info, limit, max_unreadable)


class SyntheticImages(Dataset):
    """Deterministic toy images for tests: the class sets colour and stripe orientation; phase, noise vary."""

    def __init__(self, num_samples: int, num_classes: int = 4, size: int = 32, seed: int = 0) -> None:
        counts = (num_samples, num_classes, size)
        if min(counts) <= 0:
            raise ValueError(f"num_samples, num_classes and size must be positive, got {counts}")
        self.num_classes = num_classes
        self.size = size
        self.seed = seed
        self.labels = np.random.default_rng(seed).integers(num_classes, size=num_samples)
        self.info = DatasetInfo(
            "synthetic", num_classes, (0.5,) * 3, (0.5,) * 3, tuple(f"class_{k}" for k in range(num_classes))
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = range(len(self))[index]
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, index])
        angle = np.pi * label / self.num_classes
        ys, xs = np.mgrid[0 : self.size, 0 : self.size]
        period = max(4.0, self.size / 4)
        along = xs * np.cos(angle) + ys * np.sin(angle)
        wave = np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi))
        colour = np.array(colorsys.hsv_to_rgb(label / self.num_classes, 0.8, 0.9))
        pixels = colour * (0.6 + 0.4 * wave)[..., None] + rng.normal(0, 0.08, (self.size, self.size, 3))
        return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)), label


def _holds_idx_files(path: Path) -> bool:
    names = [base for pair in _FASHION_MNIST_FILES.values() for base in pair]
    return any((path / name).is_file() or (path / f"{name}.gz").is_file() for name in names)
