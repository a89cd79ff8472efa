"""Typed configs of the three jobs (pretrain, finetune, evaluate), and config files (named presets:
:mod:`starmamba.experiments.recipes`).

Defaults are the paper's recipes (section 4.1, with ARM's choices where the paper is silent); flag
names follow MAE/ARM (``--blr``, ``--accum_iter``, ``--layer_decay``, ...). The model's own options
(``StarConfig``/``ClassifierConfig``) are flattened into the same namespace.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro
from typeguard import TypeCheckError, check_type

from starmamba.checks import check_choice, check_fraction, check_positive
from starmamba.data.datasets import MAX_UNREADABLE
from starmamba.models import ClassifierConfig, StarConfig, model_config
from starmamba.train.precision import Precision

Device = Literal["auto", "cpu", "cuda"]
EvalResize = Literal["square", "shorter"]
ProbeChoice = Literal["none", "knn", "linear"]
DataPath = Annotated[str, tyro.conf.arg(aliases=("--data",))]
"""A data location; ``--data`` is accepted as a short form of ``--data_path``."""


@dataclass
class RunConfig:
    """Options every training job shares."""

    data_path: DataPath = "fashion_mnist"
    """'fashion_mnist', 'synthetic', an ImageFolder root (train/<class>/*, val/<class>/*), an IDX folder, a folder
    of unlabelled images (pretraining), or WebDataset shards: a folder of {train,val}/*.tar or {train,val}-*.tar,
    or a pattern of .tar files ('shards/train-{000000..000146}.tar'; the extra starmamba[shards])"""
    output_dir: str = "runs/run"
    """where the config, metrics, checkpoints and plots go"""
    batch_size: int = 256
    """images per process and step (effective batch = batch_size * accum_iter * processes)"""
    accum_iter: int = 1
    """micro-batches accumulated per optimizer step"""
    epochs: int = 300
    warmup_epochs: float = 40.0
    blr: float = 1.5e-4
    """base learning rate: lr = blr * effective batch / 256"""
    lr: float | None = None
    """absolute learning rate; overrides blr when given"""
    min_lr: float = 0.0
    """floor of the cosine schedule"""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None
    """clip the gradient norm to this value (None: no clipping)"""
    layer_decay: float = 1.0
    """layer-wise lr decay: each layer below the head trains at this times the lr of the one above (1.0: none)"""
    ema_decay: float | None = None
    """decay of an EMA of the weights, exported and evaluated beside them (None: no EMA)"""
    decay_a_log: bool = False
    """also weight-decay the SSM's A_log, as ARM's optimizer does. Off by default, as in Mamba and Vim:
    decay pulls A_log towards 0, every state towards the same decay rate exp(-dt), and over a run it is
    no small pull (300 ImageNet epochs at ARM's lr and wd 0.05 shrink an undriven A_log e^5.6-fold)"""
    seed: int = 0
    """seeds weights, sampling and augmentation: a run is repeatable for a fixed seed on one device"""
    num_workers: int = field(default_factory=lambda: available_workers(most=8))
    """data-loading processes per training process (kept alive across epochs): 8, or fewer when this
    machine has fewer CPU cores per training process"""
    device: Device = "auto"
    """'auto' takes CUDA when present"""
    precision: Precision | None = None
    """autocast precision of the forward pass, on any device: 'fp32', 'bf16' or 'fp16' (with loss scaling);
    None: bf16 on CUDA, fp32 on a CPU. Weights and optimizer state stay fp32"""
    resume: str = ""
    """'' starts afresh, 'auto' continues from the latest checkpoint in output_dir, or a checkpoint directory"""
    overwrite: bool = False
    """replace a run already in output_dir (its checkpoints, metrics, weights, plots); ignored in --config files"""
    ckpt_every: int = 0
    """optimizer steps between checkpoints (0: only at the end of every epoch)"""
    keep_checkpoints: int = 1
    limit_train: int | None = None
    """use only the first N training images (quick runs)"""
    limit_val: int | None = None
    """use only the first N validation images"""
    max_unreadable: float = MAX_UNREADABLE
    """fraction of a split's images that may be unreadable (skipped, counted) before the run stops"""
    log_every: int = 20
    """optimizer steps between metric lines"""
    tensorboard: bool = True
    """also write TensorBoard events when tensorboard is installed"""
    progress: bool = True
    """show a progress bar"""
    grad_checkpointing: bool = False
    """recompute each encoder block's activations in the backward pass instead of keeping them: much less
    memory (benchmarks/memory.py) for one more forward pass of the encoder"""

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("batch_size", "accum_iter", "epochs", "keep_checkpoints", "log_every"):
            check_positive(name, getattr(self, name))
        for name in ("warmup_epochs", "min_lr", "weight_decay", "num_workers", "ckpt_every", "blr"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_choice("device", self.device, Device)
        if self.precision is not None:
            check_choice("precision", self.precision, Precision)
        if self.lr is not None:
            check_positive("lr", self.lr)
        if self.clip_grad is not None:
            check_positive("clip_grad", self.clip_grad)
        check_fraction("layer_decay", self.layer_decay)
        if self.ema_decay is not None:
            check_fraction("ema_decay", self.ema_decay)
        for beta in self.betas:
            check_fraction("betas", beta)
        check_fraction("max_unreadable", self.max_unreadable)


def check_finite(config: Any, where: str = "") -> None:
    """Raise a ValueError naming the option unless every float of ``config`` (and of its nested configs,
    tuples included) is finite: NaN passes every range check, and inf ends a run mid-training."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, where)
            continue
        for number in value if isinstance(value, tuple) else (value,):
            if isinstance(number, float) and not math.isfinite(number):
                raise ValueError(f"{where}{item.name}={value!r} is not a finite number")


def available_workers(most: int = 4) -> int:
    """``most`` data-loading processes, or fewer on a machine with fewer CPU cores for each of the processes
    torchrun started on it (``LOCAL_WORLD_SIZE``, e.g. one per GPU)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(most, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def check_rgb(arch: StarConfig | ClassifierConfig) -> None:
    """Refuse a model that does not take the 3 channels every data loader gives."""
    # Grayscale data (Fashion-MNIST) is loaded as 3 equal channels, and every transform, RandAugment
    # and the normalisation statistics work on RGB, so a model of other channel counts is refused
    # here, before anything is loaded, rather than at its first batch.
    if arch.in_chans != 3:
        raise ValueError(
            f"in_chans={arch.in_chans}: the data loaders give RGB images (grayscale ones as 3 equal channels); "
            "use in_chans=3"
        )


@dataclass
class PretrainConfig(RunConfig):
    """STAR (or ARM) autoregressive pretraining. Defaults: STAR-B, 300 epochs, batch 2048 over 8 GPUs."""

    model: str = "star_base"
    """preset the architecture starts from (star_tiny ... star_huge); the options below override it"""
    arch: Annotated[StarConfig, tyro.conf.arg(name="")] = field(default_factory=lambda: model_config("star_base"))
    output_dir: str = "runs/pretrain"
    clip_grad: float | None = 3.0
    min_crop_scale: float = 0.2
    """lower bound of the random-resized-crop area"""
    recon_every: int = 1
    """epochs between reconstruction images"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rgb(self.arch)
        check_fraction("min_crop_scale", self.min_crop_scale)
        per_process = self.batch_size
        if per_process % self.arch.images_per_sequence:
            raise ValueError(
                f"batch_size={per_process} is not a multiple of images_per_sequence="
                f"{self.arch.images_per_sequence}: every batch must pack whole sequences"
            )


@dataclass
class FinetuneConfig(RunConfig):
    """Finetuning a 4-scan MambaMLP classifier. Defaults: the paper's Base recipe (batch 1024 over 8 GPUs)."""

    model: str = "mambamlp_base"
    """preset the architecture starts from (mambamlp_tiny ... mambamlp_huge); the options below override it"""
    arch: Annotated[ClassifierConfig, tyro.conf.arg(name="")] = field(
        default_factory=lambda: model_config("mambamlp_base", drop_path=0.1)
    )
    finetune: str = ""
    """pretrained weights to start from: a starmamba run or .safetensors, or ARM's .pth; '' trains from scratch"""
    output_dir: str = "runs/finetune"
    batch_size: int = 128
    epochs: int = 100
    warmup_epochs: float = 5.0
    blr: float = 5e-4
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65
    """layer-wise lr decay (0.65 Base, 0.75 Large; 1.0 disables)"""
    ema_decay: float | None = 0.99992
    """decay of the EMA of weights, evaluated separately (None: no EMA)"""
    mixup: float = 0.8
    """Mixup alpha (0 disables)"""
    cutmix: float = 1.0
    """CutMix alpha (0 disables)"""
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    """label smoothing"""
    aa: str = "rand-m9-mstd0.5-inc1"
    """RandAugment policy in timm's notation ('' disables)"""
    reprob: float = 0.25
    """random erasing probability"""
    min_crop_scale: float = 0.08
    """lower bound of the random-resized-crop area (timm's default)"""
    crop_pct: float = 0.875
    """evaluation resizes to img_size / crop_pct, then centre-crops img_size"""
    eval_resize: EvalResize = "square"
    """'square': resize evaluation images to a square, aspect not kept (ARM: 256 x 256, then the 224 crop);
    'shorter': resize the shorter side, keeping the aspect (timm/torchvision)"""
    eval_every: int = 1
    """epochs between evaluations (the last epoch is always evaluated)"""
    labels_per_class: int | None = None
    """low-label finetuning: train on a balanced subset of N labelled images per class, drawn with --seed
    from the (--limit_train) training set; the rest is unused (None: every image)"""
    label_names: tuple[str, ...] = ()
    """the class names, class by class, kept with the run and its export (timm's label_names) for
    `starmamba predict`; empty: the data set's own (its class folders, Fashion-MNIST's names)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rgb(self.arch)
        if not 0 < self.layer_decay <= 1:
            raise ValueError(
                f"layer_decay={self.layer_decay!r} must lie in (0, 1]: 0 freezes every encoder block "
                "(each layer learns at layer_decay times the lr of the one above it); 1.0 disables the decay"
            )
        check_choice("eval_resize", self.eval_resize, EvalResize)
        for name in (
            "mixup_prob",
            "mixup_switch_prob",
            "smoothing",
            "reprob",
            "min_crop_scale",
            "crop_pct",
        ):
            check_fraction(name, getattr(self, name))
        for name in ("mixup", "cutmix"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_positive("eval_every", self.eval_every)
        if self.labels_per_class is not None:
            check_positive("labels_per_class", self.labels_per_class)
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"batch_size={self.batch_size} must be even for Mixup/CutMix (pairs are mixed)")


@dataclass
class EvaluateConfig:
    """Top-1 / top-5 of a classifier checkpoint on a validation split, or the top-1 of a probe on the
    frozen features of a classifier or a pretrained encoder (--probe knn|linear)."""

    checkpoint: str
    """a starmamba checkpoint directory or .safetensors file, or ARM's finetuned .pth; with --probe also a
    starmamba pretraining run (STAR or ARM)"""
    probe: ProbeChoice = "none"
    """'none': the classifier's own top-1/top-5; 'knn': cosine k-NN on pooled frozen features (DINO's
    vote, k=--knn_k, weights exp(sim / --knn_temperature)); 'linear': a linear classifier on the frozen,
    standardised features fitted to convergence (L-BFGS). Features of the training split are the bank"""
    knn_k: int = 20
    knn_temperature: float = 0.07
    limit_train: int | None = None
    """with --probe: use only the first N training images as the probe's training set"""
    data_path: DataPath = "fashion_mnist"
    batch_size: int = 128
    num_workers: int = field(default_factory=available_workers)
    """data-loading processes: 4, or the CPU cores this process may use if fewer"""
    device: Device = "auto"
    precision: Precision | None = None
    """autocast precision: 'fp32', 'bf16' or 'fp16'; None: bf16 on CUDA, fp32 on a CPU"""
    ema: bool = False
    """evaluate the EMA weights of a starmamba checkpoint"""
    crop_pct: float | None = None
    """centre-crop fraction; None: the finetuning run's own (its config.json), else 0.875"""
    eval_resize: EvalResize | None = None
    """'square' or 'shorter' (see finetune --help); None: the finetuning run's own, else 'square'"""
    limit_val: int | None = None
    max_unreadable: float = MAX_UNREADABLE
    """fraction of the validation images that may be unreadable (skipped, counted) before evaluation stops"""

    def __post_init__(self) -> None:
        check_finite(self)
        check_fraction("max_unreadable", self.max_unreadable)
        if self.crop_pct is not None:
            check_fraction("crop_pct", self.crop_pct)
        check_positive("batch_size", self.batch_size)
        check_positive("num_workers", self.num_workers, allow_zero=True)
        check_choice("device", self.device, Device)
        if self.precision is not None:
            check_choice("precision", self.precision, Precision)
        check_choice("probe", self.probe, ProbeChoice)
        check_positive("knn_k", self.knn_k)
        check_positive("knn_temperature", self.knn_temperature)
        if self.eval_resize is not None:
            check_choice("eval_resize", self.eval_resize, EvalResize)


def to_dict(config) -> dict:
    """A JSON-ready dict of a config (nested dataclasses become dicts)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _typed(config_type: type, values: dict, where: str) -> dict:
    """``values`` (JSON lists as tuples) after checking that each is an option of ``config_type`` of its type."""
    hints = typing.get_type_hints(config_type)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        names = ", ".join(where + key for key in unknown)
        raise ValueError(f"unknown option(s) for {config_type.__name__}: {names}")
    typed = {}
    for key, value in values.items():
        value = tuple(value) if isinstance(value, list) else value
        if key != "arch":
            try:
                check_type(value, hints[key])
            except TypeCheckError:
                hint = hints[key]
                expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
                raise ValueError(f"{where}{key}={value!r} is not of type {expected}") from None
        typed[key] = value
    return typed


def from_dict(config_type: type, values: dict):
    """Rebuild a config from :func:`to_dict`'s output; an unknown key or a value of the wrong type is an error."""
    kwargs = _typed(config_type, values, "")
    if "arch" in kwargs:
        arch_type = StarConfig if config_type is PretrainConfig else ClassifierConfig
        if not isinstance(kwargs["arch"], dict):
            raise ValueError(f"arch={kwargs['arch']!r} is not a JSON object of {arch_type.__name__} options")
        kwargs["arch"] = arch_type(**_typed(arch_type, kwargs["arch"], "arch."))
    return config_type(**kwargs)


def load_config_file(path: str | Path, config_type: type, base):
    """``base`` with the options of a JSON config file applied (e.g. a run's saved config.json).

    ``overwrite`` in the file is ignored: replacing a run is asked for on the command line each time,
    so that rerunning a saved config.json never replaces its run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} holds a JSON {type(values).__name__}, not an object of options")
    values.pop("overwrite", None)
    merged = to_dict(base)
    if isinstance(values.get("arch"), dict):
        arch_type = StarConfig if config_type is PretrainConfig else ClassifierConfig
        values["arch"] = {**merged["arch"], **arch_type.saved_options(values["arch"])}
    merged.update(values)
    try:
        return from_dict(config_type, merged)
    except (ValueError, TypeError) as err:
        raise ValueError(f"config file {path}: {err}") from None
