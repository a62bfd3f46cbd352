#!/usr/bin/env bash
# Assemble .device/ first (ignored by git): the stripped CUDA build of packsft as packsft.xz (xz -6), this
# script, and copies of ../shared/bench/make_bench_data.py and hf_peer.py; run as `bash .device/gpu_bench.sh`.
# Runs on the GPU machine: packsft (eager attention, candle CUDA) and the transformers peer, same card.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
cd "$(dirname "$0")"
[ -x packsft ] || xz -d -k packsft.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 make_bench_data.py flan 200 32000 flan.jsonl
python3 make_bench_data.py orcamath 200 32000 orca.jsonl
peak() {  # command... : prints the command's last stdout line and the card's peak memory use (MiB)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > mem.log & local p=$!
  "$@" 2>err.log | tail -1; local rc=${PIPESTATUS[0]}
  kill $p; echo "  peak_mib=$(sort -n mem.log | tail -1) rc=$rc"; [ $rc = 0 ] || grep -m2 -i "error" err.log | cut -c1-300
}
for data in flan orca; do
  for mode in --padding-free --padded; do
    peak ./packsft bench $data.jsonl --shape ${SHAPE:-llama-1.1b} --device cuda --dtype bf16 $mode --steps ${STEPS:-8} --warmup 2 ${EXTRA:-}
  done
done
[ -n "${NO_PEER:-}" ] || python3 hf_peer.py flan.jsonl --steps ${STEPS:-8} --attn sdpa 2>&1 | grep -v Warn | tail -4
[ -n "${NO_PEER:-}" ] || python3 hf_peer.py orca.jsonl --steps ${STEPS:-8} --attn sdpa 2>&1 | grep -v Warn | tail -4
