#!/usr/bin/env bash
# The full table in two device calls (one call cannot hold every shape and baseline):
#   bash benchmarks/device_part_k.sh 2k    # batch 1/16/64/128 at 2k, all methods, hf_static at 1 x 2k
#   bash benchmarks/device_part_k.sh 16k   # batch 16/128 at 16k, all methods, hf_static at 128 x 16k
# then, on the CPU: throughput.py --merge <2k>/throughput.json <16k>/throughput.json --out benchmarks/results
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
case "$1" in
    2k) shapes=1x2048,16x2048,64x2048,128x2048; static=1x2048 ;;
    16k) shapes=16x16384,128x16384; static=128x16384 ;;
    *) echo "usage: $0 2k|16k" >&2; exit 2 ;;
esac
timeout 560 python3 benchmarks/throughput.py --out "$OUT" --shapes "$shapes" --static-shapes "$static" > "$OUT/throughput.log" 2>&1
grep FAILED "$OUT/throughput.log" | cut -c1-300; cat "$OUT/throughput.md"
