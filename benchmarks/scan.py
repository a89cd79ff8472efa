"""Selective-scan forward+backward time and peak extra memory, per backend and shape.

Every backend that runs on the device (numba, chunked and reference on a CPU; mamba_ssm when its
kernel works, triton, chunked and reference on CUDA) and the pure-PyTorch peer mambapy (its
Blelloch ``pscan``) if installed, on the Mamba usage (D skip, z gate, delta bias, softplus).
Shapes are (batch, dim, groups, d_state, length); B and C are grouped as the 4-scan mixer's
stacked call has them. Each measurement runs in a fresh process, so the peak resident memory it
adds over its inputs is its own; the backends take turns for ``--rounds`` rounds and each keeps
its fastest time, so that a noisy spell of the machine does not favour one of them.

    python benchmarks/scan.py                            # the shapes of the kernels issue
    python benchmarks/scan.py --shapes 2,384,1,16,1280 --backends numba chunked --rounds 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# Before torch: starmamba sets torch's OpenMP wait policy as the starmamba command has it.
import starmamba  # noqa: F401

# isort: split

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, environment, print_table, write_json
from starmamba.ops import available_backends, selective_scan

# (batch, dim, groups, d_state, length): small-scale finetune (4 scans stacked), small-scale STAR,
# the paper's STAR lengths at width 384; on CUDA also the paper's STAR-B pretraining and
# MambaMLP-B finetuning (batch 128, 4 x 768 stacked channels, 197 tokens).
SHAPES = ["64,384,4,16,37", "8,96,1,16,320", "2,384,1,16,1280", "2,384,1,16,2560"]
CUDA_SHAPES = ["16,768,1,16,1280", "128,3072,4,16,197"]


def make_inputs(batch: int, dim: int, groups: int, d_state: int, length: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    t = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5,
        "A": -torch.arange(1, d_state + 1.0).repeat(dim, 1),
        "B": torch.randn(batch, groups, d_state, length, generator=g),
        "C": torch.randn(batch, groups, d_state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.zeros(dim),
    }
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same computation through mambapy's pscan, in its layout: u, delta, z (b, l, d), B, C (b, l, g, n)."""
    from mambapy.pscan import pscan

    dim, groups = u.shape[-1], B.shape[2]
    dt = F.softplus(delta + delta_bias)
    dA = torch.exp(dt.unsqueeze(-1) * A)
    B_d, C_d = (M.repeat_interleave(dim // groups, dim=2) for M in (B, C))  # (b, l, d, n)
    hs = pscan(dA, (dt * u).unsqueeze(-1) * B_d)
    y = (hs * C_d).sum(-1) + u * D
    return y * F.silu(z)


def to_mambapy_layout(t: dict) -> dict:
    """Sequence-major copies, so that mambapy is timed in the layout it is written for."""

    def layout(v):
        return v.detach().movedim(-1, 1).contiguous().requires_grad_() if v.dim() >= 3 else v

    return {k: layout(v) for k, v in t.items()}


def run_backend(name: str, t: dict):
    if name == "mambapy":
        return mambapy_scan(**t)
    return selective_scan(
        t["u"],
        t["delta"],
        t["A"],
        t["B"],
        t["C"],
        D=t["D"],
        z=t["z"],
        delta_bias=t["delta_bias"],
        delta_softplus=True,
        backend=name,
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(name: str, shape: tuple[int, ...], args) -> dict:
    """One (backend, shape) measurement, in this process alone."""
    device = torch.device(args.device)
    # A first call on a tiny input compiles the JIT kernels, so that the compiler's own memory is
    # not counted as the scan's.
    tiny = make_inputs(1, shape[2], shape[2], shape[3], 2, device)
    run_backend(name, to_mambapy_layout(tiny) if name == "mambapy" else tiny).sum().backward()
    t = make_inputs(*shape, device)
    if name == "mambapy":
        t = to_mambapy_layout(t)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    times = []
    for i in range(args.warmup + args.repeats):
        for v in t.values():
            v.grad = None
        sync()
        start = time.perf_counter()
        run_backend(name, t).sum().backward()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    extra = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    return {"backend": name, "shape": ",".join(map(str, shape)), "seconds": min(times), "extra_mb": extra / 2**20}


def parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.split(","))
    if len(shape) != 5:
        raise argparse.ArgumentTypeError(f"a shape is batch,dim,groups,d_state,length; got {text!r}")
    return shape


def default_backends(device: torch.device) -> list[str]:
    """The backends that run on ``device``, and mambapy if it is installed."""
    names = available_backends(device)
    try:
        import mambapy  # noqa: F401

        names.append("mambapy")
    except ImportError:
        print("mambapy is not installed: `pip install mambapy` to compare with its pscan")
    return names


def measure(name: str, shape: tuple[int, ...], args) -> dict | None:
    """Run one measurement in a fresh process; None (and a line saying why) if it failed."""
    cmd = [sys.executable, __file__, "--worker", name, ",".join(map(str, shape)), "--device", args.device,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {name} at {shape} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=None, help="batch,dim,groups,d_state,length")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend that runs here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="turns each backend takes per shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan.json")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], parse_shape(args.worker[1]), args)))
        return

    device = torch.device(args.device)
    shapes = args.shapes or [parse_shape(s) for s in SHAPES + (CUDA_SHAPES if device.type == "cuda" else [])]
    backends = args.backends or default_backends(device)
    rows = []
    for shape in shapes:
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name in backends:
                row = measure(name, shape, args)
                if row and (name not in best or row["seconds"] < best[name]["seconds"]):
                    best[name] = row
        fastest = min((r["seconds"] for r in best.values()), default=float("nan"))
        for row in best.values():
            row["x_fastest"] = row["seconds"] / fastest
            print(f"  {row['shape']:>18s}  {row['backend']:10s} {row['seconds']:.4f} s  x{row['x_fastest']:.2f}  "
                  f"+{row['extra_mb']:.0f} MB", flush=True)  # fmt: skip
        rows.extend(best.values())
    print(f"\nselective scan forward+backward (D, z, delta bias, softplus), {device_name(device)}")
    print_table(
        rows,
        [
            ("shape", "b, d, g, n, l", "s"),
            ("backend", "backend", "s"),
            ("seconds", "fwd+bwd (s)", ".4f"),
            ("x_fastest", "x fastest", ".2f"),
            ("extra_mb", "extra memory (MB)", ".0f"),
        ],
    )
    config = {k: getattr(args, k) for k in ("repeats", "warmup", "rounds")}
    write_json(args.out, {"benchmark": "selective_scan_fwd_bwd", **environment(device), "config": config, "rows": rows})


if __name__ == "__main__":
    main()
