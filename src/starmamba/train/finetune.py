"""The finetuning job: a 4-scan MambaMLP classifier, from scratch or from a pretrained encoder."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from starmamba.data import Augmented, EvalTransform, FinetuneTransform, MixupCutmix, build_dataset
from starmamba.data.mixup import soft_target_cross_entropy
from starmamba.models import MambaMLPClassifier, build_model
from starmamba.models.convert import classifier_state_from_pretrained
from starmamba.train.config import FinetuneConfig
from starmamba.train.distributed import joined
from starmamba.train.ema import ModelEma
from starmamba.train.evaluate import eval_loader, evaluate
from starmamba.train.loading import load_pretrained_state
from starmamba.train.loop import fit
from starmamba.train.metrics import MetricsLog
from starmamba.train.pretrain import write_config


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> MambaMLPClassifier:
    """The classifier of ``cfg`` with a head for ``num_classes``, its encoder from ``cfg.finetune`` if given."""
    model = build_model(dataclasses.replace(cfg.arch, num_classes=num_classes))
    if cfg.finetune:
        state = classifier_state_from_pretrained(load_pretrained_state(cfg.finetune), model)
        model.load_state_dict(state)
    return model


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Finetune and evaluate every ``eval_every`` epochs; returns the last and best top-1 (and EMA)."""
    with joined(cfg.device) as processes:
        run_dir = Path(cfg.output_dir)
        train_data = build_dataset(cfg.data_path, "train", limit=cfg.limit_train)
        val_data = build_dataset(cfg.data_path, "val", limit=cfg.limit_val)
        info = train_data.info
        cfg = dataclasses.replace(cfg, arch=dataclasses.replace(cfg.arch, num_classes=info.num_classes))
        if processes.is_main:
            write_config(run_dir, cfg)
        torch.manual_seed(cfg.seed + processes.rank)
        model = build_classifier(cfg, info.num_classes)
        if processes.is_main:
            source = f"encoder from {cfg.finetune}" if cfg.finetune else "from scratch"
            print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {source}")
        train_transform = FinetuneTransform(
            cfg.arch.img_size,
            info.mean,
            info.std,
            scale=(cfg.min_crop_scale, 1.0),
            rand_augment=cfg.aa,
            reprob=cfg.reprob,
        )
        val_transform = EvalTransform(cfg.arch.img_size, info.mean, info.std, crop_pct=cfg.crop_pct)
        val_loader = eval_loader(Augmented(val_data, val_transform), cfg.batch_size, cfg.num_workers, processes)
        mixup = (
            MixupCutmix(info.num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.smoothing)
            if cfg.mixup > 0 or cfg.cutmix > 0
            else None
        )

        def loss_fn(trained: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator):
            if mixup is not None:
                images, targets = mixup(images, labels, generator)
                return soft_target_cross_entropy(trained(images), targets), {}
            return F.cross_entropy(trained(images), labels, label_smoothing=cfg.smoothing), {}

        summary: dict[str, float] = {}

        def end_of_epoch(epoch: int, trained: nn.Module, ema: ModelEma | None) -> dict[str, float]:
            if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
                return {}
            result = evaluate(model, val_loader, processes.device)
            if ema is not None:
                ema_result = evaluate(ema.module, val_loader, processes.device)
                result |= {f"ema_{k}": v for k, v in ema_result.items()}
            for key in ("acc1", "ema_acc1"):
                if key in result:
                    summary[key] = result[key]
                    summary[f"best_{key}"] = max(summary.get(f"best_{key}", 0.0), result[key])
            if processes.is_main:
                line = f"epoch {epoch + 1}: top-1 {result['acc1']:.2f}%"
                print(line + (f", EMA top-1 {result['ema_acc1']:.2f}%" if "ema_acc1" in result else ""))
            return result

        metrics = MetricsLog(run_dir, enabled=processes.is_main, tensorboard=cfg.tensorboard)
        started = time.perf_counter()
        try:
            fit(
                cfg, model=model, model_name=cfg.model, model_config=cfg.arch.to_dict(),
                train_set=Augmented(train_data, train_transform, seed=cfg.seed), loss_fn=loss_fn,
                end_of_epoch=end_of_epoch, processes=processes, metrics=metrics,
                layer_decay=cfg.layer_decay, ema_decay=cfg.ema_decay,
            )  # fmt: skip
        finally:
            metrics.close()
        return summary | {"seconds": time.perf_counter() - started, "output_dir": str(run_dir)}
