"""The finetuning job: a 4-scan MambaMLP classifier, from scratch or from a pretrained encoder."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from starmamba.data import Augmented, EvalTransform, FinetuneTransform, MixupCutmix, build_dataset
from starmamba.data.mixup import soft_target_cross_entropy
from starmamba.data.sources import single_split
from starmamba.data.subsets import labels_per_class_subset
from starmamba.models import MambaMLPClassifier, build_model
from starmamba.models.convert import classifier_state_from_pretrained
from starmamba.models.loading import load_pretrained_state
from starmamba.train.config import FinetuneConfig
from starmamba.train.distributed import Processes
from starmamba.train.engine import TrainState
from starmamba.train.evaluate import eval_loader, evaluate
from starmamba.train.job import run_job


def build_classifier(cfg: FinetuneConfig) -> MambaMLPClassifier:
    """The classifier of ``cfg``, its encoder from ``cfg.finetune`` if given."""
    model = build_model(cfg.arch)
    if cfg.finetune:
        state = classifier_state_from_pretrained(load_pretrained_state(cfg.finetune), model)
        model.load_state_dict(state)
    return model


class FinetuneTask:
    """(Soft-target) cross-entropy; top-1/top-5 of the model and its EMA every ``eval_every`` epochs.

    The head classifies the data's classes. With ``num_classes_given`` (the user set ``num_classes``)
    a number that disagrees with the data is refused; otherwise it is taken from the data, with a note.
    """

    def __init__(self, num_classes_given: bool = False) -> None:
        self.num_classes_given = num_classes_given

    def load(self, cfg: FinetuneConfig, processes: Processes) -> tuple[FinetuneConfig, Dataset]:
        if single_split(cfg.data_path):
            raise ValueError(
                f"{cfg.data_path} is one set of images: finetuning trains on a train split and evaluates on a val "
                "split (root/{train,val}/<class>/<image>, or shards root/{train,val}/*.tar or root/{train,val}-*.tar)"
            )
        train_data = build_dataset(cfg.data_path, "train", limit=cfg.limit_train, max_unreadable=cfg.max_unreadable)
        if cfg.labels_per_class is not None:
            train_data = labels_per_class_subset(train_data, cfg.labels_per_class, cfg.seed)
        val_data = build_dataset(cfg.data_path, "val", limit=cfg.limit_val, max_unreadable=cfg.max_unreadable)
        info = train_data.info
        if info.num_classes < 2:
            raise ValueError(
                f"{cfg.data_path} has {info.num_classes} class ({', '.join(info.classes)}); a classifier needs at "
                "least 2 (pretraining takes a data set of any number of classes)"
            )
        if cfg.arch.num_classes != info.num_classes:
            if self.num_classes_given:
                raise ValueError(
                    f"--num_classes {cfg.arch.num_classes} disagrees with the {info.num_classes} classes of "
                    f"{cfg.data_path}; leave it out (the data's count is used) or give --num_classes {info.num_classes}"
                )
            if processes.is_main:
                print(f"num_classes {info.num_classes} (the classes of {cfg.data_path}), not {cfg.arch.num_classes}")
            cfg = dataclasses.replace(cfg, arch=dataclasses.replace(cfg.arch, num_classes=info.num_classes))
        if cfg.label_names and len(cfg.label_names) != info.num_classes:
            raise ValueError(
                f"--label_names names {len(cfg.label_names)} classes, {cfg.data_path} has {info.num_classes}; "
                "leave it out to keep the data set's names"
            )
        cfg = dataclasses.replace(cfg, label_names=tuple(cfg.label_names or info.classes))
        self.cfg, self.processes, self.results = cfg, processes, {}
        train_transform = FinetuneTransform(
            cfg.arch.img_size, info.mean, info.std, scale=(cfg.min_crop_scale, 1.0), rand_augment=cfg.aa,
            reprob=cfg.reprob,
        )  # fmt: skip
        val_transform = EvalTransform(
            cfg.arch.img_size, info.mean, info.std, crop_pct=cfg.crop_pct, resize=cfg.eval_resize
        )
        self.val_set = Augmented(val_data, val_transform)
        self.val_loader = eval_loader(self.val_set, cfg.batch_size, cfg.num_workers, processes)
        self.mixup = (
            MixupCutmix(info.num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.smoothing)
            if cfg.mixup > 0 or cfg.cutmix > 0
            else None
        )
        return cfg, Augmented(train_data, train_transform, seed=cfg.seed)

    def build_model(self, cfg: FinetuneConfig) -> tuple[MambaMLPClassifier, str]:
        return build_classifier(cfg), f"encoder from {cfg.finetune}" if cfg.finetune else "from scratch"

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator):
        if self.mixup is not None:
            images, targets = self.mixup(images, labels, generator)
            return soft_target_cross_entropy(model(images), targets), {}
        return F.cross_entropy(model(images), labels, label_smoothing=self.cfg.smoothing), {}

    def evaluate(self, state: TrainState, epoch: int) -> dict[str, float]:
        if (epoch + 1) % self.cfg.eval_every and epoch + 1 != self.cfg.epochs:
            return {}
        device = self.processes.device
        precision = self.cfg.precision
        result = evaluate(state.module, self.val_loader, device, precision)
        if state.ema is not None:
            ema = evaluate(state.ema.module, self.val_loader, device, precision)
            result |= {f"ema_{k}": v for k, v in ema.items()}
        for key in ("acc1", "ema_acc1"):
            if key in result:
                self.results[key] = result[key]
                self.results[f"best_{key}"] = max(self.results.get(f"best_{key}", 0.0), result[key])
        if self.processes.is_main:
            line = f"epoch {epoch + 1}: top-1 {result['acc1']:.2f}%"
            print(line + (f", EMA top-1 {result['ema_acc1']:.2f}%" if "ema_acc1" in result else ""))
        return result

    def summary(self) -> dict:
        """The last and best top-1 (and EMA top-1)."""
        return dict(self.results)


def run_finetune(cfg: FinetuneConfig, num_classes_given: bool = False) -> dict:
    """Finetune and evaluate every ``eval_every`` epochs; returns the last and best top-1 (and EMA).

    ``num_classes_given``: ``cfg.arch.num_classes`` was set by the user, so it must match the data.
    """
    return run_job(cfg, FinetuneTask(num_classes_given))
