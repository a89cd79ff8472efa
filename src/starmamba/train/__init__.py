"""Training: typed job configs, the engine (TrainState, Task, train_one_epoch), run_job, the jobs, checkpoints."""

from starmamba.train.config import EvaluateConfig, FinetuneConfig, PretrainConfig
from starmamba.train.evaluate import run_evaluate
from starmamba.train.finetune import run_finetune
from starmamba.train.pretrain import run_pretrain

__all__ = [
    "EvaluateConfig",
    "FinetuneConfig",
    "PretrainConfig",
    "run_evaluate",
    "run_finetune",
    "run_pretrain",
]
