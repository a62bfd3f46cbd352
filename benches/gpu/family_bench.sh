#!/usr/bin/env bash
# The newer families' bench shapes on the GPU machine (issue 24): `packsft bench --shape` beside
# family_peer.py (hf_peer.py's loop at the same config), same data, same card, same call.
# qwen3-8b: LoRA r16 all-linear at 4 examples a step on both sides (full fine-tuning of 8B does not
# fit one 80 GiB card); gemma2-2b: full fine-tuning at 4 a step. Gemma 2 soft-caps its scores: packsft's
# flash kernels compute that; the peer runs eager and flex_attention (sdpa drops the soft-capping).
# Assemble .device/ with `bash benches/gpu/pack.sh`, then from the repository root:
#   SHAPE=qwen3-8b bash .device/family_bench.sh     (DATAS="flan orca" by default, STEPS=15)
set -u
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")"
[ -x packsft ] || xz -d -k packsft.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
SHAPE=${SHAPE:-qwen3-8b}
case $SHAPE in
  qwen3-8b) OURS="--lora 16 --bs 4"; PEER="--lora 16 --bs 4 --attn ${PEER_ATTN:-sdpa,flex_attention}" ;;
  gemma2-2b) OURS="--bs 4"; PEER="--bs 4 --attn ${PEER_ATTN:-eager,flex_attention}" ;;
  *) echo "family_bench.sh: SHAPE is qwen3-8b or gemma2-2b" >&2; exit 2 ;;
esac
for d in ${DATAS:-flan orca}; do
  [ -f $d.jsonl ] || python3 make_bench_data.py $([ $d = flan ] && echo flan || echo orcamath) 200 32000 $d.jsonl
  ./packsft bench $d.jsonl --shape $SHAPE --device cuda --dtype bf16 --padding-free \
    --steps ${STEPS:-15} $OURS 2>&1 | tail -1
  python3 family_peer.py $d.jsonl --shape $SHAPE --steps ${STEPS:-15} --modes packed $PEER 2>&1 \
    | grep -v -i warn | tail -3
done
