"""Registers per thread of the attention kernels for sm_90, compiled on the CPU (no GPU needed).

    PYTHONPATH=. python3 benchmarks/kernel_registers.py --out benchmarks/results/kernel_registers_sm90.json

Decode attention is latency bound: HBM stays busy only with enough programs resident per SM, and
registers bound those (65,536 per SM). Each configuration is compiled in a child process with
``TRITON_DUMP_PTXAS_LOG=1`` at Qwen3-8B's shapes (head dim 128, groups of 4); the table gives
ptxas's register and spill counts and the programs per SM that the registers allow. Use the
Triton version of the target machine (the numbers move between versions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
SHARED_PER_SM = 228 * 1024  # sm_90; each resident program also takes 1 KiB reserved by the driver

DECODE = dict(PAGE=16, WRITE_LSE=True, SCORE_COLS=16, DOT_PRECISION="tf32", PREFETCH=True)
FINISH = dict(PAGE=16, MERGE_GROUP=4, SCORE_M=64, SCORE_Q=16, WRITE_SCORES=True, DOT_PRECISION="tf32")
# name: (kernel, constexprs, warps[, register cap per thread: paged_attention's max_registers])
CONFIGS = {
    "attention 16-row tile, 128-position blocks, capped at 96 (decode default)": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=128, SCORE_BLOCK=0, **DECODE), 4, 96),
    "finish, 16-row tiles, 128-position blocks, capped at 168 (decode default)": (
        "_finish_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=128, SCORE_BLOCK=0, **FINISH), 4, 168),
    "attention 16-row tile, block scores, 128-position blocks, capped at 128 (pillar_block default)": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=128, SCORE_BLOCK=16, **DECODE), 4, 128),
    "attention 16-row tile, block scores, 128-position blocks, capped at 96": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=128, SCORE_BLOCK=16, **DECODE), 4, 96),
    "attention 16-row tile, 128-position blocks, uncapped": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=128, SCORE_BLOCK=0, **DECODE), 4),
    "finish, 16-row tiles, 128-position blocks, uncapped": (
        "_finish_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=128, SCORE_BLOCK=0, **FINISH), 4),
    "attention 16-row tile, 64-position blocks (session-5 decode default)": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **DECODE), 4),
    "attention 16-row tile, block scores (pillar_block)": ("_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=16, **DECODE), 4),
    "attention 16-row tile, capped at 128 registers": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **DECODE), 4, 128),
    "attention 16-row tile, capped at 104 registers": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **DECODE), 4, 104),
    "attention 16-row tile, capped at 96 registers": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **DECODE), 4, 96),
    "attention 16-row tile, capped at 80 registers": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **DECODE), 4, 80),
    "attention 16-row tile, block scores, capped at 168": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=16, **DECODE), 4, 168),
    "attention 16-row tile, block scores, capped at 128": (
        "_attention_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=16, **DECODE), 4, 128),
    "attention 64-row tile, block scores, 64-position blocks, capped at 128, 8 warps (verification-only default)": (
        "_attention_kernel", dict(BLOCK_M=64, QPT=16, BLOCK_N=64, SCORE_BLOCK=16, **DECODE), 8, 128),
    "attention 64-row tile, 8 warps": ("_attention_kernel", dict(BLOCK_M=64, QPT=16, BLOCK_N=64, SCORE_BLOCK=0, **DECODE), 8),
    "attention 64-row tile, 4 warps": ("_attention_kernel", dict(BLOCK_M=64, QPT=16, BLOCK_N=64, SCORE_BLOCK=0, **DECODE), 4),
    "attention 64-row tile, 32-position blocks, 8 warps": (
        "_attention_kernel", dict(BLOCK_M=64, QPT=16, BLOCK_N=32, SCORE_BLOCK=0, **DECODE), 8),
    "attention 64-row tile, 32-position blocks, 4 warps": (
        "_attention_kernel", dict(BLOCK_M=64, QPT=16, BLOCK_N=32, SCORE_BLOCK=0, **DECODE), 4),
    "finish, 16-row tiles (score pass)": ("_finish_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **FINISH), 4),
    "finish, block scores (pillar_block)": ("_finish_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=16, **FINISH), 4),
    "finish, 16-row tiles, capped at 168": ("_finish_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **FINISH), 4, 168),
    "finish, 16-row tiles, capped at 128": ("_finish_kernel", dict(BLOCK_M=16, QPT=4, BLOCK_N=64, SCORE_BLOCK=0, **FINISH), 4, 128),
}

CHILD = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
from test_triton_kernels import compile_sm90
print("shared bytes", compile_sm90(*json.loads(sys.argv[1])).metadata.shared)
"""


def measure(kernel: str, constexprs: dict, warps: int, max_registers: int | None = None) -> dict:
    env = {**os.environ, "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
    env.pop("TRITON_INTERPRET", None)
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([kernel, constexprs, warps, 2, max_registers])],
                          capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    shared = re.search(r"shared bytes (\d+)", log)
    if proc.returncode != 0 or regs is None or shared is None:
        return {"error": log[-2000:]}
    registers, shared_bytes = int(regs.group(1)), int(shared.group(1))
    threads = 32 * warps
    return {
        "kernel": kernel, "warps": warps, "max_registers": max_registers, "registers": registers,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
        "shared_bytes": shared_bytes,
        "programs_per_sm": min(REGISTERS_PER_SM // (registers * threads), THREADS_PER_SM // threads,
                               SHARED_PER_SM // (shared_bytes + 1024)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import triton

    results = {"triton": triton.__version__, "configs": {}}
    print(f"Triton {triton.__version__}, sm_90, Qwen3-8B shapes (D=128, G=4)")
    print(f"{'configuration':76s} {'warps':>5s} {'regs':>5s} {'spills':>7s} {'shared':>7s} {'programs/SM':>11s}")
    for name, (kernel, constexprs, warps, *cap) in CONFIGS.items():
        row = measure(kernel, constexprs, warps, *cap)
        results["configs"][name] = {"constexprs": constexprs, **row}
        if "error" in row:
            print(f"{name:76s} error: {row['error'][-300:]}")
            continue
        spills = row["spill_store_bytes"] + row["spill_load_bytes"] if row["spill_store_bytes"] is not None else "?"
        print(f"{name:76s} {warps:5d} {row['registers']:5d} {spills!s:>7s} {row['shared_bytes']:7d} {row['programs_per_sm']:11d}")
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
