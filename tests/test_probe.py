"""Frozen-feature probes: the k-NN vote, the linear probe's optimum, and which features are pooled."""

import math

import pytest
import torch
import torch.nn.functional as F

from starmamba.cli import main
from starmamba.models import build_model, model_config
from starmamba.train.checkpoint import export_weights
from starmamba.train.probe import fit_linear, knn_predict, pooled_features, probe_top1, standardise

TINY = dict(img_size=16, patch_size=4, dim=32, depth=2)


def test_knn_vote_matches_hand_computed_weights():
    # Test point (1, 0). Neighbours: class 0 at cos 1 and cos 0; class 1 at cos 0.8 (twice).
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[2.0, 0.0]])
    # k=3 picks cos 1 (class 0) and the two cos-0.8 neighbours (class 1):
    # class 0 weight e^(1/T), class 1 weight 2 e^(0.8/T); with T = 0.07 class 0 wins (e^(0.2/0.07) > 2) ...
    assert knn_predict(train, labels, test, num_classes=3, k=3, temperature=0.07).tolist() == [0]
    # ... with T = 1, 2 e^0.8 = 4.45 > e^1 = 2.72: class 1 wins.
    assert knn_predict(train, labels, test, num_classes=3, k=3, temperature=1.0).tolist() == [1]
    # The crossing is at T = 0.2 / ln 2 = 0.2885: just below it class 0, just above class 1.
    assert knn_predict(train, labels, test, num_classes=3, k=3, temperature=0.28).tolist() == [0]
    assert knn_predict(train, labels, test, num_classes=3, k=3, temperature=0.30).tolist() == [1]
    # k=1 is the nearest neighbour whatever the temperature.
    assert knn_predict(train, labels, test, num_classes=3, k=1, temperature=1.0).tolist() == [0]


def test_knn_refuses_bad_options():
    train, labels = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="k=0"):
        knn_predict(train, labels, train, 2, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, train, 2, temperature=0.0)


def two_clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    return centres[labels] + 0.3 * torch.randn(n, 3, generator=generator), labels


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_probes_separate_well_separated_clusters(probe):
    train, train_labels = two_clusters(60, seed=0)
    test, test_labels = two_clusters(40, seed=1)
    assert probe_top1(probe, train, train_labels, test, test_labels, num_classes=2) == 100.0
    # Labels shuffled against the features: a probe cannot reach 100%.
    wrong = test_labels[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    assert probe_top1(probe, train, train_labels, test, wrong, num_classes=2) < 80.0


def test_standardise_uses_the_training_statistics():
    train, other = torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0]])
    scaled_train, scaled_other = standardise(train, other, eps=0.0)
    assert scaled_train.flatten().tolist() == [-1.0, 1.0]  # mean 2, population std 1
    assert scaled_other.item() == 3.0


def test_linear_probe_reaches_the_known_optimum():
    # x = +-1, one per class, loss = mean CE + wd/2 ||W||^2. By symmetry the optimum has
    # W = [[-a], [a]], b = 0, loss log(1 + e^(-2a)) + wd a^2; stationary where wd * a = 1 / (1 + e^(2a)).
    wd = 0.1
    lo, hi = 0.0, 10.0
    for _ in range(200):  # bisection on a strictly increasing function
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if wd * mid < 1 / (1 + math.exp(2 * mid)) else (lo, mid)
    linear = fit_linear(torch.tensor([[-1.0], [1.0]]), torch.tensor([0, 1]), num_classes=2, weight_decay=wd)
    weight = linear.weight.detach().flatten()
    assert weight[1].item() == pytest.approx(lo, abs=1e-6)
    assert weight[0].item() == pytest.approx(-lo, abs=1e-6)
    assert linear.bias.detach().abs().max().item() < 1e-6


def star_model(**options):
    torch.manual_seed(0)
    options = TINY | dict(cluster_size=2, decoder_dim=32, decoder_head_dim=16) | options
    return build_model(model_config("star_tiny", **options)).eval()


@pytest.mark.parametrize("options", [{}, {"separator_position": "SCS", "separator": "token", "images_per_sequence": 2}])
def test_pretrained_features_are_the_first_image_of_a_pretraining_sequence(options):
    # The probe reads an image as the pretraining encoder read the first image of a sequence
    # (its separator in front, one causal scan): rebuild that from the whole sequence's forward pass.
    model = star_model(**options)
    n = model.cfg.images_per_sequence
    images = torch.randn(n, 3, 16, 16)
    with torch.no_grad():
        tokens = model.encoder.embed(images).reshape(1, -1, model.cfg.dim)
        if model.cfg.separator != "none":
            tokens = torch.cat([tokens, model.separator_tokens()[None]], dim=1)
        out, _ = model.encoder(tokens.index_select(1, model.encoder_index), None)
    layout = model.cfg.layout
    first = (layout.token_image == 0) & (layout.token_patch >= 0)
    expected = F.layer_norm(out[0, first], (model.cfg.dim,)).mean(dim=0)
    torch.testing.assert_close(pooled_features(model, images[:1])[0], expected)
    # An image's features do not depend on the other images of the batch.
    torch.testing.assert_close(pooled_features(model, images[:2])[0], pooled_features(model, images[:1])[0])


def test_arm_features_scan_the_clusters_in_order():
    model = star_model(separator="none", images_per_sequence=1)
    layout = model.cfg.layout
    order = [p for c in range(layout.cluster_grid[0] * layout.cluster_grid[1]) for p in layout.cluster_patches(c)]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out, _ = model.encoder(model.encoder.embed(images)[:, order], None)
    expected = F.layer_norm(out, (model.cfg.dim,)).mean(dim=1)
    torch.testing.assert_close(pooled_features(model, images), expected)
    # The scan is causal: the features change when the patches are read in another order.
    with torch.no_grad():
        shuffled, _ = model.encoder(model.encoder.embed(images), None)
    assert not torch.allclose(F.layer_norm(shuffled, (model.cfg.dim,)).mean(dim=1), expected, atol=1e-4)


def test_classifier_features_are_its_mean_readout():
    torch.manual_seed(0)
    model = build_model(model_config("mambamlp_tiny", **TINY, num_classes=3)).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(pooled_features(model, images), expected)


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_evaluate_probe_reads_a_pretraining_checkpoint(tmp_path, capsys, probe):
    model = star_model(img_size=32)
    export_weights(tmp_path / "model.safetensors", model.state_dict(), "star_tiny", model.cfg.to_dict())
    args = ["evaluate", "--checkpoint", str(tmp_path / "model.safetensors"), "--data_path", "synthetic",
            "--probe", probe, "--num_workers", "0", "--device", "cpu", "--limit_train", "128",
            "--limit_val", "64"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pretrained encoder" in out and "128 training, 64 validation images" in out
    top1 = float(out.split("probe top-1 ")[1].split("%")[0])
    assert top1 > 50.0  # 4 synthetic classes of distinct colours: even a random encoder's features separate them
