"""Data: Fashion-MNIST / ImageNet-style / unlabelled / synthetic data sets, WebDataset shards (``data.shards``),
per-sample transforms, Mixup/CutMix."""

from starmamba.data.datasets import (
    FASHION_MNIST_DIR_ENV,
    DatasetInfo,
    FashionMNIST,
    ImageFolder,
    SyntheticImages,
    UnlabelledImages,
    UnreadableImagesError,
)
from starmamba.data.mixup import MixupCutmix, soft_target_cross_entropy
from starmamba.data.randaugment import RandAugment, parse_rand_augment
from starmamba.data.sources import build_dataset, single_split
from starmamba.data.transforms import (
    Augmented,
    EvalTransform,
    FinetuneTransform,
    PretrainTransform,
    RandomErasing,
    sample_rng,
)

__all__ = [
    "FASHION_MNIST_DIR_ENV",
    "Augmented",
    "DatasetInfo",
    "EvalTransform",
    "FashionMNIST",
    "FinetuneTransform",
    "ImageFolder",
    "MixupCutmix",
    "PretrainTransform",
    "RandAugment",
    "RandomErasing",
    "SyntheticImages",
    "UnlabelledImages",
    "UnreadableImagesError",
    "build_dataset",
    "parse_rand_augment",
    "sample_rng",
    "single_split",
    "soft_target_cross_entropy",
]
