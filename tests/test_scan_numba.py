"""The fused numba CPU scan: its exp, chunking, task partition, threads and forks."""

import multiprocessing
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch

from starmamba.ops import scan_numba
from starmamba.ops.scan_numba import fast_exp, fast_log1p
from test_scan import core_inputs_float64, make_inputs, recurrence_float64


@numba.njit
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = fast_exp(x[i])


def test_fast_exp_is_accurate_over_the_float32_range_and_saturates():
    x = np.concatenate([np.linspace(-87, 88, 1_000_001), np.linspace(-1, 1, 100_001)]).astype(np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out / exact - 1)) < 3e-7
    extremes = np.array([-1e4, -100, 100, 1e4], np.float32)
    out = np.empty_like(extremes)
    _exp_all(extremes, out)
    assert np.all(np.isfinite(out))
    assert out[0] == out[1] and 0 < out[0] < 1e-37
    assert out[2] == out[3] and out[2] > 1e38


@numba.njit
def _log1p_all(t, out):
    for i in range(t.size):
        out[i] = fast_log1p(t[i])


def test_fast_log1p_is_accurate_on_zero_to_one():
    t = np.concatenate([np.linspace(0, 1, 1_000_001), np.geomspace(1e-30, 1e-3, 10_001)]).astype(np.float32)
    out = np.empty_like(t)
    _log1p_all(t, out)
    exact = np.log1p(t.astype(np.float64))
    assert out[0] == 0
    assert np.max(np.abs(out[1:] / exact[1:] - 1)) < 3e-7


def _run(inputs, z=True):
    """y, last state and every gradient of one scan, in float64 (B and C grouped, as the kernel takes them)."""
    args = dict(zip(("u", "delta", "A", "B", "C"), core_inputs_float64(inputs), strict=True))
    args |= {"D": inputs["D"].double(), "z": inputs["z"].double() if z else None}
    leaves = {k: v.requires_grad_() for k, v in args.items() if v is not None}
    y, last = scan_numba.scan_numba(**args)
    g = torch.Generator().manual_seed(0)
    torch.autograd.backward([y, last], [torch.randn(y.shape, generator=g, dtype=y.dtype),
                                        torch.randn(last.shape, generator=g, dtype=y.dtype)])  # fmt: skip
    return [y.detach(), last.detach()] + [t.grad for t in leaves.values()]


@pytest.mark.parametrize("chunk,block", [(1, 8), (3, 16), (7, 24), (64, 64)])
def test_chunk_length_and_channel_blocks_do_not_change_the_result(monkeypatch, chunk, block):
    inputs = make_inputs(2, 40, 5, 50, seed=11)
    reference = _run(inputs)
    monkeypatch.setattr(scan_numba, "CHUNK", chunk)
    monkeypatch.setattr(scan_numba, "BLOCK", block)
    for got, want in zip(_run(inputs), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("softplus", [False, True])
def test_gradients_pass_gradcheck_in_float64(softplus):
    inputs = make_inputs(2, 4, 3, 11, seed=2)
    args = [*core_inputs_float64(inputs), inputs["D"].double(), inputs["z"].double(), inputs["delta_bias"].double()]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: scan_numba.scan_numba(*a, delta_softplus=softplus), args)


def test_thread_count_does_not_change_a_bit():
    inputs = make_inputs(4, 96, 16, 37, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(inputs)
        torch.set_num_threads(3)
        three = _run(inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)


def _child(inputs, queue):
    torch.set_num_threads(2)
    queue.put([t.numpy() for t in _run(inputs)])


def test_a_forked_child_runs_the_kernel_after_its_parent():
    inputs = make_inputs(4, 96, 16, 37, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parent = _run(inputs)  # the parent's thread pool now exists
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(inputs, queue))
    child.start()
    result = queue.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0
    for a, b in zip(result, parent, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_fused_softplus_step_matches_torch_over_both_signs():
    # delta + bias from -30 to 30: both branches of the kernel's softplus and of its derivative.
    g = torch.Generator().manual_seed(4)
    u, z = torch.randn(2, 8, 60, generator=g), torch.randn(2, 8, 60, generator=g)
    delta = torch.linspace(-30, 30, 2 * 8 * 60).view(2, 8, 60)
    A, bias = -torch.rand(8, 4, generator=g) * 0.2, torch.randn(8, generator=g)
    B, C = torch.randn(2, 1, 4, 60, generator=g), torch.randn(2, 1, 4, 60, generator=g)
    grad = torch.randn(2, 8, 60, generator=g)
    got = [t.clone().requires_grad_() for t in (u, delta, bias)]
    want = [t.double().requires_grad_() for t in (u, delta, bias)]
    y, _ = scan_numba.scan_numba(got[0], got[1], A, B, C, z=z, delta_bias=got[2], delta_softplus=True)
    y64, _ = recurrence_float64(want[0], want[1], A, B[:, 0], C[:, 0], z=z, delta_bias=want[2], delta_softplus=True)
    y.backward(grad)
    y64.backward(grad.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "code,env,expected",
    [
        ("import starmamba", {}, "PASSIVE"),  # workers that sleep leave the cores to the scan's threads
        ("import starmamba", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's choice stands
        ("import torch, starmamba", {}, None),  # too late: OpenMP has read its settings with torch
    ],
)
def test_importing_starmamba_first_makes_openmp_workers_sleep(code, env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    printed = subprocess.run(
        [sys.executable, "-c", f"{code}; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
        env=clean | env, capture_output=True, text=True, check=True,
    ).stdout.split()[-1]  # fmt: skip
    assert printed == str(expected)


def test_warm_up_compiles_the_kernels_a_training_step_calls(tmp_path):
    # In a fresh process with an empty JIT cache: nothing is compiled until warm_up, which compiles the
    # float32 kernels that the scan's API and the mixers' training steps and inference then dispatch to
    # without compiling again (the training kernels for the API's layout and the mixer's token-major
    # tensors of one and of several directions, and the fused kernel that inference runs).
    code = """
import torch
from starmamba.models.mixer import MambaMixer, scan_orders
from starmamba.ops import conv_numba, directions_numba, scan_numba, selective_scan, warm_up
kernels = (scan_numba._forward, scan_numba._backward, conv_numba._conv_forward, conv_numba._conv_backward,
           directions_numba._directions_forward)
before = [len(k.signatures) for k in kernels]
backend = warm_up("cpu")
after = [len(k.signatures) for k in kernels]
u = torch.randn(2, 8, 37, requires_grad=True)
B, C = torch.randn(2, 4, 16, 37), torch.randn(2, 4, 16, 37)
selective_scan(u, torch.rand(2, 8, 37), -torch.rand(8, 16), B, C, torch.ones(8), torch.randn(2, 8, 37),
               torch.zeros(8), True).sum().backward()
for scans, orders in ((1, None), (4, scan_orders(6, 6, 18))):
    mixer, x = MambaMixer(24, scans=scans), torch.randn(2, 37, 24)
    mixer(x, orders).sum().backward()
    with torch.inference_mode():
        mixer(x, orders)
print(backend, before, after, [len(k.signatures) for k in kernels])
"""
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path), "STARMAMBA_SCAN_BACKEND": ""}
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert printed.stdout.split("\n")[-2] == "numba [0, 0, 0, 0, 0] [4, 3, 1, 1, 1] [4, 3, 1, 1, 1]"
