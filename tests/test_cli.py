"""The command line: help with every option and default, presets, config files, clear errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import starmamba
from starmamba.cli import main, parse_job
from starmamba.experiments.recipes import PRESETS, preset
from starmamba.train.config import EvaluateConfig, FinetuneConfig, PretrainConfig, to_dict


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # messages on one line, whatever the terminal


def help_text(capsys, *args):
    assert main([*args, "--help"]) == 0
    return capsys.readouterr().out


def test_pretrain_help_lists_every_option_with_its_default(capsys):
    text = help_text(capsys, "pretrain")
    fields = {f.name for f in dataclasses.fields(PretrainConfig)} - {"arch"}
    fields |= {f.name for f in dataclasses.fields(PretrainConfig().arch)}
    for name in fields:
        assert f"--{name}" in text, name
    for flag in ("--blr", "--accum_iter", "--norm_pix_loss", "--preset", "--config"):
        assert flag in text
    assert "(default: 0.00015)" in text and "(default: star_base)" in text


def test_finetune_help_has_the_mae_vocabulary(capsys):
    text = help_text(capsys, "finetune")
    for flag in ("--layer_decay", "--mixup", "--cutmix", "--reprob", "--drop_path", "--ema_decay", "--finetune",
                 "--smoothing", "--cls_token"):  # fmt: skip
        assert flag in text, flag


def test_the_paper_defaults_when_nothing_is_said():
    pre = parse_job("pretrain", PretrainConfig, "star", [])
    assert (pre.blr, pre.weight_decay, pre.betas) == (1.5e-4, 0.05, (0.9, 0.95))
    assert (pre.warmup_epochs, pre.clip_grad) == (40, 3.0)
    assert (pre.arch.dim, pre.arch.img_size) == (768, 192)
    assert (pre.arch.images_per_sequence, pre.arch.separator) == (8, "cluster")
    assert (pre.arch.separator_value, pre.arch.separator_position, pre.arch.norm_pix_loss) == ("identity", "SC", True)
    fine = parse_job("finetune", FinetuneConfig, "mambamlp", [])
    assert (fine.blr, fine.layer_decay, fine.epochs, fine.warmup_epochs, fine.min_lr) == (5e-4, 0.65, 100, 5, 1e-6)
    assert (fine.mixup, fine.cutmix, fine.smoothing, fine.reprob, fine.ema_decay) == (0.8, 1.0, 0.1, 0.25, 0.99992)
    assert (fine.arch.drop_path, fine.arch.cls_token, fine.arch.img_size, fine.arch.scans) == (0.1, "tail", 224, 4)
    # ARM's recipe where the paper is silent: mean-of-patches readout, 256 x 256 then the 224 crop.
    assert (fine.arch.global_pool, fine.eval_resize, fine.crop_pct) == (True, "square", 0.875)
    assert not pre.decay_a_log and not fine.decay_a_log


@pytest.mark.parametrize("name", list(PRESETS["finetune"]))
def test_every_finetune_preset_names_its_readout_and_evaluation_resize(name, capsys):
    cfg = parse_job("finetune", FinetuneConfig, "mambamlp", ["--preset", name])
    assert (cfg.arch.global_pool, cfg.eval_resize) == (True, "square")
    flags = ["--preset", name, "--no_global_pool", "--eval_resize", "shorter", "--decay_a_log"]
    changed = parse_job("finetune", FinetuneConfig, "mambamlp", flags)
    assert (changed.arch.global_pool, changed.eval_resize, changed.decay_a_log) == (False, "shorter", True)


def test_data_is_short_for_data_path():
    assert parse_job("finetune", FinetuneConfig, "mambamlp", ["--data", "/imagenet"]).data_path == "/imagenet"


def test_preset_then_config_file_then_model_then_flags(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": 7, "arch": {"images_per_sequence": 4}}))
    args = ["--preset", "arm_base_in1k", "--config", str(config), "--model", "star_large", "--blr", "1e-3"]
    cfg = parse_job("pretrain", PretrainConfig, "star", args)
    assert cfg.epochs == 7 and cfg.blr == 1e-3
    assert cfg.arch.images_per_sequence == 4 and cfg.arch.separator == "none"  # file over preset
    assert (cfg.model, cfg.arch.dim, cfg.arch.depth) == ("star_large", 1024, 24)


def test_a_saved_config_round_trips(tmp_path):
    original = preset("pretrain", "fashion_mnist")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(original)))
    assert parse_job("pretrain", PretrainConfig, "star", ["--config", str(path)]) == original


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "--preset", "nope"], "unknown pretrain preset 'nope'"),
        (["pretrain", "--model", "mambamlp_base"], "is not one of star_tiny"),
        (["pretrain", "--separator", "cluster", "--images_per_sequence", "3", "--batch_size", "8"], "not a multiple"),
        (["pretrain", "--cluster_size", "5"], "does not divide the grid"),
        (["finetune", "--layer_decay", "1.5"], "layer_decay=1.5"),
        (["evaluate", "--checkpoint", "x", "--eval_resize", "longer"], "eval_resize"),
        (["evaluate", "--checkpoint", "/nonexistent/ckpt"], "no checkpoint at /nonexistent/ckpt"),
        (["pretrain", "--data_path", "/nonexistent/data", "--batch_size", "8"], "neither 'fashion_mnist'"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_unknown_command_suggests(capsys):
    assert main(["pretrian"]) == 2
    assert "did you mean pretrain" in capsys.readouterr().err


def test_list_models(capsys):
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    assert "mambamlp_base" in out and "85.0M" in out and "star_huge" in out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def test_a_malformed_config_file_is_named(capsys, tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"epochs": 3,}')
    assert main(["pretrain", "--config", str(config)]) == 2
    assert one_line_error(capsys).startswith(f"starmamba pretrain: error: config file {config} is not valid JSON: ")


@pytest.mark.parametrize(
    "values,message",
    [
        ({"arch": {"dimm": 96}}, "unknown option(s) for StarConfig: arch.dimm"),
        ({"epochs": "ten"}, "epochs='ten' is not of type int"),
        ({"arch": {"depth": 2.5}}, "arch.depth=2.5 is not of type int"),
        ({"betas": [0.9]}, "betas=(0.9,) is not of type tuple[float, float]"),
        ({"limit_train": "all"}, "limit_train='all' is not of type int | None"),
        ({"arch": 4}, "arch=4 is not a JSON object of StarConfig options"),
        ({"epochs": -1}, "epochs=-1 must be > 0"),
    ],
)
def test_a_config_file_with_a_wrong_option_is_named(capsys, tmp_path, values, message):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(values))
    assert main(["pretrain", "--config", str(config)]) == 2
    assert one_line_error(capsys) == f"starmamba pretrain: error: config file {config}: {message}"


def test_a_missing_config_file_is_named(capsys, tmp_path):
    assert main(["finetune", "--config", str(tmp_path / "nope.json")]) == 2
    assert one_line_error(capsys).endswith(f"config file {tmp_path / 'nope.json'} does not exist")


def test_overwrite_is_never_read_from_a_config_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(to_dict(dataclasses.replace(PretrainConfig(), overwrite=True))))
    assert parse_job("pretrain", PretrainConfig, "star", ["--config", str(config)]).overwrite is False
    assert parse_job("pretrain", PretrainConfig, "star", ["--config", str(config), "--overwrite"]).overwrite is True


@pytest.mark.parametrize(
    "args,message",
    [
        (["finetune", "--layer_decay", "0"], "layer_decay=0.0 must lie in (0, 1]: 0 freezes every encoder block"),
        (["pretrain", "--in_chans", "1"], "in_chans=1: the data loaders give RGB images"),
        (["finetune", "--in_chans", "1"], "in_chans=1: the data loaders give RGB images"),
        (["finetune", "--max_unreadable", "2"], "max_unreadable=2.0 must lie in [0, 1]"),
    ],
)
def test_refused_options_are_refused_at_start(capsys, args, message):
    assert main(args) == 2  # tyro reports a refused flag in a box of its own, as for every option
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_device_cuda_without_a_gpu(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["--device", "cuda", "--data_path", "synthetic", "--output_dir", str(tmp_path / "run")]
    assert main(["pretrain", *args, "--batch_size", "8"]) == 2
    assert one_line_error(capsys) == (
        "starmamba pretrain: error: --device cuda: PyTorch sees no CUDA device here; use --device cpu (or auto)"
    )
    assert not (tmp_path / "run").exists()


def test_no_command_is_an_error(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: starmamba COMMAND")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"starmamba {starmamba.__version__}\n"


def test_list_models_help_and_bad_options(capsys):
    assert main(["list-models", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: starmamba list-models") and "mambamlp_base" not in out
    assert main(["list-models", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["pretrain", "--help"], ["--help"], ["list-models"]])
def test_output_into_a_closed_pipe_is_quiet(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as `| head` does after its lines: every write fails
    try:
        result = subprocess.run(
            [sys.executable, "-m", "starmamba.cli", *args], stdout=write_end, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write_end)
    assert result.stderr == b""
    assert result.returncode == 141


@pytest.mark.parametrize(("cores", "workers"), [({0}, 1), ({0, 1}, 2), (set(range(16)), 4)])
def test_evaluate_defaults_to_the_workers_the_machine_has(monkeypatch, capsys, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert EvaluateConfig(checkpoint="run").num_workers == workers
    assert main(["evaluate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split("--num_workers")[1].split()[:20])
    assert f"if fewer (default: {workers})" in help_text
