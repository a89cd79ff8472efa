"""Parameter groups with layer-wise lr decay, AdamW built from them, and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from starmamba.models import MambaMLPClassifier, model_config
from starmamba.train.optim import build_adamw, param_groups
from starmamba.train.schedule import effective_lr, lr_at, set_lr


class Layered(nn.Module):
    """timm's protocol by hand: embeddings (the stem), three blocks, then norm and head, which no pattern
    matches (timm puts them last); 1-d params and pos_embed skip decay."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, 8))
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} | {name for name, param in self.named_parameters() if param.ndim <= 1}

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {"stem": r"^embed\.|^pos_embed$", "blocks": r"^blocks\.(\d+)\."}


def test_groups_by_layer_and_decay() -> None:
    model = Layered()
    model.blocks[2].bias.requires_grad_(False)  # frozen: no group of its own
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    summary = [(g["names"], g["weight_decay"], g["lr_scale"]) for g in groups]
    assert summary == [
        (["pos_embed", "embed.bias"], 0.0, 1 / 16),
        (["embed.weight"], 0.05, 1 / 16),
        (["blocks.0.bias"], 0.0, 1 / 8),
        (["blocks.0.weight"], 0.05, 1 / 8),
        (["blocks.1.bias"], 0.0, 1 / 4),
        (["blocks.1.weight"], 0.05, 1 / 4),
        (["blocks.2.weight"], 0.05, 1 / 2),
        (["norm.weight", "norm.bias", "head.bias"], 0.0, 1.0),
        (["head.weight"], 0.05, 1.0),
    ]
    named = dict(model.named_parameters())
    for group in groups:
        assert all(p is named[n] for p, n in zip(group["params"], group["names"], strict=True))


def test_groups_without_layer_decay_all_scale_one() -> None:
    groups = param_groups(Layered(), weight_decay=0.1)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == len(list(Layered().parameters()))


@pytest.mark.parametrize("decay_a_log", [False, True])
def test_a_log_is_decayed_only_when_asked_as_arm_does(decay_a_log) -> None:
    model = model_config("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2)
    groups = param_groups(MambaMLPClassifier(model), weight_decay=0.05, decay_a_log=decay_a_log)
    decay = {name: group["weight_decay"] for group in groups for name in group["names"]}
    a_logs = [name for name in decay if name.endswith(".A_log")]
    assert len(a_logs) == 2 * 4  # a block's four scan directions each have their own
    assert {decay[name] for name in a_logs} == {0.05 if decay_a_log else 0.0}
    # Everything else keeps its group: D and the class token stay undecayed, x_proj decayed.
    assert decay["encoder.blocks.0.mixer.directions.0.D"] == decay["cls_token"] == 0.0
    assert decay["encoder.blocks.0.mixer.directions.0.x_proj.weight"] == 0.05


def test_groups_refuse_models_without_timms_protocol() -> None:
    with pytest.raises(TypeError, match=r"no no_weight_decay\(\)"):
        param_groups(nn.Linear(2, 2), weight_decay=0.1)
    model = Layered()
    model.group_matcher = None
    with pytest.raises(TypeError, match=r"no group_matcher\(\)"):
        param_groups(model, weight_decay=0.1)


def test_adamw_step_follows_group_lr_and_decay() -> None:
    torch.manual_seed(0)
    model = Layered()
    lr, wd, eps = 0.01, 0.1, 1e-8
    optimizer = build_adamw(model, lr, wd, (0.9, 0.999), layer_decay=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [lr * g["lr_scale"] for g in optimizer.param_groups]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(3, 1, 4)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    # Adam's first step moves by lr * g / (|g| + eps); AdamW first shrinks decayed weights by lr * wd.
    for name, scale, decay in (
        ("head.weight", 1.0, wd),
        ("embed.weight", 1 / 16, wd),
        ("embed.bias", 1 / 16, 0.0),
    ):
        step_lr = lr * scale
        g = grads[name]
        expected = before[name] * (1 - step_lr * decay) - step_lr * g / (g.abs() + eps)
        actual = dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_adamw_state_round_trips_with_group_keys() -> None:
    model = Layered()
    optimizer = build_adamw(model, 1e-3, 0.05, (0.9, 0.95), layer_decay=0.75)
    model(torch.randn(2, 1, 4)).sum().backward()
    optimizer.step()
    fresh = build_adamw(model, 1e-3, 0.05, (0.9, 0.95), layer_decay=0.75)
    fresh.load_state_dict(optimizer.state_dict())
    assert [g["names"] for g in fresh.param_groups] == [g["names"] for g in optimizer.param_groups]
    assert [g["lr_scale"] for g in fresh.param_groups] == [g["lr_scale"] for g in optimizer.param_groups]


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, 0.0),
        (2.5, 2.5e-4),  # a quarter into warmup, reached mid-epoch
        (5.0, 5e-4),
        (10.0, 1e-3),  # end of warmup: the peak
        (35.0, 1e-5 + 0.99e-3 * (2 + math.sqrt(2)) / 4),  # a quarter of the cosine: cos(pi/4)
        (60.0, (1e-3 + 1e-5) / 2),  # midpoint of the cosine
        (110.0, 1e-5),  # end: min_lr
        (130.0, 1e-5),  # past the end it stays at min_lr
    ],
)
def test_lr_at_warmup_then_cosine(epoch: float, expected: float) -> None:
    lr = lr_at(epoch, base_lr=1e-3, min_lr=1e-5, warmup_epochs=10, epochs=110)
    assert lr == pytest.approx(expected, rel=1e-12)


def test_lr_at_without_warmup_starts_at_the_peak() -> None:
    assert lr_at(0.0, 2e-3, 0.0, warmup_epochs=0, epochs=4) == 2e-3
    assert lr_at(2.0, 2e-3, 0.0, warmup_epochs=0, epochs=4) == pytest.approx(1e-3, rel=1e-12)


def test_lr_at_when_warmup_outlasts_the_run() -> None:
    assert lr_at(3.0, 1e-3, 0.0, warmup_epochs=10, epochs=5) == pytest.approx(3e-4, rel=1e-12)


def test_set_lr_scales_per_group() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=1.0)
    set_lr(optimizer, 0.02)
    assert [g["lr"] for g in optimizer.param_groups] == [0.005, 0.02]


def test_effective_lr_scales_with_batch() -> None:
    assert effective_lr(1.5e-4, 4096) == pytest.approx(2.4e-3, rel=1e-12)
    assert effective_lr(1e-3, 256) == 1e-3
