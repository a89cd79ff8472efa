"""Compile the Triton scan kernels ahead of time for CUDA targets, without a GPU, and report ptxas's usage.

Run as a script (``python tests/triton_aot.py 80 90``) in a process without TRITON_INTERPRET: it
prints one JSON line per compiled kernel with its registers and spill bytes, as read from the
``ptxas -v`` that ships inside the triton wheel, its shared memory, and for the backward the programs
per SM its grid is sized to (``scan_triton.programs_per_sm``) on an A100 (sm_80) or H100 (sm_90).
"""

import json
import re
import subprocess
import sys

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from starmamba.ops import scan_triton

# (batch, dim, groups, d_state) of the benchmark and model shapes; between them they reach every
# BLOCK_D the launcher picks.
SHAPES = [(64, 384, 4, 16), (8, 96, 1, 16), (16, 768, 1, 16), (32, 1024, 1, 16), (128, 3072, 4, 16)]
TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Pointers to tensors in the inputs' dtype; every other pointer is fp32 (A, D, bias, states, partials).
INPUT_DTYPE_POINTERS = {f"{name}_ptr" for name in ("u", "delta", "B", "C", "z", "y", "gy", "du", "ddelta", "dz")}
KERNELS = {"forward": scan_triton._scan_fwd_kernel, "backward": scan_triton._scan_bwd_kernel}
# Per SM: 2048 threads on both; shared memory 164 KiB (A100) and 228 KiB (H100), as CUDA reports them.
SM_LIMITS = {80: scan_triton.SmLimits(2048, 167936), 90: scan_triton.SmLimits(2048, 233472)}


def compile_kernel(kernel, dtype: str, config: scan_triton.LaunchConfig, capability: int):
    """``kernel`` compiled with every optional input present, as the launcher would specialise it for training."""
    constexprs = {
        "D_STATE": config.block_n,
        "CHUNK": scan_triton.CHUNK,
        "BLOCK_D": config.block_d,
        "KEEP_CHUNKS": True,
        "HAS_D": True,
        "HAS_Z": True,
        "HAS_BIAS": True,
        "SOFTPLUS": True,
    }
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (TYPES[dtype] if name in INPUT_DTYPE_POINTERS else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": config.num_warps})


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers and spill bytes that the wheel's ptxas reports for ``ptx``."""
    arch = re.search(r"^\.target (\S+)", ptx, re.MULTILINE).group(1)
    log = subprocess.run(
        [knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", "-", "-o", "/dev/null"],
        input=ptx,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", log).group(1)),
    }


def main(capabilities: list[int]) -> None:
    configs = sorted({scan_triton.launch_config(*shape) for shape in SHAPES}, key=lambda c: c.block_d)
    for capability in capabilities:
        for config in configs:
            for dtype in TYPES:
                for name, kernel in KERNELS.items():
                    compiled = compile_kernel(kernel, dtype, config, capability)
                    usage = ptxas_usage(compiled.asm["ptx"]) | {"shared": compiled.metadata.shared}
                    if name == "backward":
                        usage["programs_per_sm"] = scan_triton.programs_per_sm(
                            usage["registers"], usage["shared"], config.num_warps, SM_LIMITS[capability]
                        )
                    row = {"kernel": name, "sm": capability, "dtype": dtype, **vars(config), **usage}
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]])
