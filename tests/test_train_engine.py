"""The engine: TrainState round trips, gradient accumulation, the resume guard, logged values, non-finite
losses, host synchronisation per step, and the process group of a CUDA run (CUDA faked)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from starmamba.data import Augmented, EvalTransform, build_dataset
from starmamba.models import build_model, model_config
from starmamba.train.config import FinetuneConfig
from starmamba.train.distributed import Processes, all_reduce_sum, joined
from starmamba.train.ema import ModelEma
from starmamba.train.engine import LossWindow, NonFiniteLoss, Position, TrainLoader, TrainState, train_one_epoch
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


class LoggingCrossEntropy:
    """Cross-entropy that also logs, per micro-batch, a 0-dim tensor and a float of known values."""

    def __init__(self) -> None:
        self.calls = 0

    def loss(self, model, images, labels, generator):
        self.calls += 1
        loss = F.cross_entropy(model(images), labels)
        return loss, {"calls": torch.tensor(float(self.calls)), "twice": 2.0 * self.calls, "copy": loss.detach()}


def test_logged_values_are_averaged_over_the_windows_micro_batches(tmp_path):
    cfg = config(tmp_path, batch_size=4, accum_iter=2, log_every=4, clip_grad=1e6)
    task, logged = LoggingCrossEntropy(), []
    train_one_epoch(state_of(cfg, seed=0), loader(cfg, 24), task, logged.append)  # 3 steps of 2 micro-batches
    # Step 1 is logged (the run's first) and step 3 (the epoch's last), which covers micro-batches 3-6.
    first, _, last = logged
    assert (first["calls"], first["twice"]) == (1.5, 3.0)
    assert logged[1] is None and (last["calls"], last["twice"]) == (4.5, 9.0)
    assert last["copy"] == pytest.approx(last["loss"], rel=1e-12)  # a tensor log is averaged as the loss is
    assert last["grad_norm"] > 0 and isinstance(last["grad_norm"], float)


def test_a_non_finite_loss_stops_the_run_naming_its_step(tmp_path):
    cfg = config(tmp_path, batch_size=4, accum_iter=2, log_every=10, ckpt_every=2)

    class NanAtFourthMicroBatch(LoggingCrossEntropy):
        def loss(self, model, images, labels, generator):
            loss, logs = super().loss(model, images, labels, generator)
            return (loss * float("nan") if self.calls == 4 else loss), logs

    steps = []
    with pytest.raises(NonFiniteLoss, match=r"not finite \(NaN or inf\) at step 2 \(epoch 1\)") as error:
        train_one_epoch(state_of(cfg, seed=0), loader(cfg, 32), NanAtFourthMicroBatch(), steps.append)
    # Step 1 is logged; step 2 (a checkpoint step) stops before after_step could save its weights.
    assert len(steps) == 1 and "\n" not in str(error.value)


SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def count_syncs(monkeypatch) -> list[str]:
    """Record every call that reads a tensor's value on the host, which on a GPU waits for it (CPU tensors
    stand in for the GPU's here). AdamW reads its step counters, which torch keeps on the CPU, so calls
    from torch.optim are left out."""
    calls = []

    def counted(name, real):
        def wrapper(self, *args, **kwargs):
            if "torch/optim/" not in sys._getframe(1).f_code.co_filename:
                calls.append(name)
            return real(self, *args, **kwargs)

        return wrapper

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    return calls


def test_steps_between_logged_ones_never_wait_for_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv("STARMAMBA_SCAN_BACKEND", "chunked")
    cfg = config(tmp_path, batch_size=4, accum_iter=2, log_every=3, clip_grad=1.0, ema_decay=0.9)
    state, batches = state_of(cfg, seed=0), loader(cfg, 48)  # 6 steps, logged: 1, 3 and 6
    calls = count_syncs(monkeypatch)
    per_step = []

    def after_step(values):
        per_step.append((values is not None, len(calls)))
        calls.clear()

    train_one_epoch(state, batches, LoggingCrossEntropy(), after_step)
    assert [logged for logged, _ in per_step] == [True, False, True, False, False, True]
    assert [count for logged, count in per_step if not logged] == [0, 0, 0]
    assert all(0 < count <= 4 for logged, count in per_step if logged)  # the window's two reductions


def test_an_ema_update_only_queues_work_on_the_device(monkeypatch):
    model = build_model(model_config("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2, num_classes=4))
    ema = ModelEma(model, decay=0.5)
    calls = count_syncs(monkeypatch)
    # torch's AveragedModel moves every weight and a CPU step counter with .to(device) at each update: on a
    # GPU a blocking copy.
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: calls.append("to"))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(model)
    assert calls == []
    for name, param in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], 0.5 * before[name] + 0.5 * param)


def test_a_cuda_run_joins_one_group_that_carries_its_cpu_bookkeeping(monkeypatch):
    from torch.distributed.distributed_c10d import BackendConfig

    joined_with, devices = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: joined_with.append((args, kwargs)))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with joined("auto") as processes:
        assert processes == Processes(rank=1, world_size=2, device=torch.device("cuda", 1))
    assert devices == [torch.device("cuda", 1)]
    [(args, kwargs)] = joined_with
    backend = args[0] if args else kwargs["backend"]
    backends = BackendConfig(dist.Backend(backend)).get_device_backend_map()
    assert backends == {"cpu": "gloo", "cuda": "nccl"}
    assert "cpu" not in BackendConfig(dist.Backend("nccl")).get_device_backend_map()  # the rule it replaces
    monkeypatch.undo()

    # What the group gives CPU tensors, gloo, carries the reductions of the run's bookkeeping.
    dist.init_process_group(f"cpu:{backends['cpu']}", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64)).tolist() == [1.0, 2.0]
        window = LossWindow(torch.device("cpu"))
        window.add_batch(torch.tensor(3.0), {"part": torch.tensor(1.0)}, images=4, step=1)
        assert window.first_non_finite() == float("inf")
        assert {k: v for k, v in window.read().items() if k != "images_per_s"} == {"loss": 3.0, "part": 1.0}
    finally:
        dist.destroy_process_group()


def test_the_grad_checkpointing_option_turns_on_the_models_checkpointing(tmp_path):
    assert not state_of(config(tmp_path), seed=0).module.encoder.grad_checkpointing
    assert state_of(config(tmp_path, grad_checkpointing=True), seed=0).module.encoder.grad_checkpointing


def test_workers_kept_across_epochs_augment_each_epoch_as_the_main_process_does(tmp_path):
    from starmamba.data import FinetuneTransform

    data = build_dataset("synthetic", "train", limit=8)
    augmented = Augmented(data, FinetuneTransform(16, data.info.mean, data.info.std, scale=(0.2, 1.0), reprob=0.0))
    for workers in (0, 1):
        batches = TrainLoader(augmented, config(tmp_path, batch_size=8, num_workers=workers), CPU)
        assert batches.loader.persistent_workers == (workers > 0)
        for epoch in (0, 1, 2):
            images = next(images for _, (images, _) in batches.epoch(Position(epoch=epoch)))
            augmented.set_epoch(epoch)  # the same images, augmented for this epoch here
            assert torch.equal(images, torch.stack([augmented[i][0] for i in batches.sampler])), (workers, epoch)
