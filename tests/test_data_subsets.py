"""Low-label subsets: balanced, seeded, and a clear error when a class is short."""

import numpy as np
import pytest

from starmamba.data import build_dataset
from starmamba.data.subsets import balanced_indices, labels_per_class_subset

LABELS = np.array([0, 1, 2] * 10 + [0] * 5)  # 15 of class 0, 10 of classes 1 and 2


def test_subset_is_balanced_and_unique():
    index = balanced_indices(LABELS, 4, num_classes=3, seed=0)
    assert len(set(index.tolist())) == 12
    assert np.bincount(LABELS[index], minlength=3).tolist() == [4, 4, 4]


def test_subset_is_deterministic_per_seed_and_differs_between_seeds():
    first = balanced_indices(LABELS, 4, num_classes=3, seed=0)
    assert balanced_indices(LABELS, 4, num_classes=3, seed=0).tolist() == first.tolist()
    assert balanced_indices(LABELS, 4, num_classes=3, seed=1).tolist() != first.tolist()


def test_a_class_with_too_few_labels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"labels_per_class=11.*class 1 has 10, class 2 has 10"):
        balanced_indices(LABELS, 11, num_classes=3, seed=0)
    with pytest.raises(ValueError, match="labels_per_class=0"):
        balanced_indices(LABELS, 0, num_classes=3, seed=0)


def test_subset_of_a_dataset_keeps_its_items_and_info():
    dataset = build_dataset("synthetic", "train")
    subset = labels_per_class_subset(dataset, 5, seed=3)
    assert len(subset) == 5 * dataset.info.num_classes
    assert subset.info == dataset.info
    image, label = subset[7]
    original_image, original_label = dataset[int(subset.indices[7])]
    assert label == original_label == subset.labels[7]
    assert np.array_equal(np.asarray(image), np.asarray(original_image))


def test_finetune_config_refuses_a_non_positive_labels_per_class():
    from starmamba.train.config import FinetuneConfig

    with pytest.raises(ValueError, match="labels_per_class=0"):
        FinetuneConfig(labels_per_class=0)
