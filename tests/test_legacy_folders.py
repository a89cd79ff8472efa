"""Folders written by an earlier version (tests/fixtures/legacy, see its make.py) load to the same numbers."""

import json
from pathlib import Path

import pytest
import torch

from starmamba import create_model
from starmamba.models import MambaMLPClassifier, StarPretrainer
from starmamba.models.loading import load_classifier, load_model, load_probe_model
from starmamba.train.export import export_run

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(25))


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize(("ema", "key"), [(False, "finetune_logits"), (True, "finetune_ema_logits")])
def test_finetune_run_folder_loads_to_the_same_logits(ema, key):
    model, _ = load_classifier(LEGACY / "finetune", ema=ema)
    close(model.eval()(images()), EXPECTED[key])


@torch.no_grad()
def test_pretrain_run_folder_loads_to_the_same_loss_and_features():
    model, _ = load_probe_model(LEGACY / "pretrain")
    assert isinstance(model, StarPretrainer)
    model.eval()
    assert model(images()).loss.item() == pytest.approx(EXPECTED["pretrain_loss"], rel=1e-5)
    close(model.pooled_features(images()), EXPECTED["pretrain_pooled"])


@torch.no_grad()
def test_hub_folders_load_to_the_same_numbers():
    classifier = create_model("mambamlp_tiny", pretrained=LEGACY / "hub_finetune")
    assert isinstance(classifier, MambaMLPClassifier)
    close(classifier(images()), EXPECTED["finetune_logits"])
    star = StarPretrainer.from_pretrained(LEGACY / "hub_pretrain")
    assert star(images()).loss.item() == pytest.approx(EXPECTED["pretrain_loss"], rel=1e-5)


def test_a_legacy_run_exports_to_a_folder_that_loads_back(tmp_path):
    out = export_run(LEGACY / "finetune", tmp_path / "hub")
    with torch.no_grad():
        close(create_model("mambamlp_tiny", pretrained=out)(images()), EXPECTED["finetune_logits"])


@torch.no_grad()
def test_one_loader_reads_every_kind_of_folder():
    assert isinstance(load_model(LEGACY / "pretrain"), StarPretrainer)
    assert isinstance(load_model(LEGACY / "hub_pretrain"), StarPretrainer)
    for folder in ("finetune", "hub_finetune"):
        close(load_model(LEGACY / folder).eval()(images()), EXPECTED["finetune_logits"])
    close(load_model(LEGACY / "finetune", ema=True).eval()(images()), EXPECTED["finetune_ema_logits"])


def test_a_pretraining_saved_before_decoder_context_keeps_the_sequence_context():
    """The fixture was written before the option existed, when every query saw the whole sequence."""
    model, _ = load_probe_model(LEGACY / "pretrain")
    assert model.cfg.decoder_context == "sequence"
    assert create_model("star_tiny").cfg.decoder_context == "image"  # today's default for new models


def test_a_pretraining_config_saved_before_decoder_context_reruns_with_the_sequence_context():
    from starmamba.train.config import PretrainConfig, load_config_file

    config = load_config_file(LEGACY / "pretrain" / "config.json", PretrainConfig, PretrainConfig())
    assert config.arch.decoder_context == "sequence"
    hub = StarPretrainer.from_pretrained(LEGACY / "hub_pretrain")
    assert hub.cfg.decoder_context == "sequence"
