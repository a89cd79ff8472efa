"""``starmamba export``: a run folder becomes a Hub folder that loads back to the same model, with a model card."""

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from starmamba import create_model
from starmamba.cli import main
from starmamba.models import MambaMLPClassifier, StarPretrainer, build_model, model_config
from starmamba.models.loading import load_classifier
from starmamba.train.checkpoint import export_weights
from starmamba.train.config import FinetuneConfig, PretrainConfig, to_dict
from starmamba.train.export import export_run
from starmamba.train.finetune import run_finetune

TINY = dict(img_size=16, patch_size=4, dim=32, depth=2)
METRICS = [
    {"step": 6, "epoch": 1.0, "loss": 1.5, "lr": 1e-3},
    {"step": 6, "epoch": 1.0, "acc1": 40.0, "acc5": 90.0, "ema_acc1": 35.0, "probe_acc1": 30.0},
    {"step": 12, "epoch": 2.0, "loss": 1.25, "lr": 5e-4},
    {"step": 12, "epoch": 2.0, "acc1": 37.5, "acc5": 100.0, "ema_acc1": 45.0, "probe_acc1": 32.5},
]


def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def fake_finetune_run(path: Path, ema: bool = True) -> tuple[MambaMLPClassifier, MambaMLPClassifier]:
    """A finished finetuning run's folder as the jobs write it; returns its model and its EMA."""
    arch = model_config("mambamlp_tiny", **TINY, num_classes=4)
    config = FinetuneConfig(model="mambamlp_tiny", arch=arch, data_path="synthetic", output_dir=str(path),
                            crop_pct=0.75, ema_decay=0.9 if ema else None, blr=3e-4)  # fmt: skip
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_dict(config)))
    (path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in METRICS))
    torch.manual_seed(0)
    model, average = MambaMLPClassifier(arch).eval(), MambaMLPClassifier(arch).eval()
    export_weights(path / "model.safetensors", model.state_dict(), "mambamlp_tiny", arch.to_dict())
    if ema:
        export_weights(path / "ema.safetensors", average.state_dict(), "mambamlp_tiny", arch.to_dict())
    return model, average


@pytest.mark.parametrize("ema", [False, True])
def test_export_loads_back_to_the_runs_weights(tmp_path, ema):
    model, average = fake_finetune_run(tmp_path / "run")
    out = export_run(tmp_path / "run", tmp_path / "hub", ema=ema)
    expected = (average if ema else model)(images())
    assert not torch.equal(expected, (model if ema else average)(images()))  # the two weights differ
    for loaded in (MambaMLPClassifier.from_pretrained(out), create_model("mambamlp_tiny", pretrained=out)):
        assert torch.equal(loaded(images()), expected)
        cfg = loaded.pretrained_cfg
        assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)  # the synthetic data's statistics, not ImageNet's
        assert cfg["crop_pct"] == 0.75 and cfg["architecture"] == "mambamlp_tiny"


def test_model_card_says_what_the_run_measured_and_how_to_load(tmp_path):
    fake_finetune_run(tmp_path / "run")
    card = (export_run(tmp_path / "run", tmp_path / "hub") / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: starmamba" in card and "arxiv:2603.03806" in card
    assert "https://arxiv.org/abs/2603.03806" in card
    # The last evaluation's values, and the best top-1 of each weights (40 at epoch 1, 45 at epoch 2).
    for row in ("| acc1 | 37.5 |", "| acc5 | 100 |", "| ema_acc1 | 45 |", "| probe_acc1 | 32.5 |",
                "| best_acc1 | 40 |", "| best_ema_acc1 | 45 |", "| loss | 1.25 |"):  # fmt: skip
        assert row in card, row
    assert f'create_model("mambamlp_tiny", pretrained="{tmp_path / "hub"}")' in card
    assert '"blr": 0.0003' in card and '"crop_pct": 0.75' in card  # the run's config
    assert f"`starmamba predict {tmp_path / 'hub'} IMAGE_OR_FOLDER ...`" in card


def test_export_of_a_pretraining_run_gives_the_star_model(tmp_path):
    arch = model_config("star_tiny", **TINY, images_per_sequence=1, cluster_size=2)
    run = tmp_path / "pre"
    run.mkdir()
    config = PretrainConfig(model="star_tiny", arch=arch, data_path="synthetic", output_dir=str(run))
    (run / "config.json").write_text(json.dumps(to_dict(config)))
    torch.manual_seed(0)
    model = build_model(arch).eval()
    export_weights(run / "model.safetensors", model.state_dict(), "star_tiny", arch.to_dict())
    out = export_run(run, tmp_path / "hub")
    loaded = StarPretrainer.from_pretrained(out)
    assert torch.equal(loaded(images()).loss, model(images()).loss)
    assert "pretraining run" in (out / "README.md").read_text()


def test_export_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        export_run(tmp_path / "nowhere", tmp_path / "hub")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a starmamba run: it has no config\.json"):
        export_run(tmp_path / "empty", tmp_path / "hub")

    fake_finetune_run(tmp_path / "run")
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        export_run(tmp_path / "run", tmp_path / "hub")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing: the run has not finished"):
        export_run(tmp_path / "run", tmp_path / "hub")

    fake_finetune_run(tmp_path / "plain", ema=False)
    with pytest.raises(ValueError, match="kept no EMA"):
        export_run(tmp_path / "plain", tmp_path / "hub", ema=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        export_run(tmp_path / "plain", tmp_path / "full")
    assert not (tmp_path / "hub").exists()


def test_export_command_reports_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "hub")]) == 2
    assert "starmamba export: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_trained_run_exported_by_the_command_gives_identical_logits(tmp_path):
    arch = model_config("mambamlp_tiny", **TINY, drop_path=0.1)
    run_finetune(FinetuneConfig(model="mambamlp_tiny", arch=arch, data_path="synthetic", batch_size=8, epochs=1,
                                output_dir=str(tmp_path / "run"), limit_train=32, limit_val=16, num_workers=0,
                                progress=False, tensorboard=False, ema_decay=0.9))  # fmt: skip
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hub")]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hub_ema"), "--ema"]) == 0
    for hub, ema in (("hub", False), ("hub_ema", True)):
        trained, _ = load_classifier(tmp_path / "run", ema=ema)
        expected = trained.eval()(images())
        assert torch.equal(MambaMLPClassifier.from_pretrained(tmp_path / hub)(images()), expected)
        assert torch.equal(create_model("mambamlp_tiny", pretrained=tmp_path / hub)(images()), expected)


def test_export_onnx_agrees_with_pytorch_at_any_batch_size(tmp_path):
    model, _ = fake_finetune_run(tmp_path / "run", ema=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():  # weights whose logits are far from 0
            tensor.add_(torch.randn_like(tensor) * 0.1)
    export_weights(tmp_path / "run" / "model.safetensors", model.state_dict(), "mambamlp_tiny", model.cfg.to_dict())
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hub"), "--onnx"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "hub" / "model.onnx"), providers=["CPUExecutionProvider"])
    (images_in,), (logits_out,) = session.get_inputs(), session.get_outputs()
    assert (images_in.name, images_in.shape) == ("images", ["batch", 3, 16, 16])
    assert (logits_out.name, logits_out.shape) == ("logits", ["batch", 4])
    loaded = MambaMLPClassifier.from_pretrained(tmp_path / "hub")
    generator = torch.Generator().manual_seed(2)
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16, generator=generator)
        with torch.no_grad():
            expected = loaded(x).numpy()
        assert np.abs(expected).max() > 0.5
        np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], expected, rtol=0, atol=1e-3)


def test_export_onnx_refuses_a_pretraining_run_before_writing(tmp_path):
    arch = model_config("star_tiny", **TINY, images_per_sequence=1, cluster_size=2)
    run = tmp_path / "pre"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(PretrainConfig(model="star_tiny", arch=arch))))
    export_weights(run / "model.safetensors", build_model(arch).state_dict(), "star_tiny", arch.to_dict())
    with pytest.raises(ValueError, match=r"--onnx exports classifiers; .* is a pretraining run"):
        export_run(run, tmp_path / "hub", onnx=True)
    assert not (tmp_path / "hub").exists()
