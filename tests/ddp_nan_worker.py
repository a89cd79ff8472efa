"""Run by test_train_jobs under torchrun: a tiny finetune in 2 gloo processes whose rank 1 alone meets a NaN
loss at step 3. Each rank writes the error it stopped with to ``error<rank>.txt``."""

import sys
from pathlib import Path

from starmamba.errors import RunError
from starmamba.models import model_config
from starmamba.train.config import FinetuneConfig
from starmamba.train.distributed import end_process
from starmamba.train.finetune import FinetuneTask
from starmamba.train.job import run_job

NAN_STEP = 3


class NanOnRankOne(FinetuneTask):
    calls = 0

    def loss(self, model, images, labels, generator):
        loss, logs = super().loss(model, images, labels, generator)
        self.calls += 1
        return (loss * float("nan") if self.processes.rank == 1 and self.calls == NAN_STEP else loss), logs


def main(out: Path) -> int:
    cfg = FinetuneConfig(
        model="mambamlp_tiny", arch=model_config("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2),
        data_path="synthetic", output_dir=str(out / "run"), batch_size=4, epochs=1, warmup_epochs=0.0, blr=1e-3,
        limit_train=48, limit_val=8, num_workers=0, progress=False, tensorboard=False, log_every=10, ckpt_every=1,
        ema_decay=None, crop_pct=1.0, mixup=0.0, cutmix=0.0, aa="", reprob=0.0, device="cpu",
    )  # fmt: skip
    task = NanOnRankOne()
    try:
        run_job(cfg, task)
    except RunError as error:
        (out / f"error{task.processes.rank}.txt").write_text(str(error))
        return 2
    return 0


if __name__ == "__main__":
    end_process(main(Path(sys.argv[1])))
