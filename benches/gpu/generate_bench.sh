#!/usr/bin/env bash
# Decoding throughput on the GPU machine (issue 23): `packsft bench-generate` beside transformers'
# `generate` (generate_peer.py) at the same shape, prompts and budget, float32, same card, same call.
# Assemble .device/ with `bash benches/gpu/pack.sh`, then from the repository root:
#   bash .device/generate_bench.sh        (SHAPE=llama-1.1b, BATCHES="1 8", PROMPT=128, NEW=128)
set -u
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")"
[ -x packsft ] || xz -d -k packsft.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for b in ${BATCHES:-1 8}; do
  ARGS="--shape ${SHAPE:-llama-1.1b} --batch-size $b --prompt-len ${PROMPT:-128} --new-tokens ${NEW:-128}"
  ./packsft bench-generate $ARGS --device cuda 2>&1 | tail -1
  python3 generate_peer.py $ARGS 2>&1 | grep -v -i warn | tail -1
done
