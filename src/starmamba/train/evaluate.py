"""Classification metrics (top-1, top-5, loss), computed across processes, and the evaluate job."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from starmamba.data import Augmented, EvalTransform, build_dataset
from starmamba.models.loading import load_classifier
from starmamba.train.config import EvaluateConfig, check_rgb
from starmamba.train.distributed import Processes, ShardSampler, all_reduce_sum, joined
from starmamba.train.eval_setup import eval_options
from starmamba.train.precision import Precision, autocast


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, processes: Processes) -> DataLoader:
    """Each process a shard of ``dataset``, in order, every image once."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), processes), num_workers=num_workers,
        pin_memory=processes.device.type == "cuda",
    )  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, precision: Precision | None = None
) -> dict[str, float]:
    """{'acc1', 'acc5' (percent), 'val_loss'} of ``model`` over every process's shard, its forward pass
    autocast to ``precision`` (None: bf16 on CUDA, fp32 on a CPU)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, precision):
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


def run_evaluate(cfg: EvaluateConfig) -> dict[str, float]:
    """Load a classifier checkpoint (ours or ARM's) and print its top-1 / top-5 on the validation split
    (``--probe`` is :func:`starmamba.train.probe.run_probe`'s)."""
    if cfg.probe != "none":
        raise ValueError(f"probe={cfg.probe!r}: run_evaluate measures the classifier itself; probes are run_probe's")
    with joined(cfg.device) as processes:
        model, description = load_classifier(cfg.checkpoint, ema=cfg.ema)
        check_rgb(model.cfg)
        dataset = build_dataset(cfg.data_path, "val", limit=cfg.limit_val, max_unreadable=cfg.max_unreadable)
        if dataset.info.num_classes != model.cfg.num_classes:
            raise ValueError(
                f"{cfg.checkpoint} classifies {model.cfg.num_classes} classes but {cfg.data_path} has "
                f"{dataset.info.num_classes}"
            )
        transform = EvalTransform(model.cfg.img_size, dataset.info.mean, dataset.info.std, **eval_options(cfg))
        loader = eval_loader(Augmented(dataset, transform), cfg.batch_size, cfg.num_workers, processes)
        result = evaluate(model.to(processes.device), loader, processes.device, cfg.precision)
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
