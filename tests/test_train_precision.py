"""--precision: bf16 and fp16 autocast on a CPU, fp16's loss scaling, and the option's life in a run's files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import tyro

from starmamba.cli import parse_job
from starmamba.ops import available_backends, selective_scan
from starmamba.train.checkpoint import load_checkpoint, save_checkpoint
from starmamba.train.config import EvaluateConfig, FinetuneConfig, PretrainConfig, load_config_file, to_dict
from starmamba.train.engine import train_one_epoch
from starmamba.train.evaluate import evaluate
from starmamba.train.finetune import run_finetune
from starmamba.train.precision import autocast, grad_scaler, resolve_precision
from test_train_engine import CrossEntropy, config, loader, state_of
from test_train_jobs import tiny_finetune

CPU = torch.device("cpu")


def two_steps(cfg: FinetuneConfig, scale: float | None = None) -> tuple[dict, object]:
    """Two optimizer steps of 8 images from the weights of seed 0: (what the second logged, the state).

    The second, because the head starts at zero: the first loss is ln(4) at any precision.
    """
    state = state_of(dataclasses.replace(cfg, log_every=1), seed=0)
    if scale is not None:
        state.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    logged = []
    train_one_epoch(state, loader(cfg, 16), CrossEntropy(), logged.append)
    return logged[1], state


def test_the_default_is_bf16_on_cuda_and_fp32_on_a_cpu_and_a_choice_holds_on_any_device():
    assert resolve_precision(torch.device("cuda"), None) == "bf16"
    assert resolve_precision(CPU, None) == "fp32"
    assert resolve_precision(CPU, "fp16") == "fp16"
    assert resolve_precision(torch.device("cuda"), "fp32") == "fp32"
    assert not grad_scaler(CPU, "bf16").is_enabled() and grad_scaler(CPU, "fp16").is_enabled()
    x = torch.randn(4, 4)
    with autocast(CPU, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(CPU, "fp16"):
        assert (x @ x).dtype == torch.float16
    with autocast(CPU):
        assert (x @ x).dtype == torch.float32


def test_an_unknown_precision_is_refused_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"precision='fp8' is not one of 'fp32', 'bf16', 'fp16'"):
        config(tmp_path, precision="fp8")
    with pytest.raises(ValueError, match="precision='half'"):
        EvaluateConfig(checkpoint="run", precision="half")


def test_a_bf16_step_on_a_cpu_is_close_to_fp32_but_not_equal(tmp_path):
    fp32, fp32_state = two_steps(config(tmp_path, precision="fp32", clip_grad=1e9))
    bf16, bf16_state = two_steps(config(tmp_path, precision="bf16", clip_grad=1e9))
    # bf16 keeps 8 bits of mantissa: the loss moves, but not by much.
    assert bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-3)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-2)
    for (name, a), b in zip(fp32_state.module.named_parameters(), bf16_state.module.parameters(), strict=True):
        assert a.dtype == b.dtype == torch.float32, name  # autocast leaves the weights in fp32


def test_fp16_scales_the_loss_and_unscales_the_gradients_before_clipping_and_stepping(tmp_path):
    fp32, _ = two_steps(config(tmp_path, precision="fp32", clip_grad=1e9))
    fp16, state = two_steps(config(tmp_path, precision="fp16", clip_grad=1e9))
    assert state.scaler.get_scale() == 2.0**16  # no overflow: the scale stays
    assert fp16["loss"] != fp32["loss"] and fp16["loss"] == pytest.approx(fp32["loss"], rel=1e-3)
    # The norm clipping sees is that of the unscaled gradients (scaled ones would be 65536 times larger).
    assert fp16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-3)
    before = state_of(config(tmp_path), seed=0).module
    assert any(not torch.equal(a, b) for a, b in zip(state.module.parameters(), before.parameters(), strict=True))


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    cfg = config(tmp_path, precision="fp16", ema_decay=None)
    _, state = two_steps(cfg, scale=2.0**100)  # the scaled gradients overflow fp16's 65504, twice
    assert state.scaler.get_scale() == 2.0**98
    assert state.position.global_step == 2  # the steps count: the schedule goes on as planned
    before = state_of(cfg, seed=0).module
    for (name, a), b in zip(state.module.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(a, b), name  # but the optimizer left the weights as they were


def test_the_scalers_state_goes_through_a_checkpoint(tmp_path):
    cfg = config(tmp_path, precision="fp16")
    _, state = two_steps(cfg, scale=2.0**100)
    save_checkpoint(tmp_path, state.state_dict(), model_name="mambamlp_tiny", model_config={}, run_config={})
    fresh = state_of(cfg, seed=1)
    assert fresh.scaler.get_scale() == 2.0**16
    fresh.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "step-00000002"))
    assert fresh.scaler.state_dict() == state.scaler.state_dict()

    # A checkpoint of an fp32 run (or one from before --precision) has no scaler state: loading it keeps the default.
    plain = state_of(config(tmp_path), seed=0).state_dict()
    assert plain["scaler"] == {}
    fresh = state_of(cfg, seed=1)
    fresh.load_state_dict(plain | {"scaler": {}})
    assert fresh.scaler.get_scale() == 2.0**16


def test_evaluation_in_bf16_is_close_to_fp32_but_not_equal(tmp_path):
    cfg = config(tmp_path)
    model = two_steps(cfg)[1].module  # trained a little: the fresh head's zero logits are exact at any precision
    batches = loader(cfg, 16).loader
    fp32 = evaluate(model, batches, CPU, "fp32")
    bf16 = evaluate(model, batches, CPU, "bf16")
    assert fp32 == evaluate(model, batches, CPU)  # the CPU's default
    assert bf16["val_loss"] != fp32["val_loss"]
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=2e-2)


def test_the_precision_is_written_to_config_json_and_read_back_for_a_rerun(tmp_path):
    cfg = tiny_finetune(tmp_path / "run", precision="bf16", epochs=1, limit_train=16, limit_val=8, ema_decay=None)
    run_finetune(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["precision"] == "bf16"
    again = load_config_file(tmp_path / "run" / "config.json", FinetuneConfig, FinetuneConfig())
    assert again.precision == "bf16"
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert checkpoint["run_config"]["precision"] == "bf16"
    # A config.json written before --precision existed reruns at the old default.
    old = to_dict(dataclasses.replace(cfg, precision=None))
    del old["precision"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_config_file(tmp_path / "old.json", FinetuneConfig, FinetuneConfig()).precision is None


@pytest.mark.parametrize("backend", [name for name in available_backends(CPU) if name != "triton"])  # interpreted: slow
def test_the_selective_scan_computes_in_fp32_under_bf16_autocast(backend):
    generator = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 8, 4, 32
    u, delta, z = (torch.randn(b, d, length, generator=generator) for _ in range(3))
    B, C = (torch.randn(b, n, length, generator=generator) for _ in range(2))
    A, D, bias = -torch.rand(d, n, generator=generator) - 0.5, torch.randn(d, generator=generator), torch.zeros(d)

    def scan(precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = u.clone().requires_grad_()
        with autocast(CPU, precision):  # the forward pass, as the engine runs it; backward outside
            y = selective_scan(x, delta, A, B, C, D, z, bias, delta_softplus=True, backend=backend)
        y.square().sum().backward()
        return y.detach(), x.grad

    (expected, expected_grad), (y, grad) = scan("fp32"), scan("bf16")
    assert y.dtype == torch.float32
    assert torch.equal(y, expected) and torch.equal(grad, expected_grad)


def test_every_job_takes_the_flag():
    assert parse_job("pretrain", PretrainConfig, "star", ["--precision", "fp16"]).precision == "fp16"
    assert parse_job("finetune", FinetuneConfig, "mambamlp", ["--precision", "bf16"]).precision == "bf16"
    evaluate_args = ["--checkpoint", "run", "--precision", "fp32"]
    assert tyro.cli(EvaluateConfig, args=evaluate_args, use_underscores=True).precision == "fp32"
    assert parse_job("finetune", FinetuneConfig, "mambamlp", []).precision is None
