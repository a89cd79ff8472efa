"""Frozen-feature probes: cosine k-NN (DINO's weighted vote) and a linear classifier on pooled features.

What is pooled is the model's ``pooled_features``: the mean of one image's layer-normalised patch
tokens after the last block, for a pretrained STAR/ARM encoder read as in pretraining
(:meth:`StarPretrainer.pooled_features`). It is also the classifier's default readout (ARM's
``--global_pool``), so probe and finetune read the same thing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from starmamba.data import Augmented, EvalTransform, build_dataset
from starmamba.models.loading import load_probe_model
from starmamba.train.config import EvaluateConfig, check_rgb
from starmamba.train.distributed import resolve_device
from starmamba.train.eval_setup import eval_options
from starmamba.train.precision import Precision, autocast

Probe = Literal["knn", "linear"]
KNN_K = 20
KNN_TEMPERATURE = 0.07


@torch.no_grad()
def pooled_features(model: nn.Module, images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, dim) features of a classifier or of a STAR/ARM pretrainer's encoder."""
    if not hasattr(model, "pooled_features"):
        raise TypeError(f"cannot probe a {type(model).__name__}: pass a MambaMLPClassifier or a StarPretrainer")
    return model.pooled_features(images)


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, precision: Precision | None = None
) -> tuple[Tensor, Tensor]:
    """Pooled features (N, dim) float32 and labels (N,) of every image of ``loader``, on ``device`` (where the
    probes then run), the forward pass autocast to ``precision`` (None: bf16 on CUDA, fp32 on a CPU)."""
    model.eval()
    features, labels = [], []
    for images, targets in loader:
        with autocast(device, precision):
            features.append(pooled_features(model, images.to(device)).float())
        labels.append(targets)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), torch.cat(labels).to(device)


def knn_predict(
    train: Tensor, train_labels: Tensor, test: Tensor, num_classes: int, k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE, chunk: int = 1024,
) -> Tensor:  # fmt: skip
    """Class predictions (M,) for ``test`` (M, D) by a cosine k-NN vote over ``train`` (N, D).

    As DINO: each of the ``k`` nearest neighbours votes for its class with weight exp(sim / temperature).
    Similarities in float32 on the features' device; the votes, weights up to e^(1 / temperature), summed in float64.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    k = min(k, len(train))
    train = F.normalize(train.float(), dim=1)
    predictions = []
    for start in range(0, len(test), chunk):
        sims = F.normalize(test[start : start + chunk].float(), dim=1) @ train.T
        top, index = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, dtype=torch.float64, device=sims.device)
        votes.scatter_add_(1, train_labels.to(index.device)[index], (top.double() / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def standardise(train: Tensor, *others: Tensor, eps: float = 1e-6) -> list[Tensor]:
    """``train`` and ``others`` shifted and scaled by ``train``'s per-feature mean and (population) std."""
    mean, std = train.mean(dim=0), train.std(dim=0, correction=0) + eps
    return [(x - mean) / std for x in (train, *others)]


def fit_linear(
    features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-4, max_iter: int = 1000,
    tolerance: float = 1e-7,
) -> nn.Linear:  # fmt: skip
    """Multinomial logistic regression on ``features`` (N, D), fitted to convergence by full-batch L-BFGS.

    Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not decayed) in float64 (its line
    search needs it to converge to ``tolerance``) on the features' device; stops when the gradient's
    largest entry falls below ``tolerance`` or after ``max_iter`` iterations.
    """
    x, y = features.double(), labels.long().to(features.device)
    linear = nn.Linear(x.shape[1], num_classes, dtype=torch.float64, device=features.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1, max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=0,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay / 2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def top1(predictions: Tensor, labels: Tensor) -> float:
    """Percent of ``predictions`` equal to ``labels``."""
    return 100.0 * predictions.eq(labels.to(predictions.device)).double().mean().item()


def probe_top1(
    probe: Probe, train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, num_classes: int,
    k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
) -> float:  # fmt: skip
    """Top-1 (%) on ``test`` of a k-NN or linear probe built on the frozen ``train`` features."""
    if probe == "knn":
        return top1(knn_predict(train, train_labels, test, num_classes, k, temperature), test_labels)
    if probe == "linear":
        train, test = standardise(train, test)
        linear = fit_linear(train, train_labels, num_classes)
        with torch.no_grad():
            return top1(linear(test.double()).argmax(dim=1), test_labels.to(test.device))
    raise ValueError(f"probe={probe!r} is not 'knn' or 'linear'")


def probe_model(
    model: nn.Module, data_path: str, probe: Probe, device: torch.device, *, crop_pct: float = 1.0,
    resize: str = "square", batch_size: int = 256, num_workers: int = 1, limit_train: int | None = None,
    limit_val: int | None = None, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
    precision: Precision | None = None,
) -> dict:  # fmt: skip
    """Top-1 (%) of a ``probe`` on ``model``'s frozen features: the bank (or the linear probe's training set)
    is the training split, the score the validation split, both seen through the evaluation transform.

    Returns {"probe", "acc1", "train_images", "val_images"}. Runs in this one process.
    """
    splits = {}
    for split, limit in (("train", limit_train), ("val", limit_val)):
        dataset = build_dataset(data_path, split, limit=limit)
        info = dataset.info
        transform = EvalTransform(model.cfg.img_size, info.mean, info.std, crop_pct=crop_pct, resize=resize)
        loader = DataLoader(Augmented(dataset, transform), batch_size=batch_size, num_workers=num_workers)
        splits[split] = extract_features(model.to(device), loader, device, precision)
    (train, train_labels), (val, val_labels) = splits["train"], splits["val"]
    acc1 = probe_top1(probe, train, train_labels, val, val_labels, info.num_classes, k, temperature)
    return {"probe": probe, "acc1": acc1, "train_images": len(train), "val_images": len(val)}


def run_probe(cfg: EvaluateConfig) -> dict:
    """``starmamba evaluate --probe``: load a classifier or pretraining checkpoint, print the probe's top-1."""
    model, description = load_probe_model(cfg.checkpoint, ema=cfg.ema)
    check_rgb(model.cfg)
    options = eval_options(cfg)
    result = probe_model(
        model, cfg.data_path, cfg.probe, resolve_device(cfg.device),
        crop_pct=options["crop_pct"], resize=options["resize"], batch_size=cfg.batch_size,
        num_workers=cfg.num_workers, limit_train=cfg.limit_train, limit_val=cfg.limit_val, k=cfg.knn_k,
        temperature=cfg.knn_temperature, precision=cfg.precision,
    )  # fmt: skip
    what = f"k-NN (k={cfg.knn_k}, T={cfg.knn_temperature})" if cfg.probe == "knn" else "linear"
    print(
        f"{description} on {cfg.data_path}: {what} probe top-1 {result['acc1']:.2f}% "
        f"({result['train_images']} training, {result['val_images']} validation images)"
    )
    return result
