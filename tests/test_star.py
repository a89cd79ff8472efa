"""The STAR pretraining model: its loss, no information leak, learning, and every ablation option."""

from typing import get_args

import pytest
import torch

from starmamba.models import create_model
from starmamba.models.layout import TARGET_GROUPS, SeparatorPosition, SeparatorType, SeparatorValue
from starmamba.models.star import normalize_patches, patchify, unpatchify
from starmamba.train.optim import layer_ids


def tiny_star(**overrides):
    options = dict(img_size=16, patch_size=4, cluster_size=2, dim=32, depth=2, decoder_dim=32,
                   decoder_head_dim=16, images_per_sequence=2) | overrides  # fmt: skip
    return create_model("star_tiny", **options)


def test_patchify_round_trip_and_order():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4x4 block; its first pixel is (row 0, col 4), channels last.
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 4].item() for c in range(3)]
    assert torch.equal(unpatchify(patches, 4, 3), images)


def test_perfect_prediction_has_zero_loss():
    torch.manual_seed(0)
    model = tiny_star()
    images = torch.randn(4, 3, 16, 16)
    model.decode = lambda memories: model.targets(model._sequences(images))
    assert model(images).loss.item() == 0.0


def test_known_loss_when_the_head_predicts_zeros():
    torch.manual_seed(0)
    model = tiny_star(separator_position="SC")
    with torch.no_grad():
        model.pixel_head.weight.zero_()
        model.pixel_head.bias.zero_()
    images = torch.randn(4, 3, 16, 16)
    out = model(images)
    # A normalised patch of n = 48 values has sum of squares (n-1) var / (var + eps) ~ n - 1.
    # Per sequence: 2 images x (4 clusters + a separator of 4 tokens) = 40 queries; the 8
    # separator-token targets are constant patches, which normalise to exactly zero.
    assert out.pred.shape == out.target.shape == (2, 40, 48)
    expected = (32 / 40) * (47 / 48)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    assert torch.equal(out.target[:, 16:20], torch.zeros(2, 4, 48))  # image 1's separator


def unit_of_queries(layout):
    """Stream index of the unit every query predicts."""
    return torch.tensor([p.target for p in layout.predictions for _ in range(layout.target_unit(p).num_tokens)])


@pytest.mark.parametrize(
    "overrides",
    [
        {"separator": "cluster", "separator_position": "SC"},
        {"separator": "cluster", "separator_position": "CS"},
        {"separator": "cluster", "separator_position": "SCS"},
        {"separator": "cluster", "separator_position": "CSC"},
        {"separator": "token"},
        {"separator": "none"},
    ],
    ids=lambda o: "-".join(o.values()),
)
@pytest.mark.parametrize("context", ["image", "sequence"])
def test_no_information_leaks_from_a_cluster_to_earlier_targets(overrides, context):
    torch.manual_seed(0)
    model = tiny_star(images_per_sequence=3, decoder_context=context, **overrides).eval()
    layout = model.layout
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        base = model(images).pred
    query_unit = unit_of_queries(layout)
    for unit_index, unit in enumerate(layout.units):
        if unit.kind != "cluster" or unit.cluster not in (0, 3):
            continue
        patch = layout.cluster_patches(unit.cluster)[-1]
        row, col = divmod(patch, layout.grid[1])
        changed = images.clone()
        changed[unit.image, :, row * 4 + 1, col * 4 + 2] += 5.0  # one pixel of that cluster
        with torch.no_grad():
            pred = model(changed).pred
        differs = (pred - base).abs().amax(dim=(0, 2)) > 1e-6
        assert not differs[query_unit <= unit_index].any(), f"target <= unit {unit_index} saw its pixels"
        later = query_unit > unit_index
        if later.any():
            assert differs[later].any(), f"no target after unit {unit_index} reacts"


def test_a_gradient_step_lowers_the_loss():
    torch.manual_seed(0)
    model = tiny_star()
    images = torch.randn(4, 3, 16, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(images).loss
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(images).loss
        loss.backward()
        optimizer.step()
    assert model(images).loss.item() < 0.9 * first.item()


ABLATIONS = (
    [{"separator": s} for s in ("none", "token", "cluster")]
    + [{"separator_value": v} for v in ("zeros", "ones", "embedding", "identity")]
    + [{"separator_position": p} for p in ("SC", "CS", "SCS", "CSC")]
    + [{"images_per_sequence": n} for n in (1, 2, 4)]
    + [{"images_per_sequence": 1, "separator": "none"}]  # ARM
    + [{"separator": "token", "separator_value": v} for v in ("ones", "embedding")]
    + [{"norm_pix_loss": False}]
)


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_builds_and_trains(overrides):
    torch.manual_seed(0)
    model = tiny_star(**overrides)
    n = model.cfg.images_per_sequence
    images = torch.randn(2 * n, 3, 16, 16)
    out = model(images)
    layout = model.layout
    assert out.pred.shape == (2, layout.num_queries, 48)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    recon = model.reconstruct(images, out)
    assert recon.shape == images.shape


def test_separator_tokens_follow_the_value():
    model = tiny_star(separator_value="identity")
    tokens = model.separator_tokens() - model.separator_pos_embed
    torch.testing.assert_close(tokens[:, 0], torch.eye(2).flatten())
    ones = tiny_star(separator_value="ones")
    torch.testing.assert_close(ones.separator_tokens() - ones.separator_pos_embed, torch.ones(4, 32))


def test_constant_separator_values_are_one_function_under_layer_norm():
    """Zeros, Ones and Identity separator tokens differ only by a per-token constant across
    channels, which every LayerNorm subtracts, and their pixel targets are constant patches that
    normalise to zero: the three give the same loss and gradients. A learned embedding does not.
    (This is why Table 2's Zeros/Ones/Identity rows agree in our ablation runs.)"""
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss_and_grad(value):
        torch.manual_seed(0)
        model = tiny_star(separator_value=value).double()
        loss = model(images).loss
        loss.backward()
        return loss.item(), model.encoder.patch_embed.proj.weight.grad

    zeros_loss, zeros_grad = loss_and_grad("zeros")
    for value in ("ones", "identity"):
        loss, grad = loss_and_grad(value)
        assert loss == pytest.approx(zeros_loss, rel=1e-12)
        torch.testing.assert_close(grad, zeros_grad, rtol=1e-10, atol=1e-12)
    assert loss_and_grad("embedding")[0] != pytest.approx(zeros_loss, rel=1e-6)


def test_five_dimensional_input_equals_flat_input():
    torch.manual_seed(0)
    model = tiny_star().eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        flat = model(images).loss
        grouped = model(images.view(2, 2, 3, 16, 16)).loss
    assert flat.item() == grouped.item()


def test_batch_that_does_not_form_sequences_is_a_clear_error():
    model = tiny_star(images_per_sequence=2)
    with pytest.raises(ValueError, match="do not form sequences of images_per_sequence=2"):
        model(torch.randn(3, 3, 16, 16))
    with pytest.raises(ValueError, match="got 3 images per sequence"):
        model(torch.randn(1, 3, 3, 16, 16))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"scans": 4}, "unknown option"),  # pretraining predicts causally: one scan, not an option
        ({"cluster_size": 3}, "does not divide the grid"),
        ({"images_per_sequence": 0}, "images_per_sequence=0"),
        ({"feature_layers": (1, 2)}, "feature_layers"),
        ({"decoder_dim": 40}, "decoder_dim=40"),
    ],
)
def test_invalid_star_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_star(**overrides)


def test_default_feature_levels_follow_arm():
    from starmamba.models import model_config

    assert model_config("star_base").levels == (6, 8, 10, 12)
    assert model_config("star_large").levels == (12, 16, 20, 24)


def test_norm_pix_matches_mae():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    expected = (x - 3.0) / (torch.tensor(14.0 / 3) + 1e-6).sqrt()
    torch.testing.assert_close(normalize_patches(x), expected)


def test_no_decay_and_layer_ids():
    model = tiny_star(separator_value="embedding")
    assert "encoder.pos_embed" in dict(model.named_buffers())  # fixed sin-cos while pretraining
    skipped = model.no_weight_decay()
    for name in ("separator_pos_embed", "separator_value_token", "ar_token", "decoder_separator_pos_embed",
                 "encoder.blocks.0.mixer.directions.0.A_log", "encoder.blocks.0.mixer.directions.0.D",
                 "encoder.blocks.0.norm1.weight", "decoder.blocks.0.q.bias"):  # fmt: skip
        assert name in skipped, name
    assert "encoder.blocks.0.mixer.in_proj.weight" not in skipped
    assert "decoder.blocks.0.q.weight" not in skipped
    layers, num_layers = layer_ids(model)
    assert num_layers == model.cfg.depth + 2
    assert layers["encoder.blocks.1.mlp.w1.weight"] == 2
    assert layers["encoder.patch_embed.proj.weight"] == layers["separator_pos_embed"] == 0
    assert layers["decoder.blocks.0.q.weight"] == layers["decoder_separator_pos_embed"] == num_layers - 1


@pytest.mark.slow
def test_star_base_forward_and_backward_on_cpu():
    torch.manual_seed(0)
    model = create_model("star_base")
    assert model.layout.num_tokens == 1280
    out = model(torch.randn(8, 3, 192, 192))
    assert out.pred.shape == (1, 1280, 768)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("option, choices", [("separator", SeparatorType), ("separator_value", SeparatorValue),
                                              ("separator_position", SeparatorPosition)])  # fmt: skip
def test_the_ablation_tests_cover_every_choice_the_library_offers(option, choices):
    assert {o[option] for o in ABLATIONS if option in o} == set(get_args(choices))


def test_group_losses_and_floors_match_a_hand_computation():
    """Each target group's loss and floor are means over that group's queries of the squared error
    and of the squared target; the groups' losses weighted by their query counts give the loss."""
    torch.manual_seed(0)
    model = tiny_star().eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = model(images)
    groups = model.layout.query_group
    error = (out.pred - out.target).pow(2).mean(-1)
    total = 0.0
    for index, name in enumerate(TARGET_GROUPS):
        members = groups == index
        if not members.any():
            assert f"loss_{name}" not in out.groups
            continue
        torch.testing.assert_close(out.groups[f"loss_{name}"], error[:, members].mean())
        torch.testing.assert_close(out.groups[f"floor_{name}"], out.target[:, members].pow(2).mean())
        total += out.groups[f"loss_{name}"] * members.sum() / len(groups)
    torch.testing.assert_close(total, out.loss)
    assert set(model.target_groups) == {"separator", "first_cluster", "cluster"}


def test_decoder_context_is_a_model_option():
    image = create_model("star_tiny", img_size=64, images_per_sequence=2)
    sequence = create_model("star_tiny", img_size=64, images_per_sequence=2, decoder_context="sequence")
    assert image.cfg.decoder_context == "image"
    assert torch.equal(image.decoder_mask, image.layout.decoder_mask)
    assert (image.decoder_mask.sum() < sequence.decoder_mask.sum()).item()
    with pytest.raises(ValueError, match="decoder_context='all'"):
        create_model("star_tiny", decoder_context="all")
