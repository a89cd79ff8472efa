"""The pretraining job: STAR (or ARM, one option away) on an image data set."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from starmamba.data import Augmented, EvalTransform, PretrainTransform, build_dataset
from starmamba.models import StarPretrainer, build_model
from starmamba.train.config import PretrainConfig
from starmamba.train.distributed import Processes
from starmamba.train.engine import TrainState, autocast
from starmamba.train.job import run_job
from starmamba.train.plots import save_reconstructions


def preview_batch(cfg: PretrainConfig, processes: Processes) -> tuple[Tensor, tuple, tuple]:
    """A fixed batch of validation images (whole sequences) for reconstructions and the val loss."""
    dataset = build_dataset(cfg.data_path, "val", limit=cfg.limit_val, max_unreadable=cfg.max_unreadable)
    info = dataset.info
    view = Augmented(dataset, EvalTransform(cfg.arch.img_size, info.mean, info.std, crop_pct=1.0))
    count = min(len(view), 4 * cfg.arch.images_per_sequence)
    count -= count % cfg.arch.images_per_sequence
    if count == 0:
        raise ValueError(
            f"the validation split has fewer than images_per_sequence={cfg.arch.images_per_sequence} images"
        )
    images = torch.stack([view[i][0] for i in range(count)]).to(processes.device)
    return images, info.mean, info.std


def denormalize(images: Tensor, mean: tuple, std: tuple) -> Tensor:
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


class PretrainTask:
    """Norm-pixel prediction of the next cluster; after each epoch, the loss on a fixed validation batch
    and (every ``recon_every`` epochs) its reconstructions."""

    def load(self, cfg: PretrainConfig, processes: Processes) -> tuple[PretrainConfig, Dataset]:
        self.cfg, self.processes = cfg, processes
        dataset = build_dataset(cfg.data_path, "train", limit=cfg.limit_train, max_unreadable=cfg.max_unreadable)
        info = dataset.info
        transform = PretrainTransform(cfg.arch.img_size, info.mean, info.std, scale=(cfg.min_crop_scale, 1.0))
        self.preview, self.mean, self.std = preview_batch(cfg, processes)
        return cfg, Augmented(dataset, transform, seed=cfg.seed)

    def build_model(self, cfg: PretrainConfig) -> tuple[StarPretrainer, str]:
        model: StarPretrainer = build_model(cfg.arch)
        layout = model.layout
        return model, (
            f"sequences of {layout.images_per_sequence} image(s), {layout.num_tokens} tokens ({layout.describe()})"
        )

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator):
        return model(images).loss, {}

    def evaluate(self, state: TrainState, epoch: int) -> dict[str, float]:
        model: StarPretrainer = state.module
        model.eval()
        with torch.no_grad(), autocast(self.processes.device):
            out = model(self.preview)
        if self.processes.is_main and ((epoch + 1) % self.cfg.recon_every == 0 or epoch + 1 == self.cfg.epochs):
            shown = self.preview[: 2 * model.layout.images_per_sequence]
            recon = model.reconstruct(self.preview, out)[: len(shown)]
            save_reconstructions(
                denormalize(shown, self.mean, self.std), denormalize(recon, self.mean, self.std),
                Path(self.cfg.output_dir) / "reconstructions.png", title=f"epoch {epoch + 1}: next-cluster predictions",
            )  # fmt: skip
        return {"val_loss": out.loss.item()}

    def summary(self) -> dict:
        return {}


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain; writes config, metrics, checkpoints, curves and reconstructions to ``cfg.output_dir``."""
    return run_job(cfg, PretrainTask())
