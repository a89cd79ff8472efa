"""``starmamba predict``: a classifier's top-k classes, by name and probability, for image files and folders.

The model is a finetuning run's folder or a Hub folder (``starmamba export``); its ``pretrained_cfg``
says how to prepare an image (input size, crop, mean/std, interpolation) and names the classes.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import tyro
from PIL import Image

from starmamba.checks import check_choice, check_positive
from starmamba.data import EvalTransform, build_dataset
from starmamba.data.datasets import _UNREADABLE, IMAGE_EXTENSIONS, to_rgb
from starmamba.models import MambaMLPClassifier
from starmamba.models.loading import load_classifier
from starmamba.train.config import Device
from starmamba.train.distributed import resolve_device

# timm's crop modes and how EvalTransform resizes for each.
CROP_MODES = {"center": "shorter", "squash": "square"}


@dataclass
class PredictConfig:
    """The top-k classes of every image, by name, with their probabilities."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """a finetuning run's output folder, or a Hub folder written by `starmamba export` or save_pretrained"""
    paths: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """image files, or folders searched (recursively) for images"""
    top_k: int = 5
    """classes shown per image (at most the model's)"""
    batch_size: int = 32
    json: bool = False
    """print one JSON object per image and line: {"path", "top_k": [{"label", "index", "probability"}]}"""
    ema: bool = False
    """with a run folder: its EMA weights (ema.safetensors)"""
    device: Device = "auto"

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("give the images to classify: MODEL PATH [PATH ...], image files or folders")
        check_positive("top_k", self.top_k)
        check_positive("batch_size", self.batch_size)
        check_choice("device", self.device, Device)


@dataclass(frozen=True)
class Prediction:
    """One image's top classes, most probable first."""

    path: Path
    indices: list[int]
    labels: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        top = zip(self.labels, self.indices, self.probabilities, strict=True)
        return {"path": str(self.path), "top_k": [{"label": n, "index": i, "probability": p} for n, i, p in top]}

    def line(self) -> str:
        top = zip(self.labels, self.probabilities, strict=True)
        return f"{self.path}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in top)


def run_data_config(job_config: dict[str, Any], classifier: bool) -> dict[str, Any]:
    """What a run's config says about the images its weights expect, in timm's pretrained-config keys:
    ``mean``/``std`` of its data set, the evaluation's ``crop_pct`` and ``crop_mode``, and for a classifier
    its ``label_names`` (the data set's classes for runs that kept none). The data set's statistics are left
    out (ImageNet's apply), with a warning, when it cannot be read here."""
    found: dict[str, Any] = {}
    names = tuple(job_config.get("label_names") or ())
    data_path = job_config.get("data_path", "")
    try:
        info = build_dataset(data_path, "val", limit=1, labels=False).info
        found |= {"mean": tuple(info.mean), "std": tuple(info.std)}
        names = names or tuple(info.classes)
    except (OSError, ValueError) as error:
        warnings.warn(
            f"the run's data set {data_path!r} cannot be read here ({error}); its weights are described with "
            "ImageNet's mean and std",
            stacklevel=2,
        )
    if "crop_pct" in job_config:
        found["crop_pct"] = job_config["crop_pct"]
    if classifier:
        # Runs written before eval_resize existed resized the shorter side (timm's "center").
        resize = job_config.get("eval_resize", "shorter")
        found["crop_mode"] = next(mode for mode, how in CROP_MODES.items() if how == resize)
        if names:
            found["label_names"] = names
    return found


def load_predictor(model: str | Path, ema: bool = False) -> MambaMLPClassifier:
    """The classifier of a finetuning run's folder or of a Hub folder, in eval mode, with its pretrained config."""
    path = Path(model).expanduser()
    if not path.is_dir():
        if ema:
            raise ValueError("--ema takes a finetuning run's folder (it holds ema.safetensors)")
        return MambaMLPClassifier.from_pretrained(model)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and "architecture" in config:
        if ema:
            raise ValueError(f"--ema takes a finetuning run's folder, and {model} is a Hub folder")
        return MambaMLPClassifier.from_pretrained(path)
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError(
            f"{model} is neither a finetuning run's folder nor a Hub folder: it has no config.json naming a model"
        )
    classifier, _ = load_classifier(path, ema=ema)
    classifier.pretrained_cfg = run_data_config(config, classifier=True)
    return classifier.eval()


def transform_of(pretrained_cfg: dict[str, Any]) -> EvalTransform:
    """The evaluation transform a pretrained config describes: input size, crop_pct and crop_mode, mean/std,
    interpolation."""
    mode = pretrained_cfg.get("crop_mode", "center")
    if mode not in CROP_MODES:
        raise ValueError(f"crop_mode={mode!r} in the model's pretrained_cfg is not one of {', '.join(CROP_MODES)}")
    _, height, width = pretrained_cfg["input_size"]
    if height != width:
        raise ValueError(f"input_size {pretrained_cfg['input_size']}: the models take square images")
    return EvalTransform(
        height,
        pretrained_cfg["mean"],
        pretrained_cfg["std"],
        crop_pct=pretrained_cfg.get("crop_pct", 1.0),
        resize=CROP_MODES[mode],
        interpolation=pretrained_cfg.get("interpolation", "bicubic"),
    )


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named and the images (by extension) under the folders named, each folder's sorted."""
    found = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{given} does not exist")
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(map(str, paths))}")
    return found


def predict(
    model: MambaMLPClassifier,
    files: Sequence[Path],
    top_k: int = 5,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> Iterator[Prediction]:
    """Each readable image's top ``top_k`` classes (at most the model's); unreadable ones are skipped with a
    line on stderr."""
    cfg = model.pretrained_cfg
    transform = transform_of(cfg)
    names = cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    k = min(top_k, model.num_classes)
    model = model.to(device).eval()
    for start in range(0, len(files), batch_size):
        images, kept = [], []
        for file in files[start : start + batch_size]:
            try:
                with Image.open(file) as img:
                    images.append(transform(to_rgb(img)))
                kept.append(file)
            except _UNREADABLE as error:
                print(f"skipping unreadable image {file}: {error}", file=sys.stderr)
        if not images:
            continue
        with torch.no_grad():
            probabilities = model(torch.stack(images).to(device)).float().softmax(dim=-1)
        values, indices = probabilities.topk(k, dim=-1)
        for file, p, i in zip(kept, values.tolist(), indices.tolist(), strict=True):
            yield Prediction(file, i, [names[j] for j in i], p)


def run_predict(cfg: PredictConfig) -> list[Prediction]:
    """The ``starmamba predict`` command: print each image's top classes as they come."""
    model = load_predictor(cfg.model, cfg.ema)
    files = image_files(cfg.paths)
    results = []
    for prediction in predict(model, files, cfg.top_k, cfg.batch_size, resolve_device(cfg.device)):
        print(json.dumps(prediction.to_dict()) if cfg.json else prediction.line(), flush=True)
        results.append(prediction)
    if not results:
        raise ValueError(f"none of the {len(files)} images could be read")
    return results
