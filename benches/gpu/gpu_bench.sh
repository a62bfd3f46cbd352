#!/usr/bin/env bash
# Training throughput on the GPU machine: packsft padding-free and padded, then the transformers
# peer (../shared/bench/hf_peer.py) on the same data, same card, same run. Assemble .device/ first
# with `bash benches/gpu/pack.sh` (on the build machine), then run `bash .device/gpu_bench.sh` there.
# peak_gib: packsft reports the CUDA allocator's high-water mark, the peer torch's
# max_memory_allocated.
set -u
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")"
[ -x packsft ] || xz -d -k packsft.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f flan.jsonl ] || python3 make_bench_data.py flan 200 32000 flan.jsonl
[ -f orca.jsonl ] || python3 make_bench_data.py orcamath 200 32000 orca.jsonl
for data in flan orca; do
  for mode in --padding-free --padded; do
    ./packsft bench $data.jsonl --shape ${SHAPE:-llama-1.1b} --device cuda --dtype bf16 $mode \
      --steps ${STEPS:-15} ${EXTRA:-} 2>&1 | tail -1
  done
  [ -n "${NO_PEER:-}" ] || python3 hf_peer.py $data.jsonl --steps ${STEPS:-15} \
    --attn ${PEER_ATTN:-sdpa,flex_attention} 2>&1 | grep -v -i warn | tail -6
done
