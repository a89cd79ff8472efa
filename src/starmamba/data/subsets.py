"""Low-label training sets: a balanced, seeded subset of N labelled images per class."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from starmamba.data.datasets import DatasetInfo


def balanced_indices(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` items of each class of ``labels``, drawn without replacement with ``seed``.

    Each class draws from its own stream (seeded by ``seed`` and the class), so the subset of one class
    does not depend on how many items the others have.
    """
    if per_class < 1:
        raise ValueError(f"labels_per_class={per_class} must be at least 1")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    short = [f"class {c} has {counts[c]}" for c in range(num_classes) if counts[c] < per_class]
    if short:
        raise ValueError(
            f"labels_per_class={per_class}: the training set has too few labelled images ({', '.join(short)}); "
            "lower --labels_per_class or raise --limit_train"
        )
    chosen = [
        np.random.default_rng([seed, c]).choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(num_classes)
    ]
    return np.sort(np.concatenate(chosen))


class LabelledSubset(Dataset):
    """The items ``indices`` of a data set that has ``info`` and ``labels``, keeping both."""

    def __init__(self, dataset: Dataset, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices)
        self.labels = np.asarray(dataset.labels)[self.indices]

    @property
    def info(self) -> DatasetInfo:
        return self.dataset.info

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]


def labels_per_class_subset(dataset: Dataset, per_class: int, seed: int) -> LabelledSubset:
    """``per_class`` items of every class of ``dataset`` (balanced, seeded); the rest left out."""
    indices = balanced_indices(dataset.labels, per_class, dataset.info.num_classes, seed)
    return LabelledSubset(dataset, indices)
