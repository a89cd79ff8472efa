"""The engine: TrainState round trips, gradient accumulation, and the resume guard."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from starmamba.data import Augmented, EvalTransform, build_dataset
from starmamba.models import build_model, model_config
from starmamba.train.config import FinetuneConfig
from starmamba.train.distributed import Processes
from starmamba.train.engine import Position, TrainLoader, TrainState, train_one_epoch
from starmamba.train.job import resume

CPU = Processes(rank=0, world_size=1, device=torch.device("cpu"))


def config(tmp_path, **overrides) -> FinetuneConfig:
    arch = model_config("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2, num_classes=4)
    options = dict(model="mambamlp_tiny", arch=arch, data_path="synthetic", output_dir=str(tmp_path), batch_size=8,
                   epochs=1, warmup_epochs=0.0, blr=1e-2, num_workers=0, progress=False, ema_decay=0.5,
                   mixup=0.0, cutmix=0.0)  # fmt: skip
    return FinetuneConfig(**(options | overrides))


def state_of(cfg: FinetuneConfig, seed: int) -> TrainState:
    torch.manual_seed(seed)
    return TrainState.create(build_model(cfg.arch), cfg, CPU)


class CrossEntropy:
    def loss(self, model, images, labels, generator):
        return F.cross_entropy(model(images), labels), {}


def loader(cfg: FinetuneConfig, images: int) -> TrainLoader:
    data = build_dataset("synthetic", "train", limit=images)
    return TrainLoader(Augmented(data, EvalTransform(16, data.info.mean, data.info.std, crop_pct=1.0)), cfg, CPU)


def test_train_state_round_trips_model_ema_optimizer_and_position(tmp_path):
    cfg = config(tmp_path)
    trained = state_of(cfg, seed=0)
    train_one_epoch(trained, loader(cfg, 16), CrossEntropy(), lambda values: None)
    assert trained.position == Position(epoch=0, step=2, global_step=2)
    fresh = state_of(cfg, seed=1)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.position == trained.position
    for mine, theirs in ((fresh.module, trained.module), (fresh.ema.module, trained.ema.module)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    for a, b in zip(fresh.optimizer.state.values(), trained.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_accumulating_two_half_batches_is_one_whole_batch(tmp_path):
    whole_cfg = config(tmp_path, weight_decay=0.0)
    half_cfg = dataclasses.replace(whole_cfg, batch_size=4, accum_iter=2)
    whole, half = state_of(whole_cfg, seed=0), state_of(half_cfg, seed=0)
    logged = []
    train_one_epoch(whole, loader(whole_cfg, 8), CrossEntropy(), logged.append)
    train_one_epoch(half, loader(half_cfg, 8), CrossEntropy(), logged.append)
    assert whole.position.global_step == half.position.global_step == 1
    assert logged[0]["loss"] == pytest.approx(logged[1]["loss"], rel=1e-5)  # mean of the two halves' losses
    moved = 0
    for (name, a), b in zip(whole.module.named_parameters(), half.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=name)
        moved += not torch.equal(a, state_of(whole_cfg, seed=0).module.get_parameter(name))
    assert moved > 0


def test_resuming_behind_the_runs_latest_checkpoint_is_a_clear_error(tmp_path):
    from starmamba.train.checkpoint import save_checkpoint

    cfg = config(tmp_path)
    state = state_of(cfg, seed=0)
    for step in (2, 5):
        state.position = Position(0, step, step)
        save_checkpoint(tmp_path, state.state_dict(), model_name="m", model_config={}, run_config={}, keep_last=2)
    older = tmp_path / "checkpoints" / "step-00000002"
    with pytest.raises(ValueError, match="already holds the later checkpoint step-00000005"):
        resume(state, dataclasses.replace(cfg, resume=str(older)))
    resume(state, dataclasses.replace(cfg, resume="auto"))
    assert state.position == Position(0, 5, 5)
