#!/usr/bin/env bash
# One GPU, the NCCL path end to end (issue 21): `packsft launch --nproc-per-node 1` (world size 1,
# NCCL communicator, ZeRO 0, 1 and 2) against plain `packsft train` on the same recipe: the same
# losses, and tokens/s. Run from the repository root: `bash .device/dist_check.sh`.
# SHAPE=small: the quickstart model at hidden 256 (a step of a few ms: every host cost shows);
# SHAPE=1b: the quickstart recipe at TinyLlama-1.1B's shape (hidden 2048, 22 layers): short rows, about
#   320 tokens a step, so a step is mostly passes over the parameters (docs/BENCHMARKS.md, 2026-12-08);
# SHAPE=1b-flan: the same model on the one-GPU benchmark's FLAN-like rows (make_bench_data.py, 8 a step):
#   the tokens a step of `packsft bench`'s llama-1.1b row.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source "$(dirname "$0")/gpu_env.sh"
D=$(cd "$(dirname "$0")" && pwd)
[ -x $D/packsft ] || (cd $D && xz -d -k packsft.xz)
STEPS=${STEPS:-60}
SHAPE=${SHAPE:-small}
case $SHAPE in
  small) MODEL="model.config.hidden_size=256 model.config.intermediate_size=704" ;;
  1b) MODEL="model.config.hidden_size=2048 model.config.intermediate_size=5632 model.config.num_hidden_layers=22
        model.config.num_attention_heads=32 model.config.num_key_value_heads=4 train.batch_size=16" ;;
  1b-flan)
    [ -f /tmp/flan-dist.jsonl ] || python3 $D/make_bench_data.py flan 400 32000 /tmp/flan-dist.jsonl
    MODEL="model.config.hidden_size=2048 model.config.intermediate_size=5632 model.config.num_hidden_layers=22
        model.config.num_attention_heads=32 model.config.num_key_value_heads=4 model.config.vocab_size=32000
        model.config.max_position_embeddings=4096 data.train=/tmp/flan-dist.jsonl data.max_length=4096
        train.batch_size=8" ;;
  *) echo "dist_check.sh: SHAPE is small, 1b or 1b-flan" >&2; exit 2 ;;
esac
ARGS="recipes/quickstart.yaml train.device=cuda train.dtype=bf16 train.max_steps=$STEPS train.eval_steps=0 data.eval=null
  train.logging_steps=10 train.save_steps=0 $MODEL"
$D/packsft train $ARGS output_dir=/tmp/d-$SHAPE-plain 2>/tmp/d-$SHAPE-plain.err | tail -1
grep -iE "error" /tmp/d-$SHAPE-plain.err | head -5
for z in 0 1 2; do
  $D/packsft launch --nproc-per-node 1 -- train $ARGS output_dir=/tmp/d-$SHAPE-z$z dist.zero=$z 2>/tmp/d-$SHAPE-z$z.err | tail -1
  grep -iE "error|data parallel" /tmp/d-$SHAPE-z$z.err | head -5
done
SHAPE=$SHAPE python3 - <<'PY'
import json, os
shape = os.environ["SHAPE"]
runs = {k: [json.loads(l) for l in open(f"/tmp/d-{shape}-{k}/metrics.jsonl") if '"loss"' in l]
        for k in ("plain", "z0", "z1", "z2")}
tps = lambda rs: sum(r["tokens_per_s"] for r in rs[2:]) / len(rs[2:])
for k in ("z0", "z1", "z2"):
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(runs[k], runs["plain"]))
    same_as_z0 = all(a["loss"] == b["loss"] for a, b in zip(runs[k], runs["z0"]))
    print(f"{shape} {k}: steps {len(runs[k])}, worst loss rel diff vs plain {worst:.2e}, "
          f"losses identical to z0: {same_as_z0}, "
          f"tokens/s {tps(runs[k]):.0f} vs plain {tps(runs['plain']):.0f} ({tps(runs[k]) / tps(runs['plain']):.3f}x)")
    # Where a step's time goes: the forward and backward (the rank's device time, CUDA events) and
    # the rest (gradient sums, the update, the weights' gathering), against plain train's step.
    rs, ps = runs[k][2:], runs["plain"][2:]
    step_ms = 1e3 * sum(r["tokens"] / r["tokens_per_s"] for r in rs) / len(rs)
    plain_ms = 1e3 * sum(r["tokens"] / r["tokens_per_s"] for r in ps) / len(ps)
    compute = [r["rank_compute_s"][0] for r in rs if "rank_compute_s" in r]
    if compute:
        compute_ms = 1e3 * sum(compute) / len(compute)
        print(f"{shape} {k}: step {step_ms:.2f} ms (plain {plain_ms:.2f}), forward + backward "
              f"{compute_ms:.2f} ms, the rest {step_ms - compute_ms:.2f} ms")
PY
