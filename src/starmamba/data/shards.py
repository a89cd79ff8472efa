"""WebDataset tar shards as a map-style data set: every shard indexed once, each image read by its offset.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by WebDataset's
convention (``KEY.EXT``: the key is the path up to the first dot of the file name): a sample's image
is its first member with an image extension (``jpg``, ``png``, ...), its label the integer in its
``cls`` member. Shards where no sample has a ``cls`` are unlabelled (every label -1, for
pretraining); a ``classes.txt`` (one class name per line) in the shards' folder or the one above
names the classes, else there are 1 + the largest label of them.

Indexing (reading the tar headers and the tiny ``cls`` members, not the images) makes the shards a
map-style data set: the samplers of :mod:`starmamba.train.distributed` shard it over processes and
resume it at any step exactly as they do a folder of images. Every process indexes every shard, and
Python's tarfile reads headers slowly (1 ms a sample was measured on a busy 2-core machine), so each
shard's index is cached (:func:`cache_dir`, keyed by the shard's path, size and modification time):
only a run's first start on a machine reads the headers.
Needs the ``webdataset`` package (``pip install 'starmamba[shards]'``) for its brace expansion
and its sample naming.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
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
from starmamba.errors import RunError

SHARD_SUFFIX = ".tar"
CLASSES_FILE = "classes.txt"
CACHE_ENV = "STARMAMBA_CACHE"
NO_LABEL = -1  # in an index: a sample without a cls member
_INDEX_VERSION = 1  # bump when the cached index changes form
_IMAGE_EXTENSIONS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise RunError("reading .tar shards needs the webdataset package: pip install 'starmamba[shards]'") from None
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


def index_shard(shard: Path) -> dict[str, np.ndarray]:
    """Where each sample's image lies in ``shard``: {'names' (member names), 'offsets', 'sizes', 'labels'
    (-1 for a sample without ``cls``)}, from the index cache when the shard has not changed since."""
    stat = shard.stat()
    key = f"{shard.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_INDEX_VERSION}"
    cached = cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"
    try:
        with np.load(cached, allow_pickle=False) as stored:
            return {name: stored[name] for name in ("names", "offsets", "sizes", "labels")}
    except (OSError, ValueError, KeyError):
        pass
    index = _read_index(shard)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.stem}.{os.getpid()}.npz")
        np.savez(staging, **index)
        os.replace(staging, cached)  # processes indexing the same shard at once each write a whole file
    except OSError:
        pass  # an unwritable cache costs the next start this indexing again, nothing else
    return index


def cache_dir() -> Path:
    """Where shard indexes are kept: $STARMAMBA_CACHE, else $XDG_CACHE_HOME/starmamba, else ~/.cache/starmamba."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "starmamba"
    return Path(root).expanduser() / "shard-index"


def _read_index(shard: Path) -> dict[str, np.ndarray]:
    """:func:`index_shard` read from the tar headers (and the tiny ``cls`` members); the images are not read."""
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
                    if not (text.isascii() and text.isdigit()):
                        raise ValueError(f"{shard}: {member.name} holds {text[:20]!r}, not a class index")
                    sample["label"] = int(text)
    except tarfile.TarError as err:
        raise ValueError(f"{shard} is not an uncompressed tar file ({err})") from None
    images = [(*s["image"], s.get("label", NO_LABEL)) for s in samples.values() if "image" in s]
    names, offsets, sizes, labels = zip(*images, strict=True) if images else ((), (), (), ())
    return {
        "names": np.array(names, dtype=str),
        "offsets": np.array(offsets, dtype=np.int64),
        "sizes": np.array(sizes, dtype=np.int64),
        "labels": np.array(labels, dtype=np.int64),
    }


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
        indexes = [index_shard(shard) for shard in shards]
        names = [f"{shard}:{member}" for shard, index in zip(shards, indexes, strict=True) for member in index["names"]]
        if not names:
            raise ValueError(f"no images ({', '.join(sorted(_IMAGE_EXTENSIONS))}) in the shards of {where}")
        labels = np.concatenate([index["labels"] for index in indexes])
        unlabelled = labels == NO_LABEL
        if unlabelled.any() and not unlabelled.all():
            first = names[int(np.argmax(unlabelled))]
            raise ValueError(f"{first} has no .cls label but other samples of {where} have one")
        classes = _class_names(shards)
        if unlabelled.all():
            labels, classes = np.full(len(names), UNLABELLED), []
        elif classes is None:
            classes = [str(k) for k in range(labels.max() + 1)]
        elif labels.max() >= len(classes):
            raise ValueError(f"{where}: label {labels.max()} but {CLASSES_FILE} names {len(classes)} classes")
        info = DatasetInfo(name, len(classes), IMAGENET_MEAN, IMAGENET_STD, tuple(classes))
        keep = self._set_images(names, labels, Path(where), info, limit, max_unreadable)
        self.shards = np.array([str(s) for s in shards])
        shard_of = [np.full(len(index["names"]), number) for number, index in enumerate(indexes)]
        self.shard_of = np.concatenate(shard_of).astype(np.int32)[keep]
        self.offsets = np.concatenate([index["offsets"] for index in indexes])[keep]
        self.sizes = np.concatenate([index["sizes"] for index in indexes])[keep]

    def _open(self, i: int) -> Image.Image:
        with open(self.shards[self.shard_of[i]], "rb") as file:
            file.seek(int(self.offsets[i]))
            data = file.read(int(self.sizes[i]))
        return Image.open(io.BytesIO(data))
