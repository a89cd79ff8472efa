"""Selective-scan forward+backward time and peak extra memory, per backend and sequence length.

Compares starmamba's backends with the pure-PyTorch peer mambapy (its Blelloch ``pscan``) on the
Mamba usage (D skip, z gate, delta bias, softplus). Each measurement runs in a fresh process, so
the peak resident memory it adds over its inputs is its own.

    python benchmarks/scan.py                       # B=2, D=384, N=16, L in {320, 1280, 2560}
    python benchmarks/scan.py --lengths 1280 --repeats 5 --out benchmarks/results/scan.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, print_table, write_json
from starmamba.ops import selective_scan


def make_inputs(batch: int, dim: int, d_state: int, length: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    t = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5,
        "A": -torch.arange(1, d_state + 1.0).repeat(dim, 1),
        "B": torch.randn(batch, d_state, length, generator=g),
        "C": torch.randn(batch, d_state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.zeros(dim),
    }
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same computation through mambapy's pscan, in its layout: u, delta, z (b, l, d), B, C (b, l, n)."""
    from mambapy.pscan import pscan

    dt = F.softplus(delta + delta_bias)
    dA = torch.exp(dt.unsqueeze(-1) * A)
    dBu = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
    hs = pscan(dA, dBu)
    y = (hs @ C.unsqueeze(-1)).squeeze(-1) + u * D
    return y * F.silu(z)


def to_mambapy_layout(t: dict) -> dict:
    """Sequence-major copies, so that mambapy is timed in the layout it is written for."""
    return {k: v.detach().transpose(1, 2).contiguous().requires_grad_() if v.dim() == 3 else v for k, v in t.items()}


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


def worker(name: str, length: int, args) -> dict:
    """One (backend, length) measurement, in this process alone."""
    device = torch.device(args.device)
    t = make_inputs(args.batch, args.dim, args.d_state, length, device)
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
    return {"backend": name, "length": length, "seconds": min(times), "extra_mb": extra / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--d_state", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[320, 1280, 2560])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="default: chunked, reference, mamba_ssm on CUDA, and mambapy if installed",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan.json")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return

    backends = args.backends or ["chunked", "reference"]
    if args.backends is None and args.device.startswith("cuda"):
        backends.append("mamba_ssm")
    if args.backends is None:
        try:
            import mambapy  # noqa: F401

            backends.append("mambapy")
        except ImportError:
            print("mambapy is not installed: `pip install mambapy` to compare with its pscan")
    rows = []
    for length in args.lengths:
        for name in backends:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                str(length),
                "--batch",
                str(args.batch),
                "--dim",
                str(args.dim),
                "--d_state",
                str(args.d_state),
                "--repeats",
                str(args.repeats),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} at L={length} failed:\n{done.stderr.strip().splitlines()[-1]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(
                f"  {name:10s} L={length:5d}  {rows[-1]['seconds']:.4f} s  +{rows[-1]['extra_mb']:.0f} MB",
                flush=True,
            )
        fastest = min(r["seconds"] for r in rows if r["length"] == length)
        for r in rows:
            if r["length"] == length:
                r["x_fastest"] = r["seconds"] / fastest
    print(f"\nselective scan forward+backward, B={args.batch} D={args.dim} N={args.d_state}, {args.device}")
    print_table(
        rows,
        [
            ("length", "L", "d"),
            ("backend", "backend", "s"),
            ("seconds", "fwd+bwd (s)", ".4f"),
            ("x_fastest", "x fastest", ".2f"),
            ("extra_mb", "extra memory (MB)", ".0f"),
        ],
    )
    config = {k: getattr(args, k) for k in ("batch", "dim", "d_state", "repeats", "warmup")}
    write_json(
        args.out,
        {
            "benchmark": "selective_scan_fwd_bwd",
            **environment(torch.device(args.device)),
            "config": config,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
