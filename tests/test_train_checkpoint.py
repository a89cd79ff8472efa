"""Checkpoints: round trips, ``latest``, pruning, crashes mid-save, compatibility errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from starmamba.files import write_json
from starmamba.models.weights import check_compatible, load_weights
from starmamba.train import checkpoint as ckpt
from starmamba.train.checkpoint import export_weights, latest_checkpoint, load_checkpoint, save_checkpoint

CONFIG = {"dim": 4, "depths": [1, 2], "name": "tiny"}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def trained(model: nn.Module) -> torch.optim.AdamW:
    """An optimizer that has taken one step, so it has state to save."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return optimizer


def save(run_dir: Path, step: int, model: nn.Module, **kwargs) -> Path:
    state = {
        "model": model.state_dict(),
        "ema": None,
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "position": {"epoch": 0, "step": step, "global_step": step},
    }
    return save_checkpoint(run_dir, state, model_name="tiny", model_config=CONFIG, run_config={"epochs": 3}, **kwargs)


def assert_same_state(loaded: dict, expected: dict) -> None:
    assert sorted(loaded) == sorted(expected)  # safetensors stores keys in its own order
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key


def test_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = trained(model)
    ema = tiny_model(seed=1)
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": {"epoch": 2, "step": 3, "global_step": 7},
    }
    run_config = {"epochs": 3, "betas": [0.9, 0.95]}
    path = save_checkpoint(tmp_path, state, model_name="tiny", model_config=CONFIG, run_config=run_config)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000007"]
    assert sorted(os.listdir(path)) == ["ema.safetensors", "model.safetensors", "training_state.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000007\n"
    assert latest_checkpoint(tmp_path) == path

    weights, meta = load_weights(path)
    assert_same_state(weights, model.state_dict())
    assert weights["1.num_batches_tracked"].dtype == torch.int64
    assert meta == {"format": "starmamba", "model": "tiny", "config": CONFIG}
    _, ema_meta = load_weights(path / "ema.safetensors")
    assert ema_meta == meta

    loaded = load_checkpoint(path)
    assert sorted(loaded) == ["ema", "model", "optimizer", "position", "run_config", "scaler"]
    assert_same_state(loaded["model"], model.state_dict())
    assert_same_state(loaded["ema"], ema.state_dict())
    assert loaded["position"] == {"epoch": 2, "step": 3, "global_step": 7}
    assert loaded["run_config"] == run_config
    fresh = torch.optim.AdamW(tiny_model(seed=2).parameters(), lr=1e-2)
    fresh.load_state_dict(loaded["optimizer"])
    for saved, restored in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved)


def test_a_checkpoint_without_ema_loads_as_none(tmp_path: Path) -> None:
    assert load_checkpoint(save(tmp_path, 1, tiny_model()))["ema"] is None


def test_loading_a_folder_that_is_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not a training checkpoint: it has no training_state\.pt"):
        load_checkpoint(tmp_path)


def test_latest_is_none_without_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None


def test_latest_naming_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000003\n")
    with pytest.raises(FileNotFoundError, match="step-00000003"):
        latest_checkpoint(tmp_path)


def test_keep_last_prunes_older_checkpoints(tmp_path: Path) -> None:
    model = tiny_model()
    for step in (1, 2, 3):
        save(tmp_path, step, model, keep_last=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000002", "step-00000003"]
    save(tmp_path, 4, model)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_checkpoints_of_later_steps_are_left_alone(tmp_path: Path) -> None:
    model = tiny_model()
    save(tmp_path, 9, model)
    save(tmp_path, 2, model)  # a restarted run, saving earlier steps over an old one
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000002", "step-00000009"]
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def fail_on_replace(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make ``os.replace`` raise, as a crash would stop the save, when it would create ``target``."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == target:
            raise OSError(f"simulated crash before creating {target}")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_crash_before_pointer_update_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    save(tmp_path, 1, first)
    with monkeypatch.context() as patch:
        fail_on_replace(patch, "latest")
        with pytest.raises(OSError, match="simulated crash"):
            save(tmp_path, 2, second)
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert_same_state(load_weights(latest_checkpoint(tmp_path))[0], first.state_dict())
    save(tmp_path, 3, second)  # the next save cleans up what the crash left behind
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000003"]


def test_failed_write_leaves_no_partial_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save(tmp_path, 1, tiny_model())

    def full_disk(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError, match="no space"):
        save(tmp_path, 2, tiny_model())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000001"]


def test_a_step_left_by_a_cut_short_save_is_replaced(tmp_path: Path, monkeypatch) -> None:
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    save(tmp_path, 4, first)
    with monkeypatch.context() as patch:
        fail_on_replace(patch, "latest")  # step-5 is in place, latest still names step-4
        with pytest.raises(OSError, match="simulated crash"):
            save(tmp_path, 5, first)
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    path = save(tmp_path, 5, second)  # the resumed run saves step 5 again
    assert_same_state(load_weights(path)[0], second.state_dict())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000005"]


def test_unloadable_values_are_refused_before_writing(tmp_path: Path) -> None:
    state = {"model": {}, "optimizer": {"where": tmp_path}, "position": {"epoch": 0, "step": 1, "global_step": 1}}
    with pytest.raises(TypeError, match=r"training_state\['optimizer'\]\['where'\] is a \w*Path"):
        save_checkpoint(tmp_path, state, model_name="tiny", model_config=CONFIG, run_config={})
    assert not (tmp_path / "checkpoints").exists()


def test_export_weights(tmp_path: Path) -> None:
    model = tiny_model()
    target = tmp_path / "out" / "model.safetensors"
    export_weights(target, model.state_dict(), "tiny", CONFIG)
    assert os.listdir(target.parent) == ["model.safetensors"]
    weights, meta = load_weights(target)
    assert_same_state(weights, model.state_dict())
    assert meta == {"format": "starmamba", "model": "tiny", "config": CONFIG}


def test_export_copies_tied_and_strided_tensors(tmp_path: Path) -> None:
    shared = torch.arange(12.0).view(3, 4)
    state = {"a": shared, "tied": shared, "transposed": shared.t()}
    export_weights(tmp_path / "w.safetensors", state, "tiny", CONFIG)
    weights, _ = load_weights(tmp_path / "w.safetensors")
    assert_same_state(weights, state)


def test_load_weights_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_weights(tmp_path / "nothing.safetensors")


def test_check_compatible_accepts_a_fitting_state() -> None:
    check_compatible(tiny_model().state_dict(), tiny_model(), source="x")


def test_check_compatible_names_every_problem() -> None:
    state = tiny_model().state_dict()
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(3, 4)
    with pytest.raises(ValueError) as error:
        check_compatible(state, tiny_model(), source="runs/x/checkpoints/step-00000001")
    assert str(error.value) == (
        "runs/x/checkpoints/step-00000001 does not fit Sequential: 1 missing keys: 0.bias; "
        "1 unexpected keys: extra.weight; 1 shape mismatches (checkpoint vs model): 2.weight (3, 4) vs (2, 4)"
    )


def test_check_compatible_shortens_long_lists() -> None:
    with pytest.raises(
        ValueError, match=r"^other\.pt does not fit Sequential: 9 missing keys: 0\.weight, .*\(4 more\)$"
    ):
        check_compatible({}, tiny_model(), source="other.pt")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_weight_files_get_the_permissions_of_the_runs_other_files(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        export_weights(tmp_path / "model.safetensors", tiny_model().state_dict(), "tiny", CONFIG)
        checkpoint = save(tmp_path, 1, tiny_model())
        write_json(tmp_path / "config.json", {})
    finally:
        os.umask(previous)
    files = ["model.safetensors", "checkpoints/step-00000001/model.safetensors",
             "checkpoints/step-00000001/training_state.pt", "config.json"]  # fmt: skip
    assert checkpoint == tmp_path / "checkpoints" / "step-00000001"
    assert {name: oct((tmp_path / name).stat().st_mode & 0o777) for name in files} == dict.fromkeys(files, oct(mode))
