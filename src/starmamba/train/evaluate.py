"""Classification metrics (top-1, top-5, loss), computed across processes, and the evaluate job."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from starmamba.data import Augmented, EvalTransform, build_dataset
from starmamba.train.config import EvaluateConfig, check_rgb
from starmamba.train.distributed import Processes, ShardSampler, all_reduce_sum, joined
from starmamba.train.loading import load_classifier


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, processes: Processes) -> DataLoader:
    """Each process a shard of ``dataset``, in order, every image once."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), processes), num_workers=num_workers,
        pin_memory=processes.device.type == "cuda",
    )  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """{'acc1', 'acc5' (percent), 'val_loss'} of ``model`` over every process's shard."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels[:, None])
        totals += torch.tensor(
            [hits[:, :1].sum().item(), hits.sum().item(), F.cross_entropy(logits, labels, reduction="sum").item(),
             labels.numel()], dtype=torch.float64,
        )  # fmt: skip
    correct1, correct5, loss, count = all_reduce_sum(totals).tolist()
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count, "val_loss": loss / count}


def run_eval_options(checkpoint: Path) -> dict:
    """How the finetuning run evaluated, read from the config.json beside its weights.

    ``{"crop_pct", "resize"}``; without a config.json (e.g. ARM's .pth): ARM's 0.875 and 'square'.
    Runs written before ``eval_resize`` existed resized the shorter side. A folder of ``starmamba export``
    records the run's crop_pct (in its ``pretrained_cfg``) but not its resize: finetuning's default, 'square'.
    """
    config = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
    if not config.is_file():
        return {"crop_pct": 0.875, "resize": "square"}
    saved = json.loads(config.read_text())
    if "pretrained_cfg" in saved:  # a folder of `starmamba export`: its crop, and finetuning's default resize
        return {"crop_pct": float(saved["pretrained_cfg"].get("crop_pct", 0.875)), "resize": "square"}
    return {"crop_pct": float(saved.get("crop_pct", 0.875)), "resize": saved.get("eval_resize", "shorter")}


def run_evaluate(cfg: EvaluateConfig) -> dict[str, float]:
    """Load a classifier checkpoint (ours or ARM's) and print its top-1 / top-5 on the validation split
    (with ``--probe``, the top-1 of a probe on its frozen features: :func:`starmamba.train.probe.run_probe`)."""
    if cfg.probe != "none":
        from starmamba.train.probe import run_probe

        return run_probe(cfg)
    with joined(cfg.device) as processes:
        model, description = load_classifier(cfg.checkpoint, ema=cfg.ema)
        check_rgb(model.cfg)
        dataset = build_dataset(cfg.data_path, "val", limit=cfg.limit_val, max_unreadable=cfg.max_unreadable)
        if dataset.info.num_classes != model.cfg.num_classes:
            raise ValueError(
                f"{cfg.checkpoint} classifies {model.cfg.num_classes} classes but {cfg.data_path} has "
                f"{dataset.info.num_classes}"
            )
        options = run_eval_options(Path(cfg.checkpoint))
        options |= {"crop_pct": cfg.crop_pct} if cfg.crop_pct is not None else {}
        options |= {"resize": cfg.eval_resize} if cfg.eval_resize is not None else {}
        transform = EvalTransform(model.cfg.img_size, dataset.info.mean, dataset.info.std, **options)
        loader = eval_loader(Augmented(dataset, transform), cfg.batch_size, cfg.num_workers, processes)
        result = evaluate(model.to(processes.device), loader, processes.device)
        skipped = int(all_reduce_sum(torch.tensor([getattr(dataset, "num_skipped", 0)], dtype=torch.float64)).item())
        if skipped:
            dataset.check_unreadable(skipped)
            result["skipped_images"] = skipped
        if processes.is_main:
            print(
                f"{description} on {cfg.data_path} ({len(dataset)} images"
                + (f", {skipped} unreadable and skipped" if skipped else "")
                + f"): top-1 {result['acc1']:.2f}%  top-5 {result['acc5']:.2f}%  loss {result['val_loss']:.4f}"
            )
        return result
