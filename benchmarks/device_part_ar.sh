#!/usr/bin/env bash
# Session 11, call 3: (1) Nsight Compute counters of the attention kernels (occupancy, stall reasons,
# memory throughput) on a Qwen3-8B-shape draft-only step, the bench unified step and a Qwen3-8B-shape
# lockstep verification; (2) the Qwen3-8B shape at 64 x 8k in lockstep rounds end to end (draft steps
# now unsplit, whole-row verifications unsplit).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT/ncu" "$OUT/qwen"
timeout 200 ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 benchmarks/ncu_attention.py > "$OUT/ncu/report.txt" 2> "$OUT/ncu/stderr.txt"
echo "ncu rc $?"; tail -3 "$OUT/ncu/stderr.txt" | cut -c1-200
grep -E "== profiled|_kernel|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Stall|Issued Warp|No Eligible|Waves Per SM|Grid Size|Shared Memory Config" "$OUT/ncu/report.txt" | cut -c1-150 | head -120
timeout 200 python3 benchmarks/throughput.py --out "$OUT/qwen" --skip-bench --qwen8b --qwen-methods sparsespec > "$OUT/qwen/throughput.log" 2>&1
grep FAILED "$OUT/qwen/throughput.log" | cut -c1-300; grep -A 3 "^| model" "$OUT/qwen/throughput.log"
python3 - "$OUT/qwen/throughput_qwen8b.json" <<'PY' 2>&1 | cut -c1-300
import json, sys
for r in json.load(open(sys.argv[1])):
    for kind, s in r["steps"].items():
        print(r["method"], kind, {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()})
PY
