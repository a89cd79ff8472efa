"""Pretrain -> finetune experiments at a scale one CPU affords, shared by ``demo`` and ``ablate``.

The geometry is the paper's scaled down: 24 px Fashion-MNIST (or any data set), patch 4 -> 6 x 6
patches, clusters of 2 x 2 patches -> the paper's 3 x 3 clusters per image, separators of 4 tokens,
40 tokens per image, 8 images per sequence. The models are a 6-block, 96-wide MambaMLP with a
4-layer, 128-wide decoder. Every run is one epoch over distinct images: at a fixed compute, one
pass over twice the images beat two passes (82.5% against 81.2% top-1 from scratch on 32k image
steps). ``budget`` scales the number of training images; at budget 1 a STAR pretraining takes
about 70 s and a finetuning about 165 s (twice the 72 s of training measured at budget 0.5, and
about 20 s for the test set) on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from starmamba.files import write_json
from starmamba.models import StarConfig, model_config
from starmamba.train.config import FinetuneConfig, PretrainConfig, to_dict

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


@dataclass
class Scale:
    """How big every run of an experiment is."""

    budget: float = 1.0
    data_path: str = "fashion_mnist"
    val_images: int | None = None
    """validation images every top-1 is measured on (None: the whole validation split)"""
    num_workers: int = 1
    progress: bool = True

    def images(self, per_epoch: int) -> int:
        """Training images per epoch at this budget, in whole batches (at least 2)."""
        return max(2, round(per_epoch * self.budget / BATCH)) * BATCH


def pretrain_config(scale: Scale, out: Path, seed: int, **star_options) -> PretrainConfig:
    """Small-scale STAR pretraining; ``star_options`` are StarConfig overrides (ARM: N=1, no separator)."""
    arch = model_config("star_tiny", **SMALL_ARCH, **SMALL_DECODER, cluster_size=2, **star_options)
    val_images = min(scale.val_images or PRETRAIN_VAL_IMAGES, PRETRAIN_VAL_IMAGES)
    return PretrainConfig(
        model="star_tiny", arch=arch, data_path=scale.data_path, output_dir=str(out), batch_size=BATCH,
        epochs=EPOCHS, warmup_epochs=0.25, blr=1.5e-3, clip_grad=3.0, seed=seed,
        limit_train=scale.images(PRETRAIN_IMAGES), limit_val=val_images, num_workers=scale.num_workers,
        progress=scale.progress, tensorboard=False, log_every=10,
    )  # fmt: skip


def finetune_config(scale: Scale, out: Path, seed: int, pretrained: str = "", **classifier_options) -> FinetuneConfig:
    """Small-scale finetuning of the matching 4-scan classifier (from ``pretrained`` or from scratch).

    The recipe keeps the paper's structure (AdamW, warmup + cosine, layer decay, EMA; top-1 measured
    once, at the end) but leaves out everything that regularises: RandAugment, Mixup/CutMix, random
    erasing, label smoothing, drop path, and crops (a random-resized crop of the whole image only
    varies the aspect ratio). A run sees each image once or a few times, so nothing overfits, and
    each of them slowed learning: calibrated from scratch on 16k images x 2 epochs, the ImageNet-
    light recipe (crops >= 60%, drop path 0.1, smoothing 0.1, blr 8e-3) reached 77.2% top-1, without
    drop path and with crops >= 80% 79.1%, with blr 1.6e-2 80.2%, without crops and smoothing 81.2%.
    Short runs are then short of optimizer steps, and a high rate does not make up for them: from
    scratch on all 60,000 images once (top-1 on 5,000 test images), batch 32 reached 82.1% at lr 4e-3
    and 85.4% at 2e-3, batch 16 86.1% at 2e-3 (13% more time than batch 32) and 85.6% at 1e-3; on
    16k images, lr 8e-3 lost 13-22 points against 4e-3. Hence batch 16 at lr 2e-3 (blr 3.2e-2), a
    warmup of 5% of an epoch (16k images: 77.4% against 76.1% with 25%), and an EMA decay of 0.98, a
    horizon of about 50 steps, a fraction of the 512 steps of a run at budget 1. Layer decay (0.75)
    is for pretrained weights; a from-scratch run uses none, as in MAE's supervised recipe, because
    it would only slow the lower layers of an untrained encoder (it cost 7 points here).
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


@dataclass
class ProbeConfig:
    """A k-NN probe of an encoder: pretrained ``weights``, or ``arch`` initialised with ``seed`` when ''."""

    arch: StarConfig
    weights: str
    data_path: str
    seed: int
    train_images: int
    val_images: int | None
    output_dir: str = ""


def run_probe_config(config: ProbeConfig) -> dict:
    """The k-NN top-1 of ``config``'s encoder, read as in pretraining (see :mod:`starmamba.train.probe`)."""
    import torch

    from starmamba.models import StarPretrainer
    from starmamba.models.loading import load_probe_model
    from starmamba.train.probe import probe_model

    if config.weights:
        model, _ = load_probe_model(config.weights)
    else:
        torch.manual_seed(config.seed)
        model = StarPretrainer(config.arch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = probe_model(
        model, config.data_path, "knn", device, crop_pct=1.0, limit_train=config.train_images,
        limit_val=config.val_images,
    )  # fmt: skip
    return result | {"output_dir": config.output_dir, "seed": config.seed}


def config_key(config) -> str:
    """A short hash of what decides a run's outcome (not where it writes or how it shows progress)."""
    values = to_dict(config)
    for key in ("output_dir", "progress", "num_workers", "log_every", "tensorboard"):
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def cached_run(root: Path, config, run) -> dict:
    """Run ``run(config)`` in ``root/<config hash>`` unless a finished result is already there."""
    folder = root / f"{type(config).__name__.removesuffix('Config').lower()}-{config_key(config)}"
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    result = run(dataclasses.replace(config, output_dir=str(folder)))
    write_json(result_path, result)
    return result


def pretrain(scale: Scale, root: Path, seed: int, star_options: dict) -> dict:
    """A cached small-scale pretraining run; the result names its folder and weights."""
    from starmamba.train.pretrain import run_pretrain

    return cached_run(root, pretrain_config(scale, root, seed, **star_options), run_pretrain) | {"seed": seed}


def finetune(
    scale: Scale, root: Path, seed: int, pretrained: dict | None, classifier_options: dict | None = None,
    overrides: dict | None = None,
) -> dict:  # fmt: skip
    """A cached small-scale finetuning run, from a :func:`pretrain` result or from scratch; ``overrides``
    replace FinetuneConfig options (e.g. :func:`low_label_options`)."""
    from starmamba.train.finetune import run_finetune

    weights = str(Path(pretrained["output_dir"]) / "model.safetensors") if pretrained else ""
    config = finetune_config(scale, root, seed, weights, **(classifier_options or {}))
    config = dataclasses.replace(config, **(overrides or {}))
    return cached_run(root, config, run_finetune) | {"seed": seed}


def knn_probe(scale: Scale, root: Path, seed: int, pretrained: dict | None, star_options: dict) -> dict:
    """A cached k-NN probe of a :func:`pretrain` result's encoder, or (``pretrained`` None) of the encoder of
    ``star_options`` at random initialisation with ``seed``. The bank is the first training images."""
    weights = str(Path(pretrained["output_dir"]) / "model.safetensors") if pretrained else ""
    arch = pretrain_config(scale, root, seed, **star_options).arch
    config = ProbeConfig(arch, weights, scale.data_path, seed, scale.images(PROBE_IMAGES), scale.val_images)
    return cached_run(root, config, run_probe_config)


def run_tasks(fn: Callable, tasks: Sequence[tuple], jobs: int = 1) -> list:
    """``[fn(*task) for task in tasks]``, with ``jobs`` > 1 in that many fresh processes (spawned, so that
    no parent thread pool is inherited) that split the CPU cores between them, or get one GPU each."""
    if jobs <= 1:
        return [fn(*task) for task in tasks]
    import torch

    os.environ["STARMAMBA_JOBS_GPUS"] = str(torch.cuda.device_count())
    os.environ["STARMAMBA_JOBS"] = str(jobs)
    context = multiprocessing.get_context("spawn")
    slots = context.Manager().Queue()
    for slot in range(jobs):
        slots.put(slot)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(slots,)) as pool:
        return list(pool.map(fn, *zip(*tasks, strict=True)))


def _init_worker(slots) -> None:
    slot = slots.get()
    gpus = int(os.environ.get("STARMAMBA_JOBS_GPUS", "0"))
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    else:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["STARMAMBA_JOBS"])))
