#!/usr/bin/env bash
# LoRA r16 (all-linear, alpha 32) training throughput on one card in one call: packsft beside
# strong_peer.py --lora 16 (compiled PyTorch, bf16 frozen base, varlen packing) and hf_peer.py
# --lora 16 (transformers + PEFT). Prints each run's JSON line under a `## command` header and keeps
# the full logs in $OUT. Usage (on the GPU machine, after benches/gpu/pack.sh here):
#   PART=all bash .device/lora_bench.sh     # the headline runs of both shapes, most important first
#   PART=pair bash .device/lora_bench.sh    # packsft beside the strong peer only, llama-8b first
#   PART=small bash .device/lora_bench.sh   # llama-1.1b, bs 8, FLAN-like and OrcaMath-like
#   PART=large bash .device/lora_bench.sh   # llama-8b: bs 4 beside the strong peer, bs 8 without
#                                           # checkpointing, ~32k-token packed rows with it
set -uo pipefail
# The nccl build links libnccl.so.2: PyTorch's copy on the GPU machine.
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/lora_bench}
mkdir -p "$OUT"
[ -x packsft ] || xz -d -k packsft.xz
[ -f flan.jsonl ] || python3 make_bench_data.py flan 200 32000 flan.jsonl
[ -f orca.jsonl ] || python3 make_bench_data.py orcamath 200 32000 orca.jsonl
[ -f orca600.jsonl ] || python3 make_bench_data.py orcamath 600 32000 orca600.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
n=0
run() {
  n=$((n + 1))
  echo "## $*"
  "$@" > "$OUT/run$n.log" 2>&1
  echo "rc=$? $(grep -E '^\{' "$OUT/run$n.log" | tail -2 | tr '\n' ' ')"
}
pk() { run ./packsft bench "$@" --device cuda --dtype bf16 --lora 16; }
case ${PART:-small} in
pair)
  # The headline comparisons only, llama-8b first.
  for d in flan orca; do
    pk $d.jsonl --shape llama-8b --bs 4 --padding-free
    run python3 strong_peer.py $d.jsonl --shape llama-8b --bs 4 --lora 16 --mode packed
  done
  for d in flan orca; do
    pk $d.jsonl --shape llama-1.1b --bs 8 --padding-free
    run python3 strong_peer.py $d.jsonl --shape llama-1.1b --bs 8 --lora 16 --mode packed
  done
  ;;
all)
  # Most important first: a call that runs out of time still returns what it measured.
  for d in flan orca; do
    pk $d.jsonl --shape llama-1.1b --bs 8 --padding-free
    run python3 strong_peer.py $d.jsonl --shape llama-1.1b --bs 8 --lora 16 --mode packed
  done
  pk flan.jsonl --shape llama-8b --bs 4 --padding-free
  run python3 strong_peer.py flan.jsonl --shape llama-8b --bs 4 --lora 16 --mode packed
  pk flan.jsonl --shape llama-8b --bs 8 --padding-free
  pk orca600.jsonl --shape llama-8b --bs 76 --padding-free --gradient-checkpointing --steps 5 --warmup 2
  run python3 hf_peer.py flan.jsonl --shape llama-1.1b --bs 8 --lora 16 --modes packed
  pk orca.jsonl --shape llama-8b --bs 4 --padding-free
  run python3 strong_peer.py orca.jsonl --shape llama-8b --bs 4 --lora 16 --mode packed
  ;;
small)
  for d in flan orca; do
    pk $d.jsonl --shape llama-1.1b --bs 8 --padding-free
    run python3 strong_peer.py $d.jsonl --shape llama-1.1b --bs 8 --lora 16 --mode padded,packed
    pk $d.jsonl --shape llama-1.1b --bs 8 --padded
  done
  run python3 hf_peer.py flan.jsonl --shape llama-1.1b --bs 8 --lora 16 --modes packed
  ;;
large)
  for d in flan orca; do
    pk $d.jsonl --shape llama-8b --bs 4 --padding-free
    run python3 strong_peer.py $d.jsonl --shape llama-8b --bs 4 --lora 16 --mode padded,packed
  done
  pk flan.jsonl --shape llama-8b --bs 8 --padding-free
  # ~32k tokens a packed row (OrcaMath-like mean ~430 tokens x 76) with gradient checkpointing.
  pk orca600.jsonl --shape llama-8b --bs 76 --padding-free --gradient-checkpointing --steps 5 --warmup 2
  ;;
esac
