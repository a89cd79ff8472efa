"""The Triton selective scan against a float64 recurrence, run by Triton's interpreter on CPU.

conftest.py sets TRITON_INTERPRET=1 before the kernel module is imported. The interpreter is slow,
so the shapes are small; they still cross chunk boundaries, mask channels and states, and cover
every channel-block layout the launcher picks.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from starmamba.ops import scan_triton as module
from starmamba.ops.scan_triton import (
    CHUNK,
    LaunchConfig,
    SmLimits,
    launch_config,
    programs_per_sm,
    scan_triton,
    triton_status,
)
from test_scan import recurrence_float64

OPTIONS = ("D", "z", "delta_bias")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_inputs(batch, dim, d_state, length, groups, dtype=torch.float32, seed=0):
    """Leaf tensors of a scan: u, delta, z, B, C in ``dtype``; A, D, delta_bias in fp32 as models keep them."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(batch, dim, length, generator=g),
        # positive, so that the step stays positive when softplus is off as well
        "delta": torch.randn(batch, dim, length, generator=g).abs() * 0.5,
        # S4D-real magnitudes 1..d_state, as Mamba initialises them
        "A": -torch.arange(1, d_state + 1.0).repeat(dim, 1) * (0.5 + torch.rand(dim, d_state, generator=g)),
        "B": torch.randn(batch, groups, d_state, length, generator=g),
        "C": torch.randn(batch, groups, d_state, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.rand(dim, generator=g) * 0.5,
    }
    low = ("u", "delta", "B", "C", "z")
    return {k: (v.to(dtype) if k in low else v).requires_grad_() for k, v in inputs.items()}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def check(inputs, use=OPTIONS, softplus=True, grad_y=True, layout=lambda name, t: t):
    """Run the Triton scan and the float64 recurrence on the same values and compare y, the last state
    and the gradients of every input; ``layout`` may hand the kernel a differently strided view."""
    used = {k: v for k, v in inputs.items() if k not in OPTIONS or k in use}
    dtype = used["u"].dtype
    y, last = scan_triton(**{k: layout(k, v) for k, v in used.items()}, delta_softplus=softplus, return_last_state=True)
    used64 = {k: v.detach().double().requires_grad_() for k, v in used.items()}
    y64, last64 = recurrence_float64(**used64, delta_softplus=softplus)
    assert y.dtype == dtype and y.shape == used["u"].shape
    assert last.dtype == torch.float32 and last.shape == last64.shape
    tol = TOLERANCE[dtype]
    assert rel_err(y, y64) < tol
    assert rel_err(last, last64) < tol

    g = torch.Generator().manual_seed(1)
    gy, glast = torch.randn(y.shape, generator=g).to(dtype), torch.randn(last.shape, generator=g)
    outs, grads = ([y, last], [gy, glast]) if grad_y else ([last], [glast])
    torch.autograd.backward(outs, grads)
    torch.autograd.backward([y64, last64][-len(outs) :], [t.double() for t in grads])
    for name, t in used.items():
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        # Inputs that only reach y have no float64 gradient when only the last state has one.
        expected = used64[name].grad if used64[name].grad is not None else torch.zeros_like(used64[name])
        assert rel_err(t.grad, expected) < tol, f"gradient of {name}"


@pytest.mark.parametrize(
    "batch,dim,d_state,length,groups",
    [
        (2, 16, 4, 2 * CHUNK + 5, 1),  # two programs over three chunks, the last one ragged
        (2, 16, 4, 1, 1),  # a single step
        (1, 24, 4, CHUNK + 1, 1),  # channel blocks of 16: the second one half masked
        (1, 16, 4, 20, 4),  # four groups of four channels: blocks of 4
        (1, 128, 5, 12, 4),  # two blocks of 16 per group; 5 states padded to 8
        (1, 4, 4, 20, 4),  # one group per channel, as mixed or time-invariant B and C expand to
    ],
)
def test_matches_float64_recurrence(batch, dim, d_state, length, groups):
    check(make_inputs(batch, dim, d_state, length, groups, seed=length))


@pytest.mark.parametrize(
    "use,softplus",
    [((), False), (("D",), False), (("z",), False), (("delta_bias",), True), ((), True), (("D", "z"), True)],
    ids=["plain", "D", "z", "bias-softplus", "softplus", "D-z-softplus"],
)
def test_each_option_alone_and_together(use, softplus):
    check(make_inputs(1, 16, 4, CHUNK + 3, 1, seed=3), use=use, softplus=softplus)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_an_fp32_state(dtype):
    check(make_inputs(1, 16, 4, CHUNK + 9, 1, dtype=dtype, seed=4))


def test_time_major_views_are_read_in_place():
    def time_major(name, t):
        if name in ("u", "delta", "z"):  # (b, d, l) views of (b, l, d) memory, as a model's projections give
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.transpose(2, 3).contiguous().transpose(2, 3) if name in ("B", "C") else t

    check(make_inputs(1, 16, 4, 20, 1, seed=6), layout=time_major)


def test_gradient_through_the_last_state_alone():
    check(make_inputs(1, 16, 4, CHUNK + 7, 1, seed=8), grad_y=False)


def test_without_last_state_returns_y_only():
    inputs = {k: v.detach() for k, v in make_inputs(1, 16, 4, 9, 1, seed=9).items()}
    y = scan_triton(**inputs, delta_softplus=True)
    y64, _ = recurrence_float64(**inputs, delta_softplus=True)
    assert isinstance(y, torch.Tensor) and rel_err(y, y64) < 1e-4


def test_launch_config_keeps_blocks_within_groups():
    # Hand-computed from the rule: the widest block dividing dim / groups that still gives 1024 programs.
    assert launch_config(64, 384, 4, 16) == LaunchConfig(block_d=16, block_n=16, num_warps=2)  # 96 per group
    assert launch_config(32, 1024, 1, 16) == LaunchConfig(block_d=32, block_n=16, num_warps=4)
    assert launch_config(128, 3072, 4, 16) == LaunchConfig(block_d=64, block_n=16, num_warps=4)
    assert launch_config(2, 8, 8, 5) == LaunchConfig(block_d=1, block_n=8, num_warps=1)


class Launches:
    """Stands in for a kernel: records each launch's grid, the device guard it ran under and its arguments."""

    def __init__(self, kernel, guard: list) -> None:
        self.kernel, self.guard, self.seen = kernel, guard, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((grid, list(self.guard), args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch):
    """(forward, backward) launch records; ``_on_device`` is replaced by a guard that records its device."""
    guard = []

    @contextlib.contextmanager
    def on_device(device):
        guard.append(device)
        yield
        guard.pop()

    monkeypatch.setattr(module, "_on_device", on_device)
    kernels = Launches(module._scan_fwd_kernel, guard), Launches(module._scan_bwd_kernel, guard)
    monkeypatch.setattr(module, "_scan_fwd_kernel", kernels[0])
    monkeypatch.setattr(module, "_scan_bwd_kernel", kernels[1])
    return kernels


def test_every_launch_runs_on_the_inputs_device(launches):
    check(make_inputs(1, 16, 4, 9, 1, seed=10))
    forward, backward = launches
    assert len(forward.seen) == len(backward.seen) == 1
    assert [guard for _, guard, _, _ in forward.seen + backward.seen] == [[torch.device("cpu")]] * 2


def test_the_device_guard_is_cudas_for_cuda_tensors(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with module._on_device(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_without_gradients_the_forward_keeps_no_chunk_states(launches):
    inputs = make_inputs(2, 16, 4, 3 * CHUNK + 2, 1, seed=11)
    y, last = scan_triton(**inputs, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        y_nograd, last_nograd = scan_triton(**inputs, delta_softplus=True, return_last_state=True)
    assert torch.equal(y, y_nograd) and torch.equal(last, last_nograd)
    assert y_nograd.grad_fn is None
    states_shapes = [args[9].shape for _, _, args, _ in launches[0].seen]
    assert states_shapes == [(2, 4 + 1, 16, 4), (2, 1, 16, 4)]  # every chunk's entering state, then the last only


def test_warm_up_compiles_what_a_bf16_training_step_and_its_evaluation_launch(launches, monkeypatch):
    from starmamba.ops.warmup import run_dtype, warm_up

    assert run_dtype(torch.device("cuda")) == torch.bfloat16  # CUDA trains under bf16 autocast
    monkeypatch.setenv("STARMAMBA_SCAN_BACKEND", "triton")
    assert warm_up("cpu", torch.bfloat16) == "triton"
    forward, backward = launches
    # Inputs in bf16, A, D and the bias in fp32 (as models keep them); for the plain scan and the mixer
    # path with one and with two directions, evaluation's forward without chunk states, then training's.
    seen = [(args[0].dtype, args[2].dtype, kwargs["KEEP_CHUNKS"]) for _, _, args, kwargs in forward.seen]
    assert seen == [(torch.bfloat16, torch.float32, keep) for _ in range(3) for keep in (False, True)]
    assert {(args[0].dtype, args[8].dtype) for _, _, args, _ in backward.seen} == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize(
    "registers,shared,warps,limits,expected",
    [
        (166, 0, 4, SmLimits(2048, 233472), 3),  # 168 x 32 x 4 = 21504 registers a program: 3 in 65536
        (158, 0, 4, SmLimits(2048, 233472), 3),  # 160 x 128 = 20480: 3.2
        (128, 0, 4, SmLimits(2048, 167936), 4),  # exactly 4
        (32, 0, 4, SmLimits(2048, 167936), 16),  # 16 by registers, and 2048 threads hold 16 programs of 128
        (32, 0, 1, SmLimits(2048, 167936), 32),  # 64 by registers and by threads, 32 programs at most
        (96, 60000, 2, SmLimits(2048, 167936), 2),  # shared memory: 167936 // 60000
        (255, 0, 8, SmLimits(1536, 102400), 1),
    ],
)
def test_programs_per_sm_is_what_registers_threads_and_shared_memory_allow(registers, shared, warps, limits, expected):
    assert programs_per_sm(registers, shared, warps, limits) == expected


def test_the_backward_grid_is_what_the_compiled_kernel_fits_on_every_sm(monkeypatch):
    compiled = []

    class Compiled:  # what warmup() gives on a GPU: registers and shared memory known after loading
        def __init__(self, options):
            self.options, self.n_regs, self.metadata = options, None, type("Metadata", (), {"shared": 256})

        def _init_handles(self):
            self.n_regs = 166

    class Kernel:
        def warmup(self, *args, grid, **options):
            compiled.append(Compiled(options))
            return compiled[-1]

    properties = type("Properties", (), {"multi_processor_count": 132, "max_threads_per_multi_processor": 2048,
                                         "shared_memory_per_multiprocessor": 233472})  # fmt: skip
    monkeypatch.setattr(module, "_scan_bwd_kernel", Kernel())
    monkeypatch.setattr(module, "_PER_SM", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    cfg, args, options = LaunchConfig(64, 16, 4), (torch.zeros(1),), {"num_warps": 4, "BLOCK_D": 64}
    cuda = torch.device("cuda", 0)
    # 166 registers a thread: 3 programs of 4 warps per SM, on each of the 132 SMs.
    assert module._backward_programs(10_000, cuda, cfg, args, (), options) == 3 * 132
    assert module._backward_programs(100, cuda, cfg, args, (), options) == 100  # no more programs than tiles
    assert len(compiled) == 1 and compiled[0].options == options  # compiled once per specialisation
    assert module._backward_programs(100, torch.device("cpu"), cfg, args, (), options) == 100  # interpreted


def test_bad_inputs_are_named():
    inputs = {k: v.detach() for k, v in make_inputs(1, 8, 4, 5, 2).items()}
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        scan_triton(**{**inputs, "u": inputs["u"].double()})
    with pytest.raises(ValueError, match="B and C must both be"):
        scan_triton(**{**inputs, "C": inputs["C"][:, :1]})
    with pytest.raises(ValueError, match="groups of B and C must divide dim=8"):
        scan_triton(**{**inputs, "B": inputs["B"].repeat(1, 3, 1, 1), "C": inputs["C"].repeat(1, 3, 1, 1)})
    with pytest.raises(ValueError, match="D must be"):
        scan_triton(**{**inputs, "D": inputs["D"][:3]})


def _without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_status_names_what_is_missing():
    assert triton_status("cpu")[0]  # conftest.py turned the interpreter on
    ok, why = triton_status("meta")
    assert not ok and "CUDA" in why
    code = "from starmamba.ops.scan_triton import triton_status; print(triton_status('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env=_without_interpreter(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(False,") and "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_without_spilling(tmp_path):
    # triton.compile needs the real JIT kernels, which TRITON_INTERPRET replaces: hence a subprocess.
    env = {**_without_interpreter(), "TRITON_CACHE_DIR": str(tmp_path)}
    script = Path(__file__).with_name("triton_aot.py")
    out = subprocess.run([sys.executable, str(script), "80", "90"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(r["sm"], r["block_d"], r["dtype"], r["kernel"]) for r in rows} == {
        (sm, block_d, dtype, kernel)
        for sm in (80, 90)
        for block_d in (16, 32, 64)
        for dtype in ("float32", "bfloat16", "float16")
        for kernel in ("forward", "backward")
    }
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    # The backward's grid holds as many programs per SM as its registers, threads and shared memory allow.
    limits = {80: SmLimits(2048, 167936), 90: SmLimits(2048, 233472)}

    def fit(programs, row):
        warps, sm = row["num_warps"], limits[row["sm"]]
        registers = programs * warps * -(-row["registers"] * 32 // 256) * 256
        return (registers <= sm.registers and programs * warps * 32 <= sm.max_threads and programs <= 32
                and programs * row["shared"] <= sm.shared_bytes)  # fmt: skip

    backward = [r for r in rows if r["kernel"] == "backward"]
    assert all(fit(r["programs_per_sm"], r) and not fit(r["programs_per_sm"] + 1, r) for r in backward), backward
