"""Run by test_train_jobs under torchrun: a tiny finetune in 2 gloo processes whose models start apart.

Every rank seeds its model differently (as a careless job might), then saves its initial weights and,
after the last epoch, its model, EMA and optimizer state, for the test to compare across ranks.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from starmamba.models import model_config
from starmamba.train.config import FinetuneConfig
from starmamba.train.distributed import TrainSampler, end_process
from starmamba.train.engine import TrainState
from starmamba.train.finetune import FinetuneTask
from starmamba.train.job import run_job


def save(state: dict, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, path)


class RankSeededTask(FinetuneTask):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def build_model(self, cfg):
        torch.manual_seed(1000 + self.processes.rank)
        model, description = super().build_model(cfg)
        save(model.state_dict(), self.out / f"initial{self.processes.rank}.safetensors")
        return model, description

    def evaluate(self, state: TrainState, epoch: int) -> dict[str, float]:
        result = super().evaluate(state, epoch)
        if epoch + 1 == self.cfg.epochs:
            rank = self.processes.rank
            save(state.module.state_dict(), self.out / f"model{rank}.safetensors")
            save(state.ema.state_dict(), self.out / f"ema{rank}.safetensors")
            torch.save(state.optimizer.state_dict()["state"], self.out / f"optimizer{rank}.pt")
            sampler = TrainSampler(96, self.cfg.batch_size, self.processes, self.cfg.seed)
            gathered = [None] * self.processes.world_size
            torch.distributed.all_gather_object(gathered, list(sampler))
            if rank == 0:
                summary = {"world_size": self.processes.world_size, "shared": len(set(gathered[0]) & set(gathered[1]))}
                (self.out / "summary.json").write_text(json.dumps(summary))
        return result


def main(out: Path) -> None:
    cfg = FinetuneConfig(
        model="mambamlp_tiny", arch=model_config("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2,
                                                 drop_path=0.1),
        data_path="synthetic", output_dir=str(out / "run"), batch_size=4, epochs=2, warmup_epochs=0.5, blr=1e-3,
        limit_train=32, limit_val=8, num_workers=0, progress=False, tensorboard=False, log_every=1, ema_decay=0.9,
        crop_pct=1.0, mixup=0.0, cutmix=0.0, aa="", reprob=0.0, device="cpu",
    )  # fmt: skip
    run_job(cfg, RankSeededTask(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process(0)
