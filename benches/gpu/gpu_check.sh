#!/usr/bin/env bash
# Assemble .device/ with `bash benches/gpu/pack.sh`; run from the repository root: `bash .device/gpu_check.sh`.
# GPU correctness over a whole run: the quickstart recipe trained on the GPU in bf16 (flash
# attention, fused layers, hand-written layer backward, fused AdamW) tracks the float32 CPU run
# of the same recipe, step by step. Hidden size 256 on 4 heads: head_dim 64, the flash kernels'
# smallest (the quickstart's own 32 would fall back to eager attention).
# LORA=1: the same with LoRA r16 all-linear adapters on the (seeded, frozen) initial model: bf16
# frozen base on the GPU, float32 on the CPU.
set -u
source "$(dirname "$0")/gpu_env.sh"
D=$(cd "$(dirname "$0")" && pwd)
[ -x $D/packsft ] || (cd $D && xz -d -k packsft.xz)
STEPS=${STEPS:-200}
EXTRA=""
[ -n "${LORA:-}" ] && EXTRA="lora.r=16 lora.alpha=32 lora.target_modules=all-linear"
TAG=${LORA:+-lora}
for run in "cuda bf16" "cpu f32"; do
  set -- $run
  $D/packsft train recipes/quickstart.yaml train.device=$1 train.dtype=$2 train.max_steps=$STEPS \
    train.eval_steps=$((STEPS / 2)) train.logging_steps=10 model.config.hidden_size=256 \
    model.config.intermediate_size=704 output_dir=/tmp/q-$1$TAG $EXTRA 2>/dev/null | tail -1
done
TAG=$TAG python3 - <<'PY'
import json, os
tag = os.environ["TAG"]
rows = {d: [json.loads(l) for l in open(f"/tmp/q-{d}{tag}/metrics.jsonl")] for d in ("cuda", "cpu")}
train = {d: [r for r in v if "loss" in r and "eval_loss" not in r] for d, v in rows.items()}
evals = {d: [r["eval_loss"] for r in v if "eval_loss" in r] for d, v in rows.items()}
for a, b in zip(train["cuda"], train["cpu"]):
    print(f"step {a.get('step')}: loss cuda bf16 {a['loss']:.4f} cpu f32 {b['loss']:.4f}")
worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(train["cuda"], train["cpu"]))
print("eval loss cuda bf16", evals["cuda"], "cpu f32", evals["cpu"])
print("worst relative difference of logged training losses:", worst)
PY
