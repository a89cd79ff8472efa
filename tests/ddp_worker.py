"""Run by test_train_jobs under torchrun: a tiny finetune in 2 gloo processes; every rank saves its weights."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from starmamba.data import Augmented, EvalTransform, build_dataset
from starmamba.models import build_model, model_config
from starmamba.train.config import FinetuneConfig
from starmamba.train.distributed import TrainSampler, end_process, joined
from starmamba.train.loop import fit
from starmamba.train.metrics import MetricsLog


def main(out: Path) -> None:
    with joined("cpu") as processes:
        cfg = FinetuneConfig(
            model="mambamlp_tiny", arch=model_config("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2,
                                                     drop_path=0.1, num_classes=4),
            data_path="synthetic", output_dir=str(out / "run"), batch_size=4, epochs=2, warmup_epochs=0.5, blr=1e-3,
            limit_train=32, num_workers=0, progress=False, tensorboard=False, log_every=1, ema_decay=0.9,
        )  # fmt: skip
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank, as DDP also broadcasts them
        model = build_model(cfg.arch)
        if processes.is_main:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "initial.safetensors")
        data = build_dataset("synthetic", "train", limit=cfg.limit_train)
        train_set = Augmented(data, EvalTransform(16, data.info.mean, data.info.std, crop_pct=1.0), seed=cfg.seed)

        def loss_fn(trained, images, labels, generator):
            return F.cross_entropy(trained(images), labels), {}

        metrics = MetricsLog(Path(cfg.output_dir), enabled=processes.is_main, tensorboard=False)
        fit(
            cfg, model=model, model_name=cfg.model, model_config=cfg.arch.to_dict(), train_set=train_set,
            loss_fn=loss_fn, end_of_epoch=lambda *_: {}, processes=processes, metrics=metrics, ema_decay=0.9,
        )  # fmt: skip
        metrics.close()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"rank{processes.rank}.safetensors")
        sampler = TrainSampler(len(train_set), cfg.batch_size, processes, cfg.seed)
        mine = list(sampler)
        gathered = [None] * processes.world_size
        torch.distributed.all_gather_object(gathered, mine)
        if processes.is_main:
            summary = {"world_size": processes.world_size, "distinct_batches": not set(gathered[0]) & set(gathered[1])}
            (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process(0)
