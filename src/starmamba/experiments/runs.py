"""Running the small-scale recipes: cached pretrain, finetune and k-NN probe runs, and several at once."""

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

import torch

from starmamba.experiments.recipes import PROBE_IMAGES, Scale, finetune_config, pretrain_config
from starmamba.files import write_json
from starmamba.models import StarConfig, StarPretrainer
from starmamba.models.loading import load_probe_model
from starmamba.train.config import to_dict
from starmamba.train.finetune import run_finetune
from starmamba.train.pretrain import run_pretrain
from starmamba.train.probe import probe_model


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
    return cached_run(root, pretrain_config(scale, root, seed, **star_options), run_pretrain) | {"seed": seed}


def finetune(
    scale: Scale, root: Path, seed: int, pretrained: dict | None, classifier_options: dict | None = None,
    overrides: dict | None = None,
) -> dict:  # fmt: skip
    """A cached small-scale finetuning run, from a :func:`pretrain` result or from scratch; ``overrides``
    replace FinetuneConfig options (e.g. :func:`low_label_options`)."""
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
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["STARMAMBA_JOBS"])))
