"""Files that are not what they should be: one clear line naming the file, exit code 2, no traceback."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from starmamba.cli import main
from starmamba.models import build_model, model_config
from starmamba.models.loading import load_pretrained_state
from starmamba.models.weights import load_weights
from starmamba.train.checkpoint import export_weights, load_training_state
from starmamba.train.config import to_dict
from test_train_jobs import TINY, tiny_pretrain


def classifier_weights(path: Path) -> Path:
    arch = model_config("mambamlp_tiny", **TINY, num_classes=4)
    export_weights(path, build_model(arch).state_dict(), "mambamlp_tiny", arch.to_dict())
    return path


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_a_truncated_safetensors_file_is_named(tmp_path, keep):
    path = truncated(classifier_weights(tmp_path / "model.safetensors"), keep)
    with pytest.raises(ValueError, match=f"^{path} is truncated or not a safetensors file \\(Error while deserial"):
        load_weights(path)


def test_evaluate_a_truncated_checkpoint(capsys, tmp_path):
    truncated(classifier_weights(tmp_path / "run" / "model.safetensors"))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data_path", "synthetic"]) == 2
    assert one_line_error(capsys).startswith(
        f"starmamba evaluate: error: {tmp_path / 'run' / 'model.safetensors'} is truncated or not a safetensors file"
    )


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "EOFError"),
        (b"not a checkpoint at all\n", "Unsupported operand"),
        ("zip", "PytorchStreamReader failed reading zip archive"),
        ("object", "Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global"),
    ],
)
def test_a_pth_that_is_not_a_checkpoint(capsys, tmp_path, content, reason):
    path = tmp_path / "weights.pth"
    if content == "zip":
        torch.save({"model": {"w": torch.ones(100)}}, path)
        truncated(path)
    elif content == "object":
        torch.save(collections.OrderedDict(model=nn.Linear(2, 2)), path)  # a pickled module, not weights
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path} is not a PyTorch checkpoint that loads safely"):
        load_pretrained_state(path)
    assert main(["evaluate", "--checkpoint", str(path), "--data_path", "synthetic"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"starmamba evaluate: error: {path} is not a PyTorch checkpoint that loads safely (")
    assert reason in line


def test_a_weights_file_where_a_training_checkpoint_is_expected(tmp_path):
    weights = classifier_weights(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"^{weights} is a weights file, not a training checkpoint; resume from"):
        load_training_state(weights)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="it is a run folder: resume with --resume auto and --output_dir"):
        load_training_state(tmp_path / "run")


def test_a_truncated_training_state_is_named(tmp_path):
    (tmp_path / "step").mkdir()
    torch.save({"epoch": 1, "optimizer": {"w": torch.ones(1000)}}, tmp_path / "step" / "training_state.pt")
    path = truncated(tmp_path / "step" / "training_state.pt")
    with pytest.raises(ValueError, match=f"^{path} is truncated or corrupt \\(PytorchStreamReader failed"):
        load_training_state(tmp_path / "step")


def test_resume_from_a_weights_file_is_one_line(capsys, tmp_path):
    cfg = tiny_pretrain(tmp_path / "run", epochs=1)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    weights = tmp_path / "pre.safetensors"
    export_weights(weights, build_model(cfg.arch).state_dict(), cfg.model, cfg.arch.to_dict())
    assert main(["pretrain", "--config", str(config), "--resume", str(weights)]) == 2
    assert one_line_error(capsys) == (
        f"starmamba pretrain: error: {weights} is a weights file, not a training checkpoint; resume from a "
        "checkpoint directory (<run>/checkpoints/step-*) or with --resume auto"
    )
