"""Every training recipe, defined once: the paper's presets (``--preset``), the Fashion-MNIST presets, ARM
as a set of STAR options, and the small-scale recipe of ``demo`` and ``ablate``.

The paper's recipes are the job configs' defaults (:mod:`starmamba.train.config`); the presets here name
variants of them. The small scale is the paper's geometry scaled down to 24 px Fashion-MNIST (or any
data set): patch 4 -> 6 x 6 patches, clusters of 2 x 2 patches -> the paper's 3 x 3 clusters per image,
8 images per sequence, a 6-block, 96-wide MambaMLP with a 4-layer, 128-wide decoder; every run is one
epoch over distinct images, and ``budget`` scales their number. The measurements behind these choices
are in docs/recipes.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starmamba.models import model_config
from starmamba.train.config import FinetuneConfig, PretrainConfig

# ARM, the baseline: STAR with one image per sequence and no separator.
ARM = {"images_per_sequence": 1, "separator": "none"}

SMALL_ARCH = dict(img_size=24, patch_size=4, dim=96, depth=6)
SMALL_DECODER = dict(decoder_dim=128, decoder_head_dim=32)
PRETRAIN_IMAGES = 12_288  # per epoch at budget 1
FINETUNE_IMAGES = 8_192
PROBE_IMAGES = 10_240  # the k-NN probe's bank of training images at budget 1
PRETRAIN_VAL_IMAGES = 1_024  # the pretraining loss's validation images (a curve, not a reported metric)
LOW_LABELS_PER_CLASS = 100
EPOCHS = 1
BATCH = 64
FINETUNE_BATCH = 16
FINETUNE_WARMUP_EPOCHS = 0.05
# The default demo: finetuning and probing at budget 0.4, pretraining at 1.5, where the pretrained
# encoders' k-NN top-1 rises clearly above the random encoder's (docs/evidence/).
DEMO_BUDGET = 0.4
DEMO_PRETRAIN_BUDGET = 1.5


@dataclass
class Scale:
    """How big every run of an experiment is."""

    budget: float = 1.0
    data_path: str = "fashion_mnist"
    val_images: int | None = None
    """validation images every top-1 is measured on (None: the whole validation split)"""
    num_workers: int = 1
    progress: bool = True
    pretrain_budget: float | None = None
    """the pretraining's own budget (None: ``budget``)"""

    def images(self, per_epoch: int, budget: float | None = None) -> int:
        """Training images per epoch at ``budget`` (default: this scale's), in whole batches (at least 2)."""
        return max(2, round(per_epoch * (self.budget if budget is None else budget) / BATCH)) * BATCH

    @property
    def pretrain_images(self) -> int:
        """Pretraining images per epoch."""
        return self.images(PRETRAIN_IMAGES, self.pretrain_budget)


def pretrain_config(scale: Scale, out: Path, seed: int, **star_options) -> PretrainConfig:
    """Small-scale STAR pretraining; ``star_options`` are StarConfig overrides (ARM: N=1, no separator)."""
    arch = model_config("star_tiny", **SMALL_ARCH, **SMALL_DECODER, cluster_size=2, **star_options)
    val_images = min(scale.val_images or PRETRAIN_VAL_IMAGES, PRETRAIN_VAL_IMAGES)
    return PretrainConfig(
        model="star_tiny", arch=arch, data_path=scale.data_path, output_dir=str(out), batch_size=BATCH,
        epochs=EPOCHS, warmup_epochs=0.25, blr=1.5e-3, clip_grad=3.0, seed=seed,
        limit_train=scale.pretrain_images, limit_val=val_images, num_workers=scale.num_workers,
        progress=scale.progress, tensorboard=False, log_every=10,
    )  # fmt: skip


def finetune_config(scale: Scale, out: Path, seed: int, pretrained: str = "", **classifier_options) -> FinetuneConfig:
    """Small-scale finetuning of the matching 4-scan classifier (from ``pretrained`` or from scratch).

    The paper's structure (AdamW, warmup + cosine, layer decay, EMA; top-1 measured once, at the end)
    without anything that regularises (RandAugment, Mixup/CutMix, erasing, smoothing, drop path,
    crops): a run sees each image once or a few times, so nothing overfits, and each of them slowed
    learning. Batch 16 at lr 2e-3 (``blr`` 3.2e-2), because short runs are short of optimizer steps;
    an EMA horizon of about 50 steps. Layer decay only for pretrained weights (as MAE's supervised
    recipe): it would slow the lower layers of an untrained encoder.
    """
    arch = model_config("mambamlp_tiny", **SMALL_ARCH, drop_path=0.0, **classifier_options)
    return FinetuneConfig(
        model="mambamlp_tiny", arch=arch, finetune=pretrained, data_path=scale.data_path, output_dir=str(out),
        batch_size=FINETUNE_BATCH, epochs=EPOCHS, eval_every=EPOCHS, warmup_epochs=FINETUNE_WARMUP_EPOCHS, blr=3.2e-2,
        ema_decay=0.98, layer_decay=0.75 if pretrained else 1.0, reprob=0.0, smoothing=0.0,
        mixup=0.0, cutmix=0.0, aa="", min_crop_scale=1.0, seed=seed, limit_train=scale.images(FINETUNE_IMAGES),
        limit_val=scale.val_images, num_workers=scale.num_workers, progress=scale.progress,
        tensorboard=False, log_every=10, crop_pct=1.0,
    )  # fmt: skip


def low_label_options(scale: Scale, num_classes: int, per_class: int = LOW_LABELS_PER_CLASS) -> dict:
    """FinetuneConfig overrides for finetuning on ``per_class`` labels per class with as many optimizer
    steps (and the same warmup in steps) as a full-label run at ``scale``: more epochs over fewer images."""
    repeat = scale.images(FINETUNE_IMAGES) / (per_class * num_classes)
    epochs = max(1, round(EPOCHS * repeat))
    return {"labels_per_class": per_class, "limit_train": None, "epochs": epochs, "eval_every": epochs,
            "warmup_epochs": FINETUNE_WARMUP_EPOCHS * repeat}  # fmt: skip


def all_labels_options(epochs: int) -> dict:
    """FinetuneConfig overrides for finetuning on the whole labelled training set for ``epochs`` passes
    instead of on the budget's images (the warmup stays a fraction of the first pass)."""
    return {"limit_train": None, "epochs": epochs, "eval_every": epochs}


# The demo reports the finetuned weights' own top-1, so it keeps no EMA copy (evaluating one would
# double each finetuning's evaluation); the training is the same with or without it.
WITHOUT_EMA = {"ema_decay": None}


def _fashion_mnist_star() -> PretrainConfig:
    # The paper's geometry scaled to 28 px clothes: 48 px, patch 4 -> 12 x 12 patches,
    # clusters of 4 x 4 patches -> 3 x 3 clusters, 160 tokens per image, 8 images per sequence.
    arch = model_config("star_tiny", img_size=48, patch_size=4, dim=96, depth=6, decoder_dim=128, decoder_head_dim=32)
    return PretrainConfig(
        model="star_tiny", arch=arch, batch_size=64, epochs=2, warmup_epochs=0.2, blr=1.5e-3, num_workers=1,
        output_dir="runs/fashion_mnist/pretrain",
    )  # fmt: skip


def _fashion_mnist_classifier() -> FinetuneConfig:
    # The small-scale recipe at the 48 px geometry, with light crops (>= 60%) and drop path; no
    # ImageNet-strength regularisation (it kept a run at chance for its first steps). Layer decay 0.75
    # is for the encoder of `pretrain --preset fashion_mnist`; from scratch pass --layer_decay 1.0.
    arch = model_config("mambamlp_tiny", img_size=48, patch_size=4, dim=96, depth=6, drop_path=0.1, num_classes=10)
    return FinetuneConfig(
        model="mambamlp_tiny", arch=arch, batch_size=64, epochs=2, warmup_epochs=0.05, blr=8e-3,
        layer_decay=0.75, ema_decay=0.998, mixup=0.0, cutmix=0.0, aa="", reprob=0.0, min_crop_scale=0.6,
        crop_pct=1.0, num_workers=1, output_dir="runs/fashion_mnist/finetune",
    )  # fmt: skip


PRESETS: dict[str, dict[str, Callable[[], Any]]] = {
    "pretrain": {
        "star_base_in1k_300ep": lambda: PretrainConfig(epochs=300),
        "star_base_in1k_1600ep": lambda: PretrainConfig(epochs=1600),
        "star_large_in1k_300ep": lambda: PretrainConfig(
            model="star_large", arch=model_config("star_large"), batch_size=128, accum_iter=2
        ),
        "arm_base_in1k": lambda: PretrainConfig(arch=model_config("star_base", **ARM), output_dir="runs/arm"),
        "fashion_mnist": _fashion_mnist_star,
    },
    "finetune": {
        "finetune_base_in1k": FinetuneConfig,
        "finetune_large_in1k": lambda: FinetuneConfig(
            model="mambamlp_large",
            arch=model_config("mambamlp_large", drop_path=0.3),
            batch_size=32,
            accum_iter=4,
            layer_decay=0.75,
        ),
        "fashion_mnist": _fashion_mnist_classifier,
    },
}


def preset(job: str, name: str):
    """The config of preset ``name`` for ``job`` ('pretrain' or 'finetune')."""
    if name not in PRESETS[job]:
        raise ValueError(f"unknown {job} preset {name!r}; choose one of {', '.join(PRESETS[job])}")
    return PRESETS[job][name]()
