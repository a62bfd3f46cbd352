#!/usr/bin/env bash
# GPU correctness of the newer families over a short run (issue 24): the quickstart recipe with each
# family's model (hidden 256, 4 heads of 64: the flash kernels' smallest head_dim) trained on the GPU
# in bf16 (flash attention where the family allows it, fused layers, hand-written backward, fused
# AdamW) and on the CPU in float32, the logged losses compared step by step.
# Assemble .device/ with `bash benches/gpu/pack.sh`; from the repository root:
#   bash .device/family_check.sh            (FAMILIES="qwen3 qwen3_moe olmo2 granitemoe gemma2 gemma3_text", STEPS=60)
# DEVICES="cpu" runs the CPU half alone (a smoke test of the overrides on a machine without a GPU).
set -u
source "$(dirname "$0")/gpu_env.sh"
D=$(cd "$(dirname "$0")" && pwd)
BIN=${PACKSFT:-$D/packsft}
[ -x "$BIN" ] || (cd $D && xz -d -k packsft.xz)
STEPS=${STEPS:-60}
C=model.config
BASE="$C.hidden_size=256 $C.intermediate_size=512 $C.num_attention_heads=4 $C.num_key_value_heads=2"
for fam in ${FAMILIES:-qwen3 qwen3_moe olmo2 granitemoe gemma2 gemma3_text}; do
  case $fam in
    qwen3) X="$C.head_dim=64" ;;
    qwen3_moe) X="$C.head_dim=64 $C.moe_intermediate_size=128 $C.num_experts=4 $C.num_experts_per_tok=2
                  $C.output_router_logits=true $C.router_aux_loss_coef=0.01" ;;
    olmo2) X="" ;;
    granitemoe) X="$C.num_local_experts=4 $C.num_experts_per_tok=2 $C.embedding_multiplier=12.0
                   $C.residual_multiplier=0.22 $C.attention_multiplier=0.015625 $C.logits_scaling=4.0
                   $C.output_router_logits=true $C.router_aux_loss_coef=0.01" ;;
    gemma2) X="$C.head_dim=64 $C.query_pre_attn_scalar=64 $C.sliding_window=16
               $C.attn_logit_softcapping=50.0 $C.final_logit_softcapping=30.0" ;;
    gemma3_text) X="$C.head_dim=64 $C.query_pre_attn_scalar=64 $C.sliding_window=16
                    $C.sliding_window_pattern=2 $C.rope_local_base_freq=10000.0" ;;
  esac
  for run in ${DEVICES:-"cuda bf16" "cpu f32"}; do
    set -- $run
    dt=${2:-f32}
    $BIN train recipes/quickstart.yaml $C.model_type=$fam $BASE $X train.device=$1 train.dtype=$dt \
      train.max_steps=$STEPS train.eval_steps=0 data.eval=null train.logging_steps=10 train.save_steps=0 \
      output_dir=/tmp/fc-$fam-$1 2>/tmp/fc-$fam-$1.err | tail -1
    grep -iE "error|warn" /tmp/fc-$fam-$1.err | head -3
  done
done
FAMILIES="${FAMILIES:-qwen3 qwen3_moe olmo2 granitemoe gemma2 gemma3_text}" python3 - <<'PY'
import json, os
for fam in os.environ["FAMILIES"].split():
    rows = {}
    for d in ("cuda", "cpu"):
        p = f"/tmp/fc-{fam}-{d}/metrics.jsonl"
        if os.path.exists(p):
            rows[d] = [json.loads(l) for l in open(p) if '"loss"' in l and "eval_loss" not in l]
    if len(rows) < 2:
        print(fam, {d: [round(r["loss"], 4) for r in v] for d, v in rows.items()})
        continue
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(rows["cuda"], rows["cpu"]))
    print(f"{fam:12} steps {len(rows['cuda'])}: first loss cuda {rows['cuda'][0]['loss']:.4f} cpu {rows['cpu'][0]['loss']:.4f}, "
          f"last cuda {rows['cuda'][-1]['loss']:.4f} cpu {rows['cpu'][-1]['loss']:.4f}, worst relative difference {worst:.2e}")
PY
