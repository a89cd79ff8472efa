"""How close the CPU scan is to its floor: the recurrence loop alone against the fused kernel in use.

Every state update of a selective scan is h = exp(dt A) h + dt u B, y += C h: one exp of its own
(A is learned per channel and state, so no two updates share a decay) and two multiply-adds. This
script times, on one thread, that loop alone on a block of 192 channels x 16 states kept in L1
(``loop``), and the same loop with the decays given (``loop, no exp``: what the exp costs); then
the fused inference kernel (:func:`starmamba.ops.directions.scan_directions`, numba) at each MambaMLP
preset's mixer shape (224 px, batch 8, four directions), on all of torch's threads. The floor of a
preset's scan is its updates per forward divided by the threads' loop rate.

    python benchmarks/scan_floor.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Before torch: starmamba sets torch's OpenMP wait policy as the starmamba command has it.
import starmamba  # noqa: F401

# isort: split

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, print_table, write_json
from starmamba.models import model_config
from starmamba.models.mixer import scan_orders
from starmamba.ops.directions import scan_directions
from starmamba.ops.scan_numba import _JIT, fast_exp


@numba.njit(**_JIT)
def _loop(steps, A, dt, dtu, B, C, h, y, with_exp):
    """``steps`` scan steps of one channel block: A, h (n, block); dt, dtu, y (block,); B, C (64, n)."""
    d_state, block = A.shape
    for t in range(steps):
        for n in range(d_state):
            bn, cn = B[t % 64, n], C[t % 64, n]
            if with_exp:
                for j in range(block):
                    hv = fast_exp(dt[j] * A[n, j]) * h[n, j] + dtu[j] * bn
                    h[n, j] = hv
                    y[j] += cn * hv
            else:
                for j in range(block):
                    hv = A[n, j] * h[n, j] + dtu[j] * bn
                    h[n, j] = hv
                    y[j] += cn * hv


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def loop_rate(with_exp: bool, steps: int, repeats: int) -> float:
    """State updates per second of the bare loop on one thread."""
    rng = np.random.default_rng(0)
    A = -rng.random((16, 192), dtype=np.float32)
    dt = (0.1 * rng.random(192, dtype=np.float32)).astype(np.float32)
    B, C = rng.random((64, 16), dtype=np.float32), rng.random((64, 16), dtype=np.float32)
    h, y = np.zeros((16, 192), np.float32), np.zeros(192, np.float32)
    seconds = best_seconds(lambda: _loop(steps, A, dt, dt * 2, B, C, h, y, with_exp), repeats)
    return steps * A.size / seconds


def kernel_seconds(dim: int, batch: int, repeats: int) -> tuple[float, int]:
    """(seconds of one fused inference call at a preset's mixer shape, its state updates)."""
    grid, K, d_state = 14, 4, 16
    length = grid * grid + 1
    orders = torch.cat([torch.arange(length).expand(1, 2, length), scan_orders(grid, grid, length - 1)])
    u, delta = torch.randn(K, batch, length, dim), torch.randn(K, batch, length, dim) - 4
    B, C = torch.randn(K, batch, length, d_state), torch.randn(K, batch, length, d_state)
    A = -torch.rand(K * dim, d_state) * d_state
    D, bias, z = torch.ones(K * dim), torch.zeros(K * dim), torch.randn(batch, length, dim)
    with torch.inference_mode():
        seconds = best_seconds(lambda: scan_directions(u, delta, A, B, C, D, bias, orders, z, "numba"), repeats)
    return seconds, K * batch * length * dim * d_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "base", "large", "huge"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan_floor.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    loop = loop_rate(True, 20000, args.repeats)
    no_exp = loop_rate(False, 20000, args.repeats)
    print(f"one thread, 192 channels x 16 states in L1: loop {loop / 1e9:.2f} G updates/s, "
          f"without the exp {no_exp / 1e9:.2f} G updates/s")  # fmt: skip
    rows = []
    for size in args.sizes:
        cfg = model_config(f"mambamlp_{size}")
        seconds, updates = kernel_seconds(cfg.expand * cfg.dim, args.batch, args.repeats)
        rows.append({"size": size, "blocks": cfg.depth, "updates_g": updates * cfg.depth / 1e9,
                     "kernel_ms": seconds * cfg.depth * 1e3, "floor_ms": updates * cfg.depth / (threads * loop) * 1e3,
                     "g_updates_per_s_per_thread": updates / seconds / threads / 1e9})  # fmt: skip
        rows[-1]["x_floor"] = rows[-1]["kernel_ms"] / rows[-1]["floor_ms"]
    print(f"\nfused inference scan per forward (batch {args.batch}, 224 px, 4 directions), {threads} threads")
    print_table(rows, [("size", "size", "s"), ("blocks", "blocks", "d"), ("updates_g", "updates (G)", ".3f"),
                       ("kernel_ms", "fused kernel (ms)", ".1f"), ("floor_ms", "loop floor (ms)", ".1f"),
                       ("x_floor", "x floor", ".2f"),
                       ("g_updates_per_s_per_thread", "G updates/s/thread", ".2f")])  # fmt: skip
    write_json(args.out, {"benchmark": "scan_floor", **environment(torch.device("cpu")), "batch": args.batch,
                          "loop_g_updates_per_s": loop / 1e9, "loop_without_exp_g_updates_per_s": no_exp / 1e9,
                          "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
