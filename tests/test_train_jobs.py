"""The jobs end to end on tiny models: pretrain -> finetune -> evaluate, exact resume, DDP on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from starmamba.models import model_config
from starmamba.train.config import EvaluateConfig, FinetuneConfig, PretrainConfig
from starmamba.train.eval_setup import run_eval_options
from starmamba.train.evaluate import run_evaluate
from starmamba.train.finetune import FinetuneTask, run_finetune
from starmamba.train.metrics import read_metrics
from starmamba.train.pretrain import run_pretrain

TINY = dict(img_size=16, patch_size=4, dim=32, depth=2)


def tiny_pretrain(out: Path, **overrides) -> PretrainConfig:
    arch = model_config("star_tiny", **TINY, cluster_size=2, images_per_sequence=2, decoder_dim=32,
                        decoder_head_dim=16)  # fmt: skip
    options = dict(model="star_tiny", arch=arch, data_path="synthetic", output_dir=str(out), batch_size=8,
                   epochs=2, warmup_epochs=0.5, blr=1e-3, limit_train=48, limit_val=16, num_workers=0,
                   progress=False, tensorboard=False, log_every=2)  # fmt: skip
    return PretrainConfig(**(options | overrides))


def tiny_finetune(out: Path, **overrides) -> FinetuneConfig:
    arch = model_config("mambamlp_tiny", **TINY, drop_path=0.1)
    options = dict(model="mambamlp_tiny", arch=arch, data_path="synthetic", output_dir=str(out), batch_size=8,
                   epochs=2, warmup_epochs=0.5, blr=1e-3, limit_train=48, limit_val=32, num_workers=0,
                   progress=False, tensorboard=False, log_every=2, ema_decay=0.9, crop_pct=1.0)  # fmt: skip
    return FinetuneConfig(**(options | overrides))


def test_pretrain_finetune_evaluate_chain(tmp_path, monkeypatch):
    pre = run_pretrain(tiny_pretrain(tmp_path / "pre"))
    assert pre["steps"] == 2 * (48 // 8)
    for name in ("config.json", "metrics.jsonl", "curves.png", "reconstructions.png", "model.safetensors"):
        assert (tmp_path / "pre" / name).exists(), name
    records = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert any("val_loss" in r for r in records)
    saved = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert saved["arch"]["images_per_sequence"] == 2 and saved["blr"] == 1e-3

    built = []
    real_build = FinetuneTask.build_model

    def build_and_keep(task, cfg):
        model, description = real_build(task, cfg)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model, description

    monkeypatch.setattr(FinetuneTask, "build_model", build_and_keep)
    fine = run_finetune(tiny_finetune(tmp_path / "fine", finetune=str(tmp_path / "pre" / "model.safetensors")))
    assert {"acc1", "ema_acc1", "best_acc1"} <= set(fine)
    assert (tmp_path / "fine" / "ema.safetensors").exists()
    # The encoder really came from the pretraining run: the finetune started from its tensors (each of
    # the 4 scan directions from the pretrained forward one), and then trained them.
    pretrained, initial = load_file(tmp_path / "pre" / "model.safetensors"), built[0]
    finetuned = load_file(tmp_path / "fine" / "model.safetensors")
    for key in ("encoder.patch_embed.proj.weight", "encoder.blocks.1.mlp.w3.weight"):
        assert torch.equal(initial[key], pretrained[key]), key
    for direction in range(4):
        key = f"encoder.blocks.0.mixer.directions.{direction}.x_proj.weight"
        assert torch.equal(initial[key], pretrained["encoder.blocks.0.mixer.directions.0.x_proj.weight"]), key
    assert not torch.equal(finetuned["encoder.patch_embed.proj.weight"], pretrained["encoder.patch_embed.proj.weight"])

    result = run_evaluate(EvaluateConfig(checkpoint=str(tmp_path / "fine"), data_path="synthetic", limit_val=32,
                                         num_workers=0))  # fmt: skip
    # Same weights, same images, same transform: the run's crop_pct=1.0 is read from its config.json.
    assert result["acc1"] == pytest.approx(fine["acc1"])
    ema = run_evaluate(EvaluateConfig(checkpoint=str(tmp_path / "fine"), data_path="synthetic", limit_val=32,
                                      num_workers=0, crop_pct=1.0, ema=True))  # fmt: skip
    assert ema["acc1"] == pytest.approx(fine["ema_acc1"])


def test_evaluating_a_pretraining_checkpoint_is_a_clear_error(tmp_path):
    run_pretrain(tiny_pretrain(tmp_path / "pre", epochs=1))
    with pytest.raises(ValueError, match="finetune it first"):
        run_evaluate(EvaluateConfig(checkpoint=str(tmp_path / "pre"), data_path="synthetic", num_workers=0))


def test_finetuning_from_another_model_is_a_clear_error(tmp_path):
    run_pretrain(tiny_pretrain(tmp_path / "pre", epochs=1))
    wider = model_config("mambamlp_tiny", **(TINY | {"dim": 64}))
    with pytest.raises(ValueError, match="does not fit this classifier"):
        run_finetune(tiny_finetune(tmp_path / "fine", arch=wider, finetune=str(tmp_path / "pre")))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "starmamba.cli", *args]


PRETRAIN_FLAGS = ["--data_path", "synthetic", "--img_size", "16", "--patch_size", "4", "--dim", "32", "--depth", "2",
                  "--cluster_size", "2", "--images_per_sequence", "2", "--decoder_dim", "32", "--decoder_head_dim",
                  "16", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0.5", "--blr", "1e-3",
                  "--limit_train", "48", "--limit_val", "16", "--num_workers", "0", "--no_progress",
                  "--no_tensorboard", "--model", "star_tiny"]  # fmt: skip


@pytest.mark.slow
def test_resume_after_a_kill_reaches_the_same_weights(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    flags = [*PRETRAIN_FLAGS, "--ckpt_every", "2", "--log_every", "3"]  # checkpoints between logged steps
    subprocess.run(cli("pretrain", *flags, "--output_dir", str(tmp_path / "whole")), check=True, env=env,
                   capture_output=True)  # fmt: skip

    killed = tmp_path / "killed"
    process = subprocess.Popen(cli("pretrain", *flags, "--output_dir", str(killed)), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if pointer.exists() and int(pointer.read_text().strip().split("-")[-1]) >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()

    subprocess.run(cli("pretrain", *flags, "--output_dir", str(killed), "--resume", "auto"), check=True, env=env,
                   capture_output=True)  # fmt: skip
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    # The log reads as one run: the steps logged after the last checkpoint are not there twice, and
    # the same losses are logged: a checkpoint closes the training-loss window, so the first line
    # after the resume averages the steps it does in the run that was not killed.
    logs = [read_metrics(run / "metrics.jsonl") for run in (tmp_path / "whole", killed)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    assert [r.get("val_loss") for r in logs[0]] == [r.get("val_loss") for r in logs[1]]
    assert [r.get("loss") for r in logs[0]] == [r.get("loss") for r in logs[1]]
    assert any("val_loss" in r for r in logs[0])


@pytest.mark.slow
def test_two_gloo_processes_from_different_seeds_agree_on_model_ema_and_optimizer(tmp_path):
    worker = Path(__file__).parent / "ddp_worker.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(tmp_path)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    initial = [load_file(tmp_path / f"initial{rank}.safetensors") for rank in (0, 1)]
    assert not torch.equal(initial[0]["head.weight"], initial[1]["head.weight"])  # the ranks started apart
    for name in ("model", "ema"):
        rank0, rank1 = (load_file(tmp_path / f"{name}{rank}.safetensors") for rank in (0, 1))
        assert rank0.keys() == rank1.keys() == initial[0].keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{name} {key}"
        assert any(not torch.equal(initial[0][k], rank0[k]) for k in rank0 if rank0[k].is_floating_point())
    optimizer = [torch.load(tmp_path / f"optimizer{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert optimizer[0].keys() == optimizer[1].keys() and len(optimizer[0]) > 0
    for index, moments in optimizer[0].items():
        for key, value in moments.items():
            assert torch.equal(value, optimizer[1][index][key]), f"optimizer state {index} {key}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"world_size": 2, "shared": 0}  # each rank trained on its own images


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_line(tmp_path):
    worker = Path(__file__).parent / "ddp_nan_worker.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(tmp_path)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    errors = [(tmp_path / f"error{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1] and "\n" not in errors[0], errors
    assert "not finite (NaN or inf) at step 3 (epoch 1)" in errors[0]
    # Checkpoints were saved every step; the last is the one before the NaN.
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-00000002"]


@pytest.mark.parametrize("world_size, code, printed", [("1", 0, "kept|returned 3"), ("2", 3, "kept")])
def test_end_process_ends_only_torchrun_processes_and_keeps_their_output(world_size, code, printed):
    script = (
        "import sys\nfrom starmamba.train.distributed import end_process\n"
        "print('kept', end='')\nprint('|returned', end_process(3), end='')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env=os.environ | {"WORLD_SIZE": world_size},
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (code, printed), done.stderr


def test_evaluate_resizes_as_the_finetuning_run_did(tmp_path):
    assert run_eval_options(tmp_path / "arm.pth") == {"crop_pct": 0.875, "resize": "square"}  # ARM's own
    (tmp_path / "config.json").write_text(json.dumps({"crop_pct": 1.0, "eval_resize": "shorter"}))
    assert run_eval_options(tmp_path / "model.safetensors") == {"crop_pct": 1.0, "resize": "shorter"}
    (tmp_path / "config.json").write_text(json.dumps({"crop_pct": 0.9}))  # written before the option existed
    assert run_eval_options(tmp_path) == {"crop_pct": 0.9, "resize": "shorter"}
