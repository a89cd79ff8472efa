"""The pretraining job: STAR (or ARM, one option away) on an image data set."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from starmamba.data import Augmented, EvalTransform, PretrainTransform, build_dataset
from starmamba.data.sources import single_split
from starmamba.models import StarPretrainer, build_model
from starmamba.train.config import PretrainConfig
from starmamba.train.distributed import Processes, all_reduce_sum
from starmamba.train.engine import TrainState
from starmamba.train.job import run_job
from starmamba.train.plots import save_reconstructions
from starmamba.train.precision import autocast


def validation_batches(cfg: PretrainConfig, processes: Processes) -> DataLoader:
    """The validation images ``limit_val`` asks for, in whole sequences of ``batch_size`` images.

    Each process takes every ``world_size``-th batch; images that do not fill a last sequence are
    left out. Items are (images (B, 3, S, S), labels (B,)).
    """
    dataset = build_dataset(cfg.data_path, "val", limit=cfg.limit_val, max_unreadable=cfg.max_unreadable, labels=False)
    info = dataset.info
    view = Augmented(dataset, EvalTransform(cfg.arch.img_size, info.mean, info.std, crop_pct=1.0))
    per_sequence = cfg.arch.images_per_sequence
    usable = len(view) - len(view) % per_sequence
    if usable == 0:
        raise ValueError(f"the validation split has fewer than images_per_sequence={per_sequence} images")
    # batch_size is a multiple of images_per_sequence (PretrainConfig checks it), so every batch is whole sequences.
    batches = [list(range(start, min(start + cfg.batch_size, usable))) for start in range(0, usable, cfg.batch_size)]
    return DataLoader(view, batch_sampler=batches[processes.rank :: processes.world_size], num_workers=cfg.num_workers)


def denormalize(images: Tensor, mean: tuple, std: tuple) -> Tensor:
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


class PretrainTask:
    """Norm-pixel prediction of the next cluster; after each epoch, the loss over the validation images
    ``limit_val`` asks for and (every ``recon_every`` epochs) reconstructions of two sequences of them.

    Data of one split (a folder of unlabelled images, a pattern of shards) has no validation images:
    no validation loss then, and the reconstructions are of the first training images.
    """

    def load(self, cfg: PretrainConfig, processes: Processes) -> tuple[PretrainConfig, Dataset]:
        self.cfg, self.processes = cfg, processes
        dataset = build_dataset(
            cfg.data_path, "train", limit=cfg.limit_train, max_unreadable=cfg.max_unreadable, labels=False
        )
        info = dataset.info
        transform = PretrainTransform(cfg.arch.img_size, info.mean, info.std, scale=(cfg.min_crop_scale, 1.0))
        per_sequence = cfg.arch.images_per_sequence
        if single_split(cfg.data_path):
            self.val_batches, self.val_set = None, None
            view = Augmented(dataset, EvalTransform(cfg.arch.img_size, info.mean, info.std, crop_pct=1.0))
            shown = min(2 * per_sequence, len(view) - len(view) % per_sequence)
            message = f"no validation loss: {cfg.data_path} is one split; reconstructions of training images"
        else:
            self.val_batches = validation_batches(cfg, processes)
            view = self.val_set = self.val_batches.dataset
            used = len(view) - len(view) % per_sequence
            shown = min(2 * per_sequence, used)  # two sequences for the reconstructions
            left = f", {len(view) - used} left out (not a whole sequence)" if used < len(view) else ""
            message = f"validation loss on {used} images{left}"
        self.preview = torch.stack([view[i][0] for i in range(shown)]).to(processes.device)
        self.mean, self.std = info.mean, info.std
        if processes.is_main:
            print(message)
        return cfg, Augmented(dataset, transform, seed=cfg.seed)

    def build_model(self, cfg: PretrainConfig) -> tuple[StarPretrainer, str]:
        model: StarPretrainer = build_model(cfg.arch)
        layout = model.layout
        return model, (
            f"sequences of {layout.images_per_sequence} image(s), {layout.num_tokens} tokens ({layout.describe()})"
        )

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator):
        output = model(images)
        return output.loss, output.groups

    def evaluate(self, state: TrainState, epoch: int) -> dict[str, float]:
        """The loss and each target group's loss and floor (``val_loss``, ``val_loss_<group>``,
        ``val_floor_<group>``) over every validation image asked for, and (every ``recon_every``
        epochs) reconstructions."""
        model: StarPretrainer = state.module
        model.eval()
        device = self.processes.device
        keys = [f"{kind}_{group}" for group in model.target_groups for kind in ("loss", "floor")]
        totals = torch.zeros(2 + len(keys), dtype=torch.float64, device=device)  # images, loss, then keys
        with torch.no_grad(), autocast(device, self.cfg.precision):
            for images, _ in () if self.val_batches is None else self.val_batches:
                output = model(images.to(device, non_blocking=True))  # means over images of equal token count
                totals[0] += len(images)
                totals[1:] += torch.stack([output.loss, *(output.groups[k] for k in keys)]).double() * len(images)
        totals = all_reduce_sum(totals).cpu()
        if self.processes.is_main and ((epoch + 1) % self.cfg.recon_every == 0 or epoch + 1 == self.cfg.epochs):
            with torch.no_grad(), autocast(device, self.cfg.precision):
                recon = model.reconstruct(self.preview, model(self.preview))
            save_reconstructions(
                denormalize(self.preview, self.mean, self.std), denormalize(recon, self.mean, self.std),
                Path(self.cfg.output_dir) / "reconstructions.png", title=f"epoch {epoch + 1}: next-cluster predictions",
            )  # fmt: skip
        if self.val_batches is None:
            return {}
        images = totals[0].item()
        groups = {f"val_{key}": totals[2 + i].item() / images for i, key in enumerate(keys)}
        return {"val_loss": totals[1].item() / images, **groups, "val_images": int(images)}

    def summary(self) -> dict:
        return {}


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain; writes config, metrics, checkpoints, curves and reconstructions to ``cfg.output_dir``."""
    return run_job(cfg, PretrainTask())
