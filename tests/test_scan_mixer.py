"""The 4-scan mixer's fused paths (the convolution through each order, the token-major scan, the
directions' scans put back in order, averaged and gated) against float64 computations written here,
for every direction, a class token in the middle or at the tail, and odd lengths; on the numba
kernels and on the PyTorch backends that run without numba."""

import pytest
import torch
import torch.nn.functional as F

from starmamba.models.mixer import MambaMixer, scan_orders
from starmamba.ops.conv import conv_silu
from starmamba.ops.directions import scan_directions
from starmamba.ops.scan import selective_scan_tokens
from test_scan import recurrence_float64

BACKENDS = ["numba", "chunked", "reference"]
# (rows, cols, class token index): odd grids, the class token in the middle, at the tail, or none.
GRIDS = [(3, 5, 7), (3, 5, 15), (5, 3, None), (1, 1, 1)]


def every_order(rows, cols, cls_index):
    """(4, l) orders: sequence order, then the mixer's three others."""
    orders = scan_orders(rows, cols, cls_index)
    return torch.cat([torch.arange(orders.shape[-1])[None], orders[:, 0]])


def conv_silu_float64(x, orders, weight, bias):
    """silu(bias + sum_i w_i x[order[t - W + 1 + i]]), one direction and one tap at a time."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    width = weight.shape[-1]
    outs = []
    for k, order in enumerate(orders):
        ordered = F.pad(x[:, order], (0, 0, width - 1, 0))  # zeros before the first token
        pre = bias[k] + sum(ordered[:, i : i + len(order)] * weight[k, :, i] for i in range(width))
        outs.append(F.silu(pre))
    return torch.stack(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", GRIDS)
def test_convolution_through_each_order_matches_float64(backend, grid):
    orders = every_order(*grid)
    g = torch.Generator().manual_seed(len(orders[0]))
    x = torch.randn(2, orders.shape[1], 12, generator=g).requires_grad_()
    weight = torch.randn(4, 12, 4, generator=g).requires_grad_()
    bias = torch.randn(4, 12, generator=g).requires_grad_()
    grad = torch.randn(4, 2, orders.shape[1], 12, generator=g)
    out = conv_silu(x, orders, weight, bias, backend=backend)
    out.backward(grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out64 = conv_silu_float64(leaves64[0], orders, *leaves64[1:])
    out64.backward(grad.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    for got, want in zip((x, weight, bias), leaves64, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def scan_inputs(g, lead, stacked, length, dim, d_state=8):
    """Random scan inputs: u, delta (*lead, l, dim), B, C (*lead, l, d_state), and A, D, delta_bias over
    the stacked x dim channels of ``stacked`` groups or directions."""
    channels = stacked * dim
    return {
        "u": torch.randn(*lead, length, dim, generator=g),
        "delta": torch.randn(*lead, length, dim, generator=g) * 0.5,
        "A": -torch.rand(channels, d_state, generator=g) * 4,
        "B": torch.randn(*lead, length, d_state, generator=g),
        "C": torch.randn(*lead, length, d_state, generator=g),
        "D": torch.randn(channels, generator=g),
        "delta_bias": torch.randn(channels, generator=g) * 0.5,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 37, 101])
def test_token_major_scan_matches_float64_per_group(backend, length):
    g = torch.Generator().manual_seed(length)
    batch, groups, dim = 2, 4, 12
    leaves = {k: v.requires_grad_() for k, v in scan_inputs(g, (batch, groups), groups, length, dim).items()}
    grad = torch.randn(batch, groups, length, dim, generator=g)
    y = selective_scan_tokens(**leaves, delta_softplus=True, backend=backend)
    y.backward(grad)
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}

    def channels_first(t):
        return t.permute(0, 1, 3, 2).flatten(1, 2)

    y64, _ = recurrence_float64(channels_first(leaves64["u"]), channels_first(leaves64["delta"]), leaves64["A"],
                                leaves64["B"].transpose(2, 3), leaves64["C"].transpose(2, 3), leaves64["D"],
                                delta_bias=leaves64["delta_bias"], delta_softplus=True)  # fmt: skip
    y64 = y64.unflatten(1, (groups, dim)).transpose(2, 3)
    y64.backward(grad.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for name, t in leaves.items():
        torch.testing.assert_close(t.grad.double(), leaves64[name].grad, rtol=1e-4, atol=1e-4, msg=name)


def mixer_float64(mixer, x, orders):
    """The 4-scan mixer written out direction by direction, in float64 on reordered copies."""
    m = {name: p.detach().double().requires_grad_() for name, p in mixer.named_parameters()}
    xz = x @ m["in_proj.weight"].t()
    x_in, z = xz.chunk(2, dim=-1)
    outs = []
    for k, order in enumerate(orders):
        p = f"directions.{k}."
        u = conv_silu_float64(x_in, order[None], m[p + "conv1d.weight"].squeeze(1)[None], m[p + "conv1d.bias"][None])
        u = u[0]
        x_dbl = u @ m[p + "x_proj.weight"].t()
        dt, B, C = x_dbl.split([mixer.directions[k].dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta = dt @ m[p + "dt_proj.weight"].t()
        y, _ = recurrence_float64(u.transpose(1, 2), delta.transpose(1, 2), -torch.exp(m[p + "A_log"]),
                                  B.transpose(1, 2), C.transpose(1, 2), m[p + "D"],
                                  delta_bias=m[p + "dt_proj.bias"], delta_softplus=True)  # fmt: skip
        outs.append(y.transpose(1, 2)[:, torch.argsort(order)])
    out = torch.stack(outs).mean(0) * F.silu(z)
    return out @ m["out_proj.weight"].t(), m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", GRIDS[:3])
def test_four_scan_mixer_matches_float64_forward_and_backward(monkeypatch, backend, grid):
    monkeypatch.setenv("STARMAMBA_SCAN_BACKEND", backend)
    torch.manual_seed(0)
    mixer = MambaMixer(16, scans=4, expand=2, d_state=8)
    with torch.no_grad():  # steps and A of several magnitudes, so that every direction's order matters
        for direction in mixer.directions:
            direction.dt_proj.bias.uniform_(-1, 1)
            direction.conv1d.weight.mul_(3)
    orders = scan_orders(*grid)
    x = torch.randn(2, orders.shape[-1], 16).requires_grad_()
    grad = torch.randn(x.shape)
    out = mixer(x, orders)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    out64, params64 = mixer_float64(mixer, x64, every_order(*grid))
    out64.backward(grad.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for name, p in mixer.named_parameters():
        torch.testing.assert_close(p.grad.double(), params64[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def directions_float64(u, delta, A, B, C, D, delta_bias, orders, z):
    """Every direction's scan by the float64 recurrence, put back in sequence order one direction at a
    time, averaged and gated: what scan_directions computes."""
    K, dim = u.shape[0], u.shape[-1]
    outs = []
    for k in range(K):
        channels = slice(k * dim, (k + 1) * dim)
        y, _ = recurrence_float64(u[k].transpose(1, 2), delta[k].transpose(1, 2), A[channels], B[k].transpose(1, 2),
                                  C[k].transpose(1, 2), D[channels], delta_bias=delta_bias[channels],
                                  delta_softplus=True)  # fmt: skip
        outs.append(y.transpose(1, 2)[:, orders[k, 1]])
    return torch.stack(outs).mean(0) * F.silu(z.double())


def directions_inputs(grid, dtype, seed=0):
    orders = torch.cat([torch.arange(grid[0] * grid[1] + (grid[2] is not None)).expand(1, 2, -1), scan_orders(*grid)])
    K, length = orders.shape[0], orders.shape[-1]
    g = torch.Generator().manual_seed(seed)
    batch, dim = 3, 20  # 20 channels: a block that is not a multiple of the vector width
    inputs = scan_inputs(g, (K, batch), K, length, dim)
    inputs.update(orders=orders, z=torch.randn(batch, length, dim, generator=g))
    return {k: v if k == "orders" else v.to(dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", GRIDS)
def test_scan_directions_without_gradients_matches_float64(backend, grid):
    # Under no_grad the numba backend runs the fused kernel (every direction written straight into
    # sequence order); the others run the scans and a gather.
    inputs = directions_inputs(grid, torch.float32)
    want = directions_float64(**{k: v if k == "orders" else v.double() for k, v in inputs.items()})
    with torch.no_grad():
        got = scan_directions(**inputs, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_scan_directions_in_float64_agrees_with_the_recurrence_to_rounding(backend):
    inputs = directions_inputs((3, 5, 7), torch.float64, seed=1)
    with torch.inference_mode():
        got = scan_directions(**inputs, backend=backend)
    torch.testing.assert_close(got, directions_float64(**inputs), rtol=1e-12, atol=1e-12)


def test_scan_directions_with_gradients_matches_its_forward_without():
    inputs = directions_inputs((5, 3, 15), torch.float32, seed=2)
    with torch.no_grad():
        fused = scan_directions(**inputs, backend="numba")
    inputs["u"].requires_grad_()
    torch.testing.assert_close(scan_directions(**inputs, backend="numba").detach(), fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["numba", "chunked"])
@pytest.mark.parametrize("scans", [1, 4])
def test_mixer_in_inference_mode_matches_float64(monkeypatch, backend, scans):
    monkeypatch.setenv("STARMAMBA_SCAN_BACKEND", backend)
    torch.manual_seed(1)
    mixer = MambaMixer(16, scans=scans, expand=2, d_state=8)
    grid = (3, 5, 7)
    x = torch.randn(2, 16, 16)
    with torch.inference_mode():
        out = mixer(x, scan_orders(*grid) if scans == 4 else None)
    order = every_order(*grid) if scans == 4 else torch.arange(16)[None]
    out64, _ = mixer_float64(mixer, x.double(), order)
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["numba", "chunked"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_mixer_under_bf16_autocast_keeps_a_float32_scan(monkeypatch, backend, grad):
    monkeypatch.setenv("STARMAMBA_SCAN_BACKEND", backend)
    torch.manual_seed(2)
    mixer = MambaMixer(16, scans=4, expand=2, d_state=8)
    orders = scan_orders(3, 5, 15)
    x = torch.randn(2, 16, 16)
    with torch.set_grad_enabled(grad):
        full = mixer(x, orders)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = mixer(x, orders)
    assert half.dtype == torch.bfloat16
    assert ((half.float() - full).norm() / full.norm()).item() < 3e-2
