#!/usr/bin/env bash
# Flash-attention checks and kernel benchmarks on the GPU machine. Assemble .device/ first with
# `bash benches/gpu/pack.sh` (on the build machine), then run `bash .device/gpu_flash.sh` there.
# Runs the GPU tests (each test binary's whole output goes to $LOGS/<binary>.log, default
# ./logs; keep them in benches/gpu/logs/ beside the numbers they back), then packsft's attention
# throughput next to PyTorch's flash SDPA. Exits non-zero if any GPU test fails.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")"
for b in packsft flash_attn gpu_optim gpu_ops; do [ -x $b ] || xz -d -k $b.xz; done
LOGS=${LOGS:-logs}
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
failed=()
for t in flash_attn gpu_optim gpu_ops; do
  ./$t --test-threads 1 --nocapture > "$LOGS/$t.log" 2>&1 || failed+=("$t")
  grep -E "^test result|panicked" "$LOGS/$t.log"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_flash.sh: GPU tests FAILED in: ${failed[*]} (logs in $LOGS/)" >&2
  exit 1
fi
[ -n "${TESTS_ONLY:-}" ] && exit 0
SHAPES=${SHAPES:-"8x512 8x2048 2x8192"}
for s in $SHAPES; do ./packsft bench-attn --equal $s --iters 10; done
python3 sdpa_bench.py $SHAPES 2>&1 | grep -v Warn
[ -f flan.jsonl ] || python3 make_bench_data.py flan 200 32000 flan.jsonl
[ -f orca.jsonl ] || python3 make_bench_data.py orcamath 200 32000 orca.jsonl
for d in flan orca; do
  ./packsft bench-attn $d.jsonl --bs 8 --batches 10 --iters 5
  ./packsft bench-attn $d.jsonl --bs 8 --batches 10 --iters 2 --attention eager
done
