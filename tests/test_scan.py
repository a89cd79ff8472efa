"""Every selective-scan backend against a float64 recurrence written here, forward and backward."""

import hashlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from starmamba.ops import BACKEND_ENV, resolve_backend, selective_scan

BACKENDS = ["reference", "chunked", "numba"] + (["mamba_ssm"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def recurrence_float64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The scan exactly as mamba_ssm documents it, one channel-state pair at a time, in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    dt = F.softplus(delta) if delta_softplus else delta
    if B.dim() == 2:  # time-invariant, per channel
        B = B.double()[None, :, :, None].expand(batch, dim, -1, length)
    elif B.dim() == 3:
        B = B[:, None].expand(batch, dim, -1, length)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
    if C.dim() == 2:
        C = C.double()[None, :, :, None].expand(batch, dim, -1, length)
    elif C.dim() == 3:
        C = C[:, None].expand(batch, dim, -1, length)
    else:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, :, :, t] * u[:, :, t, None]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def make_inputs(batch, dim, d_state, length, *, b_form="shared", delta_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    inputs = {
        "u": rand(batch, dim, length),
        # positive, so that the step stays positive when softplus is off as well
        "delta": rand(batch, dim, length, scale=delta_scale).abs() * 0.3,
        # S4D-real magnitudes 1..d_state, as Mamba initialises them
        "A": -(torch.arange(1, d_state + 1.0).repeat(dim, 1) * (0.5 + torch.rand(dim, d_state, generator=g))).to(
            DEVICE
        ),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": rand(dim, scale=0.5).abs(),
    }
    if b_form == "shared":
        inputs["B"], inputs["C"] = rand(batch, d_state, length), rand(batch, d_state, length)
    elif b_form == "grouped":
        inputs["B"], inputs["C"] = rand(batch, 2, d_state, length), rand(batch, 2, d_state, length)
    elif b_form == "mixed":
        inputs["B"], inputs["C"] = rand(batch, 2, d_state, length), rand(batch, d_state, length)
    else:  # time-invariant
        inputs["B"], inputs["C"] = rand(dim, d_state), rand(dim, d_state)
    return inputs


def core_inputs_float64(inputs):
    """u, dt = softplus(delta), A, B, C as the scan cores take them (B, C grouped), in float64."""
    return [
        inputs["u"].double(),
        F.softplus(inputs["delta"].double()),
        inputs["A"].double(),
        inputs["B"].double()[:, None],
        inputs["C"].double()[:, None],
    ]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


_float64_results: dict[bytes, tuple] = {}


def float64_result(tensors, softplus, grads):
    """y, last state and input gradients of the float64 recurrence; computed once per distinct input."""
    key = hashlib.sha1(repr((sorted(tensors), softplus)).encode())
    for t in (*tensors.values(), *grads):
        key.update(t.detach().cpu().numpy().tobytes())
    if key.digest() not in _float64_results:
        tensors64 = {k: v.detach().double().requires_grad_() for k, v in tensors.items()}
        optional64 = {k: tensors64.get(k) for k in ("D", "z", "delta_bias")}
        y64, last64 = recurrence_float64(
            tensors64["u"],
            tensors64["delta"],
            tensors64["A"],
            tensors64["B"],
            tensors64["C"],
            **optional64,
            delta_softplus=softplus,
        )
        torch.autograd.backward([y64, last64][: len(grads)], [gr.double() for gr in grads])
        _float64_results[key.digest()] = (y64.detach(), last64.detach(), {k: v.grad for k, v in tensors64.items()})
    return _float64_results[key.digest()]


def check_against_float64(backend, inputs, use, softplus, tol=1e-4):
    tensors = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") or use[k]}
    optional = {k: tensors.get(k) for k in ("D", "z", "delta_bias")}
    y, last = selective_scan(
        tensors["u"],
        tensors["delta"],
        tensors["A"],
        tensors["B"],
        tensors["C"],
        **optional,
        delta_softplus=softplus,
        return_last_state=True,
        backend=backend,
    )
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(y.shape, generator=g).to(y.device)
    # mamba_ssm ignores the gradient of the last state; the PyTorch backends honour it.
    grad_last = None if backend == "mamba_ssm" else torch.randn(last.shape, generator=g).to(y.device)
    outs, grads = ([y, last], [grad_y, grad_last]) if grad_last is not None else ([y], [grad_y])
    y64, last64, grads64 = float64_result(tensors, softplus, grads)
    assert y.dtype == inputs["u"].dtype and y.shape == inputs["u"].shape
    assert rel_err(y, y64) < tol
    assert rel_err(last, last64) < tol

    torch.autograd.backward(outs, grads)
    for name, t in tensors.items():
        assert t.grad is not None, name
        assert rel_err(t.grad, grads64[name]) < tol, f"gradient of {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 7, 64, 1280, 2560])
@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "D-z-bias-softplus"])
def test_matches_float64_recurrence_over_lengths(backend, length, with_options):
    inputs = make_inputs(2, 16, 8, length, seed=length)
    use = dict.fromkeys(("D", "z", "delta_bias"), with_options)
    check_against_float64(backend, inputs, use, softplus=with_options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,z,delta_bias,softplus", list(itertools.product([False, True], repeat=4)))
def test_every_option_combination(backend, D, z, delta_bias, softplus):
    inputs = make_inputs(2, 8, 4, 64, seed=3)
    check_against_float64(backend, inputs, {"D": D, "z": z, "delta_bias": delta_bias}, softplus)


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
@pytest.mark.parametrize("b_form", ["grouped", "mixed", "time_invariant"])
def test_other_shapes_of_B_and_C(backend, b_form):
    if backend == "mamba_ssm" and b_form != "grouped":
        pytest.skip("mamba_ssm's kernel takes only variable B and C of one form")
    inputs = make_inputs(2, 8, 4, 33, b_form=b_form, seed=5)
    check_against_float64(backend, inputs, dict.fromkeys(("D", "z", "delta_bias"), True), softplus=True)


@pytest.mark.parametrize("backend", ["chunked", "reference", "numba"])
def test_long_sequence_with_large_steps_stays_exact(backend):
    # Steps up to ~e^3 with |A| up to 24: exp(dt*A) underflows to 0 where log-space tricks blow up.
    inputs = make_inputs(2, 16, 16, 2560, delta_scale=4.0, seed=7)
    inputs["delta"] = inputs["delta"] + 3.0
    check_against_float64(backend, inputs, dict.fromkeys(("D", "z", "delta_bias"), True), softplus=True)


def test_chunk_boundaries_do_not_matter():
    from starmamba.ops.scan_chunked import scan_chunked

    u, dt, A, B, C = core_inputs_float64(make_inputs(1, 4, 3, 50, seed=11))
    y_ref, h_ref = scan_chunked(u, dt, A, B, C, chunk=50)
    for chunk in (1, 3, 7, 64):
        y, h = scan_chunked(u, dt, A, B, C, chunk=chunk)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


def test_chunked_without_gradients_keeps_one_entering_state_and_gives_the_same_scan(monkeypatch):
    from starmamba.ops import scan_chunked as module

    u, dt, A, B, C = (t.requires_grad_() for t in core_inputs_float64(make_inputs(1, 4, 3, 50, seed=12)))
    kept, real = [], module._forward

    def forward(*args, keep_entering):
        y, h, entering = real(*args, keep_entering=keep_entering)
        kept.append(entering.shape[0])
        return y, h, entering

    monkeypatch.setattr(module, "_forward", forward)
    for chunk in (1, 7):
        y, h = module.scan_chunked(u, dt, A, B, C, chunk=chunk)
        with torch.no_grad():
            y_nograd, h_nograd = module.scan_chunked(u, dt, A, B, C, chunk=chunk)
        assert torch.equal(y, y_nograd) and torch.equal(h, h_nograd)
    assert kept == [50, 1, 8, 1]  # every chunk's entering state with gradients, one without


def test_chunked_gradients_pass_gradcheck_in_float64():
    from starmamba.ops.scan_chunked import scan_chunked

    args = [a.requires_grad_() for a in core_inputs_float64(make_inputs(2, 4, 3, 11, seed=2))]
    assert torch.autograd.gradcheck(lambda *a: scan_chunked(*a, chunk=4), args)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown selective-scan backend backend='fast'"):
        resolve_backend("fast", torch.device("cpu"))


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    assert resolve_backend("chunked", torch.device("cpu")) == "chunked"  # an explicit choice wins
    monkeypatch.setenv(BACKEND_ENV, "nope")
    with pytest.raises(ValueError, match=r"\$STARMAMBA_SCAN_BACKEND='nope'"):
        resolve_backend(None, torch.device("cpu"))


def test_default_on_cpu_is_the_fused_numba_kernel(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "numba"


def test_without_numba_the_default_falls_back_to_chunked_and_says_why(monkeypatch):
    from starmamba.ops import scan

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(scan, "_kernel_module", lambda name: (None, f"{name} is not importable (no module)"))
    monkeypatch.setattr(scan, "_warned", set())
    with pytest.warns(UserWarning, match=r"chunked PyTorch selective scan on cpu \(numba: numba is not importable"):
        assert resolve_backend(None, torch.device("cpu")) == "chunked"
    with pytest.raises(RuntimeError, match="the numba scan backend cannot run: numba is not importable"):
        resolve_backend("numba", torch.device("cpu"))
    inputs = make_inputs(2, 8, 4, 20, seed=4)
    check_against_float64(None, inputs, dict.fromkeys(("D", "z", "delta_bias"), True), softplus=True)


def test_fused_backends_refuse_the_wrong_device_or_dtype():
    with pytest.raises(RuntimeError, match="numba scan backend cannot run: it runs on CPU tensors, not meta"):
        resolve_backend("numba", torch.device("meta"))
    with pytest.raises(RuntimeError, match="triton scan backend cannot run: it computes in float32"):
        resolve_backend("triton", torch.device("cpu"), torch.float64)


def test_mamba_ssm_backend_needs_cuda_tensors():
    with pytest.raises(RuntimeError, match="mamba_ssm scan backend cannot run"):
        resolve_backend("mamba_ssm", torch.device("cpu"))


def test_bad_shapes_are_named():
    inputs = make_inputs(2, 8, 4, 10)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"][:, :3], inputs["C"])
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"][:4], inputs["B"], inputs["C"])


# mamba_ssm's fp32 tolerances in its test_selective_scan (y; then per gradient, from its grid).
MAMBA_SSM_TOLERANCE = {
    "y": (6e-4, 2e-3),
    "u": (1.2e-3, 4e-3),
    "delta": (3e-3, 2e-2),
    "A": (1e-3, 1e-2),
    "B": (6e-4, 2e-3),
    "C": (6e-4, 2e-3),
    "D": (1e-3, 1e-3),
    "z": (1e-3, 1e-3),
    "delta_bias": (1e-3, 1e-3),
}


def mamba_ssm_grid_inputs(length, seed):
    """mamba_ssm's test_selective_scan inputs: dt = softplus(0.5 rand + 0.5 rand) and A = -0.5 rand, so
    some channel-state pairs decay by less than 1e-3 per step and remember thousands of steps."""
    g = torch.Generator().manual_seed(seed)
    batch, dim, d_state, groups = 2, 4, 8, 2
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": 0.5 * torch.rand(batch, dim, length, generator=g),
        "A": -0.5 * torch.rand(dim, d_state, generator=g),
        "B": torch.randn(batch, groups, d_state, length, generator=g),
        "C": torch.randn(batch, groups, d_state, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": 0.5 * torch.rand(dim, generator=g),
    }


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("backend", ["numba", "chunked", "reference", "triton"])
def test_long_slow_decays_within_mamba_ssm_tolerances(backend, length):
    """Forward and every gradient against float64 at mamba_ssm's fp32 tolerances, and a relative error
    small enough (float32 rounding, not growing with the length) to catch a per-step bias that compounds
    along slow decays (as a fast exp biased by 7e-8 did: 6e-4 in y and 1e-2 in dA at 4096 steps)."""
    if backend == "triton":
        pytest.importorskip("triton")
    inputs = {k: v.requires_grad_() for k, v in mamba_ssm_grid_inputs(length, seed=length).items()}
    grad_y = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1))
    y64, _, grads64 = float64_result(inputs, True, [grad_y])
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    y.backward(grad_y)
    got, want = {"y": y} | {k: v.grad for k, v in inputs.items()}, {"y": y64} | grads64
    for name, (rtol, atol) in MAMBA_SSM_TOLERANCE.items():
        close = torch.isclose(got[name].double(), want[name], rtol=rtol, atol=atol)
        assert close.all(), f"{name}: {(~close).sum()} elements outside rtol {rtol}, atol {atol}"
        assert rel_err(got[name], want[name]) < {"y": 3e-6, "A": 3e-5}.get(name, 1e-5), name
