"""Which data set a ``--data_path`` names: a built-in set, an image folder (labelled or not) or WebDataset
shards; one place that knows every source, above the modules that read each."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from starmamba.data import shards
from starmamba.data.datasets import (
    MAX_UNREADABLE,
    SYNTHETIC_SIZES,
    FashionMNIST,
    ImageFolder,
    Split,
    SyntheticImages,
    UnlabelledImages,
    _check_limit,
    _check_max_unreadable,
    _check_split,
    _class_names,
    _holds_idx_files,
)


def build_dataset(
    name_or_path: str, split: Split, limit: int | None = None, max_unreadable: float = MAX_UNREADABLE,
    labels: bool = True,
) -> Dataset:  # fmt: skip
    """The ``split`` of a data set:

    - 'fashion_mnist', 'synthetic', or a directory of Fashion-MNIST IDX files;
    - an ImageNet-style folder ``root/{train,val}/<class>/<image>``;
    - unlabelled images: ``root/{train,val}/<image>`` (no subfolders in train/: they would be classes), or a
      folder of images without train/ (one split, see :func:`single_split`); every label is -1 and
      ``info.num_classes`` 0;
    - WebDataset shards (:mod:`starmamba.data.shards`): a folder holding ``{train,val}/*.tar`` or
      ``{train,val}-*.tar``, a folder of .tar files (one split), or a pattern of .tar files (one split):
      a glob or braces, 'shards/train-{000000..000146}.tar'.

    A one-split data set gives its images for either split. ``labels``: refuse unlabelled images
    (every job but pretraining needs labels). ``max_unreadable``: the fraction of the split that may be
    unreadable (see ImageFolder).
    """
    _check_split(split)
    _check_limit(limit)
    _check_max_unreadable(max_unreadable)
    if name_or_path == "fashion_mnist":
        return FashionMNIST(None, split, limit)
    if name_or_path == "synthetic":
        size = SYNTHETIC_SIZES[split]
        return SyntheticImages(size if limit is None else min(size, limit), seed=0 if split == "train" else 1)
    if shards.is_shard_pattern(name_or_path):
        files = shards.shard_files(name_or_path)
        dataset = shards.ShardImages(files, files[0].parent.name, name_or_path, limit, max_unreadable)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data set {name_or_path!r} is neither 'fashion_mnist', 'synthetic', an existing directory nor "
                "a pattern of .tar shards"
            )
        if _holds_idx_files(path):
            return FashionMNIST(path, split, limit)
        files = shards.folder_shards(path, split)
        if files is not None:
            dataset = shards.ShardImages(files, path.name, str(files[0].parent), limit, max_unreadable)
        elif (path / "train").is_dir() and _class_names(path / "train"):
            dataset = ImageFolder(path, split, limit, max_unreadable)
        elif (path / "train").is_dir():
            dataset = UnlabelledImages(path / split, limit, max_unreadable)
        else:
            dataset = UnlabelledImages(path, limit, max_unreadable)
    if labels and dataset.info.num_classes == 0:
        raise ValueError(
            f"{name_or_path} holds unlabelled images (no class folders, or shards without .cls labels): only "
            "pretraining can use them; label them as root/train/<class>/<image> and root/val/<class>/<image>"
        )
    return dataset


def single_split(name_or_path: str) -> bool:
    """Whether the data set is one set of images without a train/val split: a folder of images without
    train/ (or of .tar shards without train/ or train-*.tar), or a pattern of .tar shards."""
    if shards.is_shard_pattern(name_or_path):
        return True
    path = Path(name_or_path).expanduser()
    if name_or_path in ("fashion_mnist", "synthetic") or not path.is_dir() or _holds_idx_files(path):
        return False
    return not (path / "train").is_dir() and not shards.has_split_shards(path)
