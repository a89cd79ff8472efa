"""The pretraining job: STAR (or ARM, one option away) on an image data set."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from starmamba.data import Augmented, EvalTransform, PretrainTransform, build_dataset
from starmamba.models import StarPretrainer, build_model
from starmamba.train.config import PretrainConfig, to_dict
from starmamba.train.distributed import Processes, joined
from starmamba.train.ema import ModelEma
from starmamba.train.loop import autocast, fit
from starmamba.train.metrics import MetricsLog
from starmamba.train.plots import save_image_grid


def write_config(run_dir: Path, config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(to_dict(config), indent=2) + "\n")
    tmp.replace(run_dir / "config.json")


def preview_batch(cfg: PretrainConfig, processes: Processes) -> tuple[Tensor, tuple, tuple]:
    """A fixed batch of validation images (whole sequences) for reconstructions and the val loss."""
    dataset = build_dataset(cfg.data_path, "val", limit=cfg.limit_val)
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


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain; writes config, metrics, checkpoints, curves and reconstructions to ``cfg.output_dir``."""
    with joined(cfg.device) as processes:
        run_dir = Path(cfg.output_dir)
        dataset = build_dataset(cfg.data_path, "train", limit=cfg.limit_train)
        if processes.is_main:
            write_config(run_dir, cfg)
        torch.manual_seed(cfg.seed + processes.rank)
        info = dataset.info
        transform = PretrainTransform(cfg.arch.img_size, info.mean, info.std, scale=(cfg.min_crop_scale, 1.0))
        model: StarPretrainer = build_model(cfg.arch)
        preview, mean, std = preview_batch(cfg, processes)
        layout = model.layout
        if processes.is_main:
            print(
                f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; sequences of "
                f"{layout.images_per_sequence} image(s), {layout.num_tokens} tokens ({layout.describe()})"
            )

        def loss_fn(trained: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator):
            return trained(images).loss, {}

        def end_of_epoch(epoch: int, trained: nn.Module, ema: ModelEma | None) -> dict[str, float]:
            model.eval()
            with torch.no_grad(), autocast(processes.device):
                out = model(preview)
            if processes.is_main and ((epoch + 1) % cfg.recon_every == 0 or epoch + 1 == cfg.epochs):
                shown = preview[: 2 * layout.images_per_sequence]
                recon = model.reconstruct(preview, out)[: len(shown)]
                grid = torch.cat([denormalize(shown, mean, std), denormalize(recon, mean, std)])
                save_image_grid(grid.float().cpu(), run_dir / "reconstructions.png", nrow=len(shown))
            return {"val_loss": out.loss.item()}

        metrics = MetricsLog(run_dir, enabled=processes.is_main, tensorboard=cfg.tensorboard)
        started = time.perf_counter()
        try:
            position = fit(
                cfg, model=model, model_name=cfg.model, model_config=cfg.arch.to_dict(),
                train_set=Augmented(dataset, transform, seed=cfg.seed), loss_fn=loss_fn,
                end_of_epoch=end_of_epoch, processes=processes, metrics=metrics,
            )  # fmt: skip
        finally:
            metrics.close()
        return {"steps": position.global_step, "seconds": time.perf_counter() - started, "output_dir": str(run_dir)}
