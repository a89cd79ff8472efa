"""run_job's setup and teardown on tiny runs: the output folder claimed, resume said and recovered,
faults turned into one-line errors, and what a run reports at its end."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from starmamba.cli import main
from starmamba.data import Augmented, EvalTransform, build_dataset
from starmamba.errors import RunError
from starmamba.models import build_model, model_config
from starmamba.train import checkpoint as checkpoint_module
from starmamba.train.distributed import Processes
from starmamba.train.finetune import FinetuneTask
from starmamba.train.metrics import read_metrics
from starmamba.train.outdir import OutputDirError, RunLock
from starmamba.train.pretrain import PretrainTask, run_pretrain
from test_train_jobs import TINY, tiny_finetune, tiny_pretrain


def quick(out: Path, **overrides):
    """A 2-step pretraining run (16 images, batch 8, one epoch)."""
    return tiny_pretrain(out, **({"epochs": 1, "limit_train": 16, "limit_val": 4} | overrides))


def assert_same_weights(path: Path, expected: dict[str, torch.Tensor]) -> None:
    actual = load_file(path)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_second_run_into_a_finished_run_is_refused_and_resuming_it_says_already_complete(tmp_path, capsys):
    run_pretrain(quick(tmp_path / "run"))
    before = files_of(tmp_path / "run")
    saved = load_file(tmp_path / "run" / "model.safetensors")
    capsys.readouterr()
    with pytest.raises(OutputDirError, match=r"already holds a run .*--resume auto.*--overwrite"):
        run_pretrain(quick(tmp_path / "run"))
    assert files_of(tmp_path / "run") == before

    summary = run_pretrain(quick(tmp_path / "run", resume="auto"))
    out = capsys.readouterr().out
    assert "resuming from step 2" in out and "already complete" in out
    assert summary["steps"] == 2 and summary["images"] == 0
    assert_same_weights(tmp_path / "run" / "model.safetensors", saved)


def test_a_run_into_a_folder_another_run_holds_fails_before_loading_anything(tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("the data was loaded although the folder is held")

    monkeypatch.setattr(PretrainTask, "load", never)
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"), pytest.raises(OutputDirError, match=r"in use by another run \(pid \d+ on"):
        run_pretrain(quick(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_resume_auto_passes_over_a_truncated_newest_checkpoint_and_still_ends_exactly(tmp_path, capsys):
    config = quick(tmp_path / "run", ckpt_every=1, keep_checkpoints=2)
    run_pretrain(config)
    finished = load_file(tmp_path / "run" / "model.safetensors")
    newest = tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    (tmp_path / "run" / "model.safetensors").unlink()
    capsys.readouterr()

    with pytest.warns(UserWarning, match=r"step-00000002/model.safetensors is truncated.*step-00000001"):
        summary = run_pretrain(quick(tmp_path / "run", ckpt_every=1, keep_checkpoints=2, resume="auto"))
    assert "resuming from step 1" in capsys.readouterr().out
    assert summary["steps"] == 2
    assert_same_weights(tmp_path / "run" / "model.safetensors", finished)


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(RunError) as caught:
        run_pretrain(quick(tmp_path / "run"))
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert str(caught.value).startswith(f"no space left on device while writing {step};")
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]

    # The command line prints it as one line and exits 2.
    monkeypatch.setattr("starmamba.cli.COMMANDS", {"pretrain": lambda argv: run_pretrain(quick(tmp_path / "b"))})
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("starmamba pretrain: error: no space left on device while writing") and "\n" not in err


def test_out_of_memory_suggests_a_smaller_batch_with_the_same_effective_batch(tmp_path, monkeypatch):
    def too_big(self, model, images, labels, generator):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(PretrainTask, "loss", too_big)
    with pytest.raises(RunError, match=r"out of memory on cpu with --batch_size 8: try --batch_size 4 --accum_iter 2 "):
        run_pretrain(quick(tmp_path / "run"))


def test_permission_denied_while_writing_is_one_line_naming_the_file(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/model.safetensors")

    monkeypatch.setattr("starmamba.train.job.export_weights", refused)
    with pytest.raises(RunError, match=r"^permission denied while writing /somewhere/model.safetensors \("):
        run_pretrain(quick(tmp_path / "run"))


def write_folder(root: Path, unreadable: int) -> None:
    """An image folder of 16 px PNGs, 2 classes, 8 training and 4 validation images per class."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.png")
    for index in range(unreadable):
        (root / "train" / "a" / f"{index}.png").write_bytes(b"")


def test_unreadable_training_images_are_counted_in_the_metrics_and_the_summary(tmp_path, capsys):
    write_folder(tmp_path / "data", unreadable=1)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        summary = run_pretrain(quick(tmp_path / "run", data_path=str(tmp_path / "data"), max_unreadable=0.1))
    assert summary["skipped_images"] == 1
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["skipped_images"] == 1
    assert "unreadable images skipped: 1" in capsys.readouterr().out


def test_the_run_names_its_real_model_logs_its_first_step_and_ends_with_a_summary(tmp_path, capsys):
    summary = run_pretrain(quick(tmp_path / "run", log_every=20))
    out = capsys.readouterr().out
    count = sum(t.numel() for t in checkpoint_module.load_weights(tmp_path / "run" / "model.safetensors")[0].values())
    assert f"\nstar (dim 32, depth 2): {count / 1e6:.2f}M, " in out
    assert "no checkpoint, starting fresh" in out
    assert "done: 2 steps (16 images) in " in out and summary["seconds"] > 0
    assert f"results in {tmp_path / 'run'}: model.safetensors, curves.png, reconstructions.png" in out
    with safe_open(tmp_path / "run" / "model.safetensors", framework="pt") as f:
        assert f.metadata()["description"] == "star (dim 32, depth 2)"
        assert f.metadata()["model"] == "star_tiny"  # with the config, what rebuilds it
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "star_tiny"


def test_progress_into_a_file_is_plain_lines_without_carriage_returns(tmp_path, capsys):
    run_pretrain(quick(tmp_path / "run", progress=True, log_every=1))
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1, step ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/1, step 1/2", "epoch 1/1, step 2/2"]
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [float(line.split("loss ")[1].split(",")[0]) for line in lines] == pytest.approx(losses, abs=5e-5)


def test_a_num_classes_given_that_disagrees_with_the_data_is_refused(tmp_path, capsys):
    flags = ["--data_path", "synthetic", "--model", "mambamlp_tiny", "--img_size", "16", "--patch_size", "4",
             "--dim", "32", "--depth", "2", "--output_dir", str(tmp_path / "run"), "--num_workers", "0"]  # fmt: skip
    assert main(["finetune", *flags, "--num_classes", "7"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "starmamba finetune: error: --num_classes 7 disagrees with the 4 classes of synthetic; leave it out "
        "(the data's count is used) or give --num_classes 4\n"
    )
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_num_classes_not_given_is_taken_from_the_data_with_a_note(tmp_path, capsys):
    config = tiny_finetune(tmp_path / "run", arch=model_config("mambamlp_tiny", **TINY, num_classes=7))
    loaded, _ = FinetuneTask().load(config, Processes(0, 1, torch.device("cpu")))
    assert loaded.arch.num_classes == 4
    assert "num_classes 4 (the classes of synthetic), not 7" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--num_classes 7 disagrees with the 4 classes of synthetic"):
        FinetuneTask(num_classes_given=True).load(config, Processes(0, 1, torch.device("cpu")))


def test_the_validation_loss_covers_every_validation_image_asked_for(tmp_path, capsys):
    config = quick(tmp_path / "run", limit_val=11)  # 5 whole sequences of 2 images, in batches of 8 and 2
    run_pretrain(config)
    assert "validation loss on 10 images, 1 left out (not a whole sequence)" in capsys.readouterr().out
    record = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r)
    assert record["val_images"] == 10

    model = build_model(config.arch)
    model.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"))
    model.eval()
    dataset = build_dataset("synthetic", "val", limit=10)
    view = Augmented(dataset, EvalTransform(16, dataset.info.mean, dataset.info.std, crop_pct=1.0))
    with torch.no_grad():
        expected = model(torch.stack([view[i][0] for i in range(10)])).loss.item()  # all 10 in one batch
    assert record["val_loss"] == pytest.approx(expected, rel=1e-5)
