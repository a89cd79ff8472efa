"""WebDataset tar shards as a map-style data set: every shard indexed once, each image read by its offset.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by WebDataset's
convention (``KEY.EXT``: the key is the path up to the first dot of the file name): a sample's image
is its first member with an image extension (``jpg``, ``png``, ...), its label the integer in its
``cls`` member. Shards where no sample has a ``cls`` are unlabelled (every label -1, for
pretraining); a ``classes.txt`` (one class name per line) in the shards' folder or the one above
names the classes, else there are 1 + the largest label of them.

Indexing (reading the tar headers and the tiny ``cls`` members, not the images) makes the shards a
map-style data set: the samplers of :mod:`starmamba.train.distributed` shard it over processes and
resume it at any step exactly as they do a folder of images. Every process indexes every shard.
Needs the ``webdataset`` package (``pip install 'starmamba[shards]'``) for its brace expansion
and its sample naming.
"""

from __future__ import annotations

import glob
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from starmamba.data.datasets import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_UNREADABLE,
    UNLABELLED,
    DatasetInfo,
    ImageFolder,
)

SHARD_SUFFIX = ".tar"
CLASSES_FILE = "classes.txt"
_IMAGE_EXTENSIONS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError("reading .tar shards needs the webdataset package: pip install 'starmamba[shards]'") from None
    return webdataset


def is_shard_pattern(spec: str) -> bool:
    """Whether ``spec`` names .tar shards: a file, a glob or a brace pattern ('train-{000000..000146}.tar')."""
    return spec.endswith(SHARD_SUFFIX)


def shard_files(pattern: str) -> list[Path]:
    """The shards of a pattern: braces and '::' expanded as WebDataset does, then globs, each sorted."""
    files: list[Path] = []
    for entry in _webdataset().shardlists.expand_urls(pattern):
        if glob.has_magic(entry):
            matched = sorted(glob.glob(entry))
            if not matched:
                raise FileNotFoundError(f"no shard matches {entry} (of --data_path {pattern!r})")
            files += map(Path, matched)
        else:
            files.append(Path(entry))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {pattern!r} do not exist: {', '.join(missing[:3])}")
    return files


def folder_shards(folder: Path, split: str) -> list[Path] | None:
    """The shards of ``split`` in ``folder``: ``split/*.tar`` or ``split-*.tar``; every .tar of the folder when
    none is named by a split (a folder of one split); None when the folder holds no shards."""
    in_subfolder = sorted((folder / split).glob(f"*{SHARD_SUFFIX}"))
    if in_subfolder:
        return in_subfolder
    named = sorted(folder.glob(f"{split}-*{SHARD_SUFFIX}"))
    if named:
        return named
    if has_split_shards(folder):
        raise FileNotFoundError(
            f"{folder} holds training shards but none of the {split} split ({split}/*.tar or {split}-*.tar)"
        )
    return sorted(folder.glob(f"*{SHARD_SUFFIX}")) or None


def has_split_shards(folder: Path) -> bool:
    """Whether ``folder`` holds shards named by split (``train/*.tar`` or ``train-*.tar``)."""
    return any((folder / "train").glob(f"*{SHARD_SUFFIX}")) or any(folder.glob(f"train-*{SHARD_SUFFIX}"))


def index_shard(shard: Path) -> list[tuple[str, int, int, int | None]]:
    """(member name, offset, size) of each sample's image in ``shard``, and its label (None without ``cls``)."""
    base_plus_ext = _webdataset().tariterators.base_plus_ext
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                if key is None:
                    continue
                sample = samples.setdefault(key, {})
                ext = ext.lower()
                if ext in _IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = (member.name, member.offset_data, member.size)
                elif ext == "cls":
                    text = tar.extractfile(member).read().decode(errors="replace").strip()
                    try:
                        sample["label"] = int(text)
                    except ValueError:
                        raise ValueError(f"{shard}: {member.name} holds {text[:20]!r}, not a class index") from None
    except tarfile.TarError as err:
        raise ValueError(f"{shard} is not an uncompressed tar file ({err})") from None
    return [(*s["image"], s.get("label")) for s in samples.values() if "image" in s]


def _class_names(shards: list[Path]) -> list[str] | None:
    folder = shards[0].parent
    for candidate in (folder / CLASSES_FILE, folder.parent / CLASSES_FILE):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
    return None


class ShardImages(ImageFolder):
    """The samples of WebDataset ``shards`` in order; items are (8-bit RGB PIL image, label or -1).

    ``name`` names the data set, ``where`` the shards in messages. Unreadable images are skipped and
    counted and ``limit`` keeps evenly spaced samples, as in :class:`~starmamba.data.datasets.ImageFolder`.
    """

    def __init__(
        self, shards: list[Path], name: str, where: str, limit: int | None = None,
        max_unreadable: float = MAX_UNREADABLE,
    ) -> None:  # fmt: skip
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be a positive number of samples or None, got {limit}")
        names, labels, shard_of, offsets, sizes = [], [], [], [], []
        for number, shard in enumerate(shards):
            for member, offset, size, label in index_shard(shard):
                names.append(f"{shard}:{member}")
                labels.append(label)
                shard_of.append(number)
                offsets.append(offset)
                sizes.append(size)
        if not names:
            raise ValueError(f"no images ({', '.join(sorted(_IMAGE_EXTENSIONS))}) in the shards of {where}")
        unlabelled = [sample for sample, label in zip(names, labels, strict=True) if label is None]
        if unlabelled and len(unlabelled) < len(names):
            raise ValueError(f"{unlabelled[0]} has no .cls label but other samples of {where} have one")
        classes = _class_names(shards)
        if unlabelled:
            labels = [UNLABELLED] * len(names)
            classes = []
        elif classes is None:
            classes = [str(k) for k in range(max(labels) + 1)]
        elif max(labels) >= len(classes):
            raise ValueError(f"{where}: label {max(labels)} but {CLASSES_FILE} names {len(classes)} classes")
        info = DatasetInfo(name, len(classes), IMAGENET_MEAN, IMAGENET_STD, tuple(classes))
        keep = self._set_images(names, labels, Path(where), info, limit, max_unreadable)
        self.shards = np.array([str(s) for s in shards])
        self.shard_of = np.array(shard_of, dtype=np.int32)[keep]
        self.offsets = np.array(offsets, dtype=np.int64)[keep]
        self.sizes = np.array(sizes, dtype=np.int64)[keep]

    def _open(self, i: int) -> Image.Image:
        with open(self.shards[self.shard_of[i]], "rb") as file:
            file.seek(int(self.offsets[i]))
            data = file.read(int(self.sizes[i]))
        return Image.open(io.BytesIO(data))
