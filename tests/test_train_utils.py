"""EMA of weights, the metrics log, and the run's pictures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from starmamba.models.layout import SequenceLayout
from starmamba.train.ema import ModelEma
from starmamba.train.metrics import MetricsLog, read_metrics
from starmamba.train.plots import curves_figure, plot_curves, reconstruction_figure, sequence_figure


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(value)


def test_ema_update_is_exact_on_representable_values() -> None:
    model = small_model()
    set_weights(model, 2.0)  # num_batches_tracked becomes 2
    ema = ModelEma(model, decay=0.75)
    set_weights(model, 6.0)
    ema.update(model)
    state = ema.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(state[name], torch.full_like(state[name], 0.75 * 2.0 + 0.25 * 6.0)), name
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(state[name], torch.full_like(state[name], 6)), name  # buffers follow the model


def test_ema_of_several_updates_matches_float64_recurrence() -> None:
    model = small_model()
    ema = ModelEma(model, decay=0.9)
    expected = {name: param.detach().double() for name, param in model.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.add_(torch.randn(param.shape, generator=generator))
                expected[name] = 0.9 * expected[name] + 0.1 * param.double()
        ema.update(model)
    for name, value in expected.items():
        torch.testing.assert_close(ema.state_dict()[name].double(), value, rtol=1e-6, atol=1e-6)


def test_ema_update_with_decay_0_9() -> None:
    model = small_model()
    ema = ModelEma(model, decay=0.9)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    ema.update(model)
    for name, new in model.state_dict().items():
        if new.is_floating_point():
            expected = 0.9 * old[name] + 0.1 * new
            torch.testing.assert_close(ema.state_dict()[name], expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema.state_dict()["0.weight"], old["0.weight"])


def test_ema_is_a_frozen_eval_copy() -> None:
    model = small_model().train()
    ema = ModelEma(model, decay=0.9)
    assert ema.module is not model and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_weights(ema.module, 1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ema_unwraps_data_parallel_and_round_trips() -> None:
    model = small_model()
    ema = ModelEma(nn.DataParallel(model), decay=0.5)
    assert isinstance(ema.module, nn.Sequential)
    set_weights(model, 4.0)
    ema.update(nn.DataParallel(model))
    other = ModelEma(small_model(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in other.state_dict().items())


def test_ema_decay_out_of_range() -> None:
    with pytest.raises(ValueError, match="decay"):
        ModelEma(small_model(), decay=1.5)


def test_metrics_log_writes_json_lines(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(10, loss=0.5, lr=1e-3, note="warmup")
    log.log(20, loss=torch.tensor(0.25), acc1=np.float32(87.5), epoch=1.0)
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r.pop("time"), float) for r in records)
    assert records == [
        {"step": 10, "loss": 0.5, "lr": 1e-3, "note": "warmup"},
        {"step": 20, "loss": 0.25, "acc1": 87.5, "epoch": 1.0},
    ]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [10, 20]


def test_metrics_log_appends_after_a_cut_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(3, loss=0.5)
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (3, 0.5)]


def test_disabled_metrics_log_writes_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run", enabled=False)
    log.log(1, loss=1.0)
    log.close()
    assert not (tmp_path / "run").exists()


def test_metrics_log_writes_tensorboard_events(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path)
    log.log(1, loss=1.0, note="text is not a scalar")
    log.close()
    assert [p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir()] == [True]


def test_metrics_log_without_tensorboard_installed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    log = MetricsLog(tmp_path)
    log.log(1, loss=1.0)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


TRAIN = [{"step": s, "time": 0.0, "epoch": s / 10, "loss": 1 / s, "lr": 1e-4 * s} for s in range(1, 21)]
EVAL = [{"step": 10 * e, "epoch": float(e), "acc1": 50.0 + e, "ema_acc1": 49.0 + e} for e in (1, 2)]


@pytest.mark.parametrize(
    ("records", "width"),
    [
        (TRAIN, 900),  # loss, lr
        (TRAIN + EVAL, 1350),  # loss, lr, top-1
        ([*TRAIN, {"step": 20, "epoch": 2.0, "val_loss": 0.3}], 1350),  # loss, lr, val loss
        ([{"step": 20, "epoch": 2.0, "acc1": 60.0, "val_loss": 0.3}], 900),  # top-1, val loss
    ],
)
def test_plot_curves_panel_per_metric(tmp_path: Path, records: list[dict], width: int) -> None:
    path = tmp_path / "curves.png"
    plot_curves(records, path, title="tiny")
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (width, 350))
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_plot_curves_without_curves_writes_nothing(tmp_path: Path) -> None:
    plot_curves([{"step": 1, "time": 0.0}], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_curves_of_a_short_run_have_markers_and_whole_steps() -> None:
    records = [{"step": s, "epoch": s / 3, "loss": 2.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    records.append({"step": 3, "epoch": 1.0, "val_loss": 0.5})
    figure = curves_figure(records, title="star (dim 32, depth 2): 0.05M")
    assert figure.get_suptitle() == "star (dim 32, depth 2): 0.05M"
    for axes in figure.axes:
        line = axes.get_lines()[0]
        assert line.get_marker() == "o", axes.get_title()  # one point, or three, are visible
        figure.canvas.draw()
        ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (axes.get_title(), ticks)
    long_run = [{"step": s, "loss": 1.0 / s} for s in range(1, 200)]
    assert curves_figure(long_run).axes[0].get_lines()[0].get_marker() in ("None", None, "")


@pytest.mark.parametrize("count", [1, 4, 16])
def test_reconstruction_panels_are_labelled_and_nothing_is_clipped(count: int) -> None:
    inputs = torch.rand(count, 3, 6, 6, generator=torch.Generator().manual_seed(count))
    outputs = inputs.flip(-1) * 1.5  # out of range: clamped to 1
    figure = reconstruction_figure(inputs, outputs, title="epoch 1: next-cluster predictions")
    figure.canvas.draw()
    rows = [figure.axes[:count], figure.axes[count:]]
    assert [row[0].get_ylabel() for row in rows] == ["input", "reconstruction"]
    np.testing.assert_allclose(rows[0][-1].get_images()[0].get_array(), inputs[-1].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(rows[1][0].get_images()[0].get_array(), outputs[0].clamp(0, 1).permute(1, 2, 0).numpy())
    canvas = figure.bbox
    renderer = figure.canvas.get_renderer()
    texts = [figure._suptitle, rows[0][0].yaxis.label, rows[1][0].yaxis.label]
    for artist in texts + [axes for row in rows for axes in row]:
        box = artist.get_window_extent(renderer)
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1, artist


def test_curves_show_each_target_group_over_its_floor() -> None:
    records = [{"step": s, "loss": 0.7, "loss_cluster": 0.8 - s / 100, "floor_cluster": 0.83,
                "loss_separator": 0.01, "floor_separator": 0.0} for s in (1, 2, 3)]  # fmt: skip
    figure = curves_figure(records)
    panel = next(axes for axes in figure.axes if axes.get_title().startswith("loss by target group"))
    lines = panel.get_lines()
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]  # separators, then other clusters
    assert list(lines[2].get_ydata()) == [0.79, 0.78, 0.77] and list(lines[3].get_ydata()) == [0.83] * 3
    assert lines[3].get_color() == lines[2].get_color()


def test_sequence_figure_draws_each_context_mask() -> None:
    layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=2)
    strip, sequence, image = sequence_figure(layout).axes
    assert strip.images[0].get_array().shape == (1, layout.num_tokens, 3)
    for axes, context in ((sequence, "sequence"), (image, "image")):
        drawn = np.asarray(axes.images[0].get_array())
        expected = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, decoder_context=context).decoder_mask
        assert np.array_equal(drawn, expected.numpy())
