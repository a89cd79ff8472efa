"""The ``starmamba`` command: pretrain, finetune, evaluate, export, predict, list-models, demo, ablate."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Callable

import torch
import tyro

from starmamba import __version__
from starmamba.errors import Interrupted, RunError
from starmamba.experiments.ablate import AblateConfig, run_ablation
from starmamba.experiments.demo import DemoConfig, run_demo
from starmamba.experiments.recipes import PRESETS, preset
from starmamba.models import SIZES, build_model, list_models, model_config
from starmamba.models.registry import split_name
from starmamba.train.config import EvaluateConfig, FinetuneConfig, PretrainConfig, load_config_file
from starmamba.train.distributed import end_process
from starmamba.train.evaluate import run_evaluate
from starmamba.train.export import ExportConfig, run_export
from starmamba.train.finetune import run_finetune
from starmamba.train.pretrain import run_pretrain
from starmamba.train.probe import run_probe

USAGE = """usage: starmamba COMMAND [OPTIONS]   (or starmamba --version)

commands:
  pretrain      autoregressive pretraining (STAR by default; ARM with --preset arm_base_in1k)
  finetune      finetune a 4-scan MambaMLP classifier, from scratch or from --finetune CHECKPOINT
  evaluate      top-1 / top-5 of a classifier checkpoint (ours, or ARM's .pth)
  export        a run's weights as a Hugging Face Hub folder with a model card (from_pretrained), --onnx
  predict       top-k classes of your images, by name, from a finetuning run or a Hub folder
  list-models   the model presets
  demo          the whole story on Fashion-MNIST in minutes: STAR vs ARM vs from scratch
  ablate        rerun one of the paper's ablation tables (1-5) at an affordable scale

`starmamba COMMAND --help` lists every option of a command with its default."""


def with_model(cfg, name: str, family: str):
    """``cfg`` with the width and depth of preset ``name`` (other architecture options kept)."""
    choices = [m for m in list_models() if split_name(m)[0] == family]
    if name not in choices:
        raise ValueError(f"--model {name!r} is not one of {', '.join(choices)}")
    dim, depth = SIZES[split_name(name)[1]]
    return dataclasses.replace(cfg, model=name, arch=dataclasses.replace(cfg.arch, dim=dim, depth=depth))


def parse_job(job: str, config_type: type, family: str, argv: list[str]):
    """Preset, then config file, then --model, then every other flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    pre.add_argument("--model")
    known, rest = pre.parse_known_args(argv)
    base = preset(job, known.preset) if known.preset else config_type()
    if known.config:
        base = load_config_file(known.config, config_type, base)
    if known.model:
        base = with_model(base, known.model, family)
    description = (
        f"{config_type.__doc__}\n\nApplied in order: --preset NAME (one of {', '.join(PRESETS[job])}), "
        f"--config FILE.json (e.g. a run's config.json), --model NAME (width and depth of a preset), "
        f"then the options below. Defaults shown are those in effect."
    )
    return tyro.cli(
        config_type, default=base, args=rest, prog=f"starmamba {job}", description=description, use_underscores=True
    )


def given(argv: list[str], option: str) -> bool:
    """Whether ``--option`` is on the command line (``--option VALUE`` or ``--option=VALUE``)."""
    return any(arg == f"--{option}" or arg.startswith(f"--{option}=") for arg in argv)


def cmd_pretrain(argv: list[str]) -> None:
    config = parse_job("pretrain", PretrainConfig, "star", argv)
    moot = [f"--{option}" for option in ("separator_position", "separator_value") if given(argv, option)]
    if moot and config.arch.separator == "none":
        raise ValueError(
            f"{' and '.join(moot)} given with --separator none: there is no separator to place; leave "
            f"{'them' if len(moot) > 1 else 'it'} out, or choose a --separator"
        )
    run_pretrain(config)


def cmd_finetune(argv: list[str]) -> None:
    config = parse_job("finetune", FinetuneConfig, "mambamlp", argv)
    run_finetune(config, num_classes_given=given(argv, "num_classes"))


def cmd_evaluate(argv: list[str]) -> None:
    cfg = tyro.cli(EvaluateConfig, args=argv, prog="starmamba evaluate", use_underscores=True)
    if cfg.probe == "none":
        run_evaluate(cfg)
    else:
        run_probe(cfg)


def cmd_export(argv: list[str]) -> None:
    run_export(tyro.cli(ExportConfig, args=argv, prog="starmamba export", use_underscores=True))


def cmd_predict(argv: list[str]) -> None:
    from starmamba.train.predict import PredictConfig, run_predict

    run_predict(tyro.cli(PredictConfig, args=argv, prog="starmamba predict", use_underscores=True))


def cmd_list_models(argv: list[str]) -> None:
    argparse.ArgumentParser(
        prog="starmamba list-models",
        description="The model presets (--model NAME): width, depth, scan directions, image size, parameters.",
    ).parse_args(argv)
    print(f"{'model':16s} {'width':>5s} {'depth':>5s} {'scans':>5s} {'img':>4s}  parameters")
    for name in list_models():
        cfg = model_config(name)
        with torch.device("meta"):
            count = sum(p.numel() for p in build_model(cfg).parameters())
        print(f"{name:16s} {cfg.dim:5d} {cfg.depth:5d} {cfg.scans:5d} {cfg.img_size:4d}  {count / 1e6:.1f}M")


def cmd_demo(argv: list[str]) -> None:
    run_demo(tyro.cli(DemoConfig, args=argv, prog="starmamba demo", use_underscores=True))


def cmd_ablate(argv: list[str]) -> None:
    run_ablation(tyro.cli(AblateConfig, args=argv, prog="starmamba ablate", use_underscores=True))


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "pretrain": cmd_pretrain,
    "finetune": cmd_finetune,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "predict": cmd_predict,
    "list-models": cmd_list_models,
    "demo": cmd_demo,
    "ablate": cmd_ablate,
}


def main(argv: list[str] | None = None) -> int:
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, so that a reader gone away (`| head`) is caught below
    except BrokenPipeError:
        # As Unix tools do when their reader closes the pipe: stop quietly. stdout goes to devnull
        # so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    return code


def _run(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(f"starmamba {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(
            f"starmamba: unknown command {command!r}" + (f"; did you mean {close[0]}?" if close else ""),
            file=sys.stderr,
        )
        print(USAGE, file=sys.stderr)
        return 2
    try:
        COMMANDS[command](rest)
    except (ValueError, FileNotFoundError, PermissionError, RunError) as error:
        print(f"starmamba {command}: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # a training run's checkpoint is written; the message says how to go on
        print(f"starmamba {command}: {stop}", file=sys.stderr)
        return end_process(stop.exit_code)
    except KeyboardInterrupt:
        print(f"starmamba {command}: interrupted", file=sys.stderr)
        return end_process(130)
    except SystemExit as done:  # tyro exits after --help and after a config it refused (already printed)
        return done.code if isinstance(done.code, int) else 2
    return end_process(0)


if __name__ == "__main__":
    sys.exit(main())
