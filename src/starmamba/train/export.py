"""``starmamba export``: a training run's final weights as a Hub folder (``from_pretrained``) with a model card,
and a classifier as ONNX."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import tyro
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from starmamba.models.loading import model_from_weights
from starmamba.models.registry import split_name
from starmamba.models.weights import load_weights
from starmamba.ops import BACKEND_ENV
from starmamba.train.metrics import read_metrics
from starmamba.train.predict import run_data_config

PAPER = "Separators in Enhancing Autoregressive Pretraining for Vision Mamba"
PAPER_URL = "https://arxiv.org/abs/2603.03806"
ONNX_OPSET = 17
ONNX_ATOL = 1e-3
"""The largest difference of logits between onnxruntime and PyTorch that an export accepts."""


@dataclass
class ExportConfig:
    """A pretraining or finetuning run's final weights as a Hugging Face Hub folder with a model card."""

    run_dir: Annotated[str, tyro.conf.Positional]
    """the run's output folder (holds config.json and model.safetensors)"""
    out_dir: Annotated[str, tyro.conf.Positional]
    """the Hub folder to write; it must not exist or be empty"""
    ema: bool = False
    """export the run's EMA weights (ema.safetensors) instead of its model's"""
    onnx: bool = False
    """also write model.onnx (a finetuning run's classifier: images -> logits, any batch size), checked with
    onnxruntime against PyTorch's logits (needs the onnx extra: pip install 'starmamba[onnx]')"""


@dataclass(frozen=True)
class Run:
    """What a run folder says about its weights: which file, the model's preset name and config, the job's config."""

    path: Path
    weights: Path
    name: str
    model_config: dict[str, Any]
    job_config: dict[str, Any]

    @property
    def job(self) -> str:
        return "pretraining" if split_name(self.name)[0] == "star" else "finetuning"


def read_run(run_dir: str | Path, ema: bool) -> Run:
    """The run in ``run_dir`` and the weights to export; a clear error for a folder that is not a finished run."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder (give the output_dir of a pretrain or finetune run)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{run_dir} is not a starmamba run: it has no config.json")
    try:
        job_config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(job_config, dict) or "arch" not in job_config:
        raise ValueError(f"{config_file} is not a pretraining or finetuning run's config (it has no 'arch')")
    weights = path / ("ema.safetensors" if ema else "model.safetensors")
    if not weights.is_file():
        if ema and job_config.get("ema_decay") is None:
            raise ValueError(f"--ema: the run in {run_dir} kept no EMA (its ema_decay is None)")
        raise FileNotFoundError(
            f"{weights} is missing: the run has not finished (resume it to the end) or the file was removed"
        )
    _, metadata = load_weights(weights)  # a truncated file is a ValueError here
    if not {"model", "config"} <= metadata.keys():
        raise ValueError(f"{weights} does not name its model in its metadata: not written by a starmamba run")
    return Run(path, weights, metadata["model"], metadata["config"], job_config)


def run_model(run: Run) -> nn.Module:
    """The run's model with the chosen weights, its pretrained config set from the run (data statistics,
    evaluation crop, class names)."""
    model, _ = model_from_weights(run.weights)
    model.pretrained_cfg = {"architecture": run.name} | run_data_config(run.job_config, run.job == "finetuning")
    return model.eval()


def results(run: Run) -> dict[str, float]:
    """The run's measured results from ``metrics.jsonl``: the last evaluation's values (top-1, top-5, EMA,
    probe, validation loss) with the best top-1s, and the final training loss."""
    file = run.path / "metrics.jsonl"
    records = read_metrics(file) if file.is_file() else []
    found: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(("acc", "ema_acc", "probe", "val_")) or (key == "loss" and "lr" in record):
                found[key] = value
            if key in ("acc1", "ema_acc1"):
                found[f"best_{key}"] = max(found.get(f"best_{key}", value), value)
    return found


def model_card(run: Run, model: nn.Module, out_dir: str, ema: bool) -> ModelCard:
    """The folder's README.md: the model, the paper, the run's config, its results and how to load it."""
    cfg = model.pretrained_cfg
    classifier = run.job == "finetuning"
    data = ModelCardData(
        library_name="starmamba",
        license="apache-2.0",
        tags=["vision-mamba", "starmamba", "arxiv:2603.03806", "image-classification" if classifier else "pretraining"],
        pipeline_tag="image-classification" if classifier else None,
    )
    count = sum(p.numel() for p in model.parameters())
    weights = "the EMA of its weights" if ema else "its final weights"
    what = (
        f"A MambaMLP image classifier ({model.cfg.num_classes} classes)"
        if classifier
        else "A STAR pretraining model (MambaMLP encoder with an autoregressive decoder); "
        "finetune it with `starmamba finetune --finetune FOLDER/model.safetensors`"
    )
    lines = [
        f"# {run.name} ({run.job} run `{run.path.name}`)",
        "",
        f"{what}: width {model.cfg.dim}, depth {model.cfg.depth}, {model.cfg.img_size} px images in "
        f"{model.cfg.patch_size} px patches, {count / 1e6:.2f}M parameters. These are {weights}, "
        f"exported from `{run.weights.name}` with `starmamba export`.",
        "",
        f"Paper: [{PAPER}]({PAPER_URL}) (STAR, arXiv:2603.03806). Trained on `{run.job_config.get('data_path')}`.",
        "",
        "## Results",
        "",
    ]
    measured = results(run)
    if measured:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value:.4g} |" for key, value in measured.items()]
        lines += [
            "",
            "Measured by the run itself (its `metrics.jsonl`: the last evaluation, the best top-1 (%), the last "
            f"training loss); the {'`ema_*`' if ema else 'plain (not `ema_*`)'} values are those of these weights.",
        ]
    else:
        lines += ["The run recorded no metrics."]
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        "import starmamba",
        f"from starmamba.models import {type(model).__name__}",
        "",
        f'model = starmamba.create_model("{run.name}", pretrained="{out_dir}")',
        f'model = {type(model).__name__}.from_pretrained("{out_dir}")  # the same',
        "```",
        "",
        f"Inputs: {cfg['input_size'][1]} px images normalised with mean {list(cfg['mean'])} and std "
        f"{list(cfg['std'])} (`model.pretrained_cfg`).",
        "",
        *(
            [f"Classify your images from the command line: `starmamba predict {out_dir} IMAGE_OR_FOLDER ...`.", ""]
            if classifier
            else []
        ),
        "## How it was trained",
        "",
        f"The run's `config.json`; `starmamba {'finetune' if classifier else 'pretrain'} --config` with this "
        "file reruns it:",
        "",
        "```json",
        json.dumps(run.job_config, indent=2, sort_keys=True),
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def onnx_modules() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or a ValueError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ValueError(f"--onnx needs onnx and onnxruntime ({error}): pip install 'starmamba[onnx]'") from None
    return onnx, onnxruntime


@contextlib.contextmanager
def scan_backend(name: str) -> Iterator[None]:
    """Run every selective scan inside with backend ``name`` (through $STARMAMBA_SCAN_BACKEND, read at each scan)."""
    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = before


def export_onnx(model: nn.Module, path: str | Path, atol: float = ONNX_ATOL) -> float:
    """Write a classifier to ``path`` as ONNX, ``images`` (batch, C, H, W) -> ``logits`` (batch, classes) with a
    dynamic batch, and check it: onnxruntime's logits of a batch of another size against PyTorch's. Returns
    their largest difference; over ``atol`` the file is removed and a ValueError raised."""
    onnx, onnxruntime = onnx_modules()
    path = Path(path)
    model = model.eval().cpu()
    channels, height, width = model.pretrained_cfg["input_size"]
    generator = torch.Generator().manual_seed(0)
    traced, checked = (torch.randn(n, channels, height, width, generator=generator) for n in (2, 3))
    # The reference scan is plain tensor ops, which the tracer records step by step: the numba kernel is
    # opaque to it, the chunked scan's in-place buffers break the TorchScript exporter, and torch's dynamo
    # exporter took 45 s where this one takes 4 for a two-block model. The tracer's warnings are about
    # shape checks that hold for every batch size.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad(), scan_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (traced,), str(path), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, **legacy,
        )  # fmt: skip
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = model(checked).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": checked.numpy()})
    difference = float(np.abs(logits - expected).max())
    if not difference <= atol:
        path.unlink()
        raise ValueError(f"the ONNX model's logits differ from PyTorch's by {difference:.3g} (> {atol:g}); not written")
    return difference


def export_run(run_dir: str | Path, out_dir: str | Path, ema: bool = False, onnx: bool = False) -> Path:
    """Write the run's (or its EMA's) weights to ``out_dir`` as a ``from_pretrained`` folder with a model card,
    and with ``onnx`` the classifier as ``model.onnx`` (see :func:`export_onnx`)."""
    run = read_run(run_dir, ema)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not an empty folder; choose another OUT_DIR")
    if onnx:
        if run.job != "finetuning":
            raise ValueError(f"--onnx exports classifiers; {run_dir} is a pretraining run (finetune it first)")
        onnx_modules()
    model = run_model(run)
    model.save_pretrained(out)
    model_card(run, model, str(out_dir), ema).save(out / "README.md")
    if onnx:
        export_onnx(model, out / "model.onnx")
    return out


def run_export(cfg: ExportConfig) -> Path:
    """The ``starmamba export`` command."""
    out = export_run(cfg.run_dir, cfg.out_dir, cfg.ema, cfg.onnx)
    name = json.loads((out / "config.json").read_text(encoding="utf-8"))["architecture"]
    print(f"wrote {out}: load it with starmamba.create_model({name!r}, pretrained={str(out)!r})")
    if cfg.onnx:
        print(f"and {out / 'model.onnx'}, checked with onnxruntime against PyTorch's logits")
    return out
