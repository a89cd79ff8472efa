"""Why the CPU scan is a numba kernel: its forward+backward against torch.compile of the recurrence.

At the small-scale finetune shape (b, d, g, n, l) = (64, 384, 4, 16, 37) by default, in one
process with the candidates taking turns: ``numba`` (the default CPU backend), ``chunked`` (pure
PyTorch), and ``compiled``: ``torch.compile`` (inductor, needs a C++ compiler) of the plain
recurrence of ``scan_reference``, with its cold compile time reported separately.

    python benchmarks/scan_alternatives.py
    python benchmarks/scan_alternatives.py --shape 2,384,1,16,1280 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
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
from scan import make_inputs, parse_shape
from starmamba.ops.scan_chunked import scan_chunked
from starmamba.ops.scan_numba import scan_numba
from starmamba.ops.scan_reference import scan_reference


def core_inputs(t: dict) -> tuple:
    """The discretisation's inputs as the cores take them: u, dt, A, B, C (leaves, with gradients)."""
    dt = F.softplus(t["delta"] + t["delta_bias"][:, None]).detach()
    return tuple(v.detach().clone().requires_grad_() for v in (t["u"], dt, t["A"], t["B"], t["C"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=(64, 384, 4, 16, 37))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan_alternatives.json")
    args = parser.parse_args()
    device = torch.device("cpu")
    inputs = core_inputs(make_inputs(*args.shape, device))
    compiled = torch.compile(scan_reference, dynamic=False)
    candidates = {"numba": scan_numba, "chunked": scan_chunked, "compiled": compiled}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.steps + 1):  # the first call of each compiles (numba: from its disk cache if warm)
        for name, fn in candidates.items():
            start = time.perf_counter()
            y, last = fn(*inputs)
            (y.sum() + last.sum()).backward()
            times[name].append(time.perf_counter() - start)
    rows = [{"candidate": name, "seconds": statistics.median(v[1:]), "first_call_s": v[0]}
            for name, v in times.items()]  # fmt: skip
    fastest = min(r["seconds"] for r in rows)
    for row in rows:
        row["x_fastest"] = row["seconds"] / fastest
    print(f"\nscan core forward+backward at {args.shape}, {device_name(device)}")
    print_table(
        rows,
        [
            ("candidate", "candidate", "s"),
            ("seconds", "fwd+bwd (s)", ".4f"),
            ("x_fastest", "x fastest", ".2f"),
            ("first_call_s", "first call incl. compile (s)", ".1f"),
        ],
    )
    write_json(args.out, {"benchmark": "scan_alternatives", **environment(device), "shape": args.shape, "rows": rows})


if __name__ == "__main__":
    main()
