#!/usr/bin/env bash
# One GPU, the NCCL path end to end (issue 21): `packsft launch --nproc-per-node 1` (world size 1,
# NCCL communicator, ZeRO 0 and 1) against plain `packsft train` on the same recipe: the same
# losses, and tokens/s. Run from the repository root: `bash .device/dist_check.sh`.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NCCL_LIB=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null \
  || dirname "$(find / -name libnccl.so.2 -not -path '/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${NCCL_LIB}:${LD_LIBRARY_PATH:-}
D=$(cd "$(dirname "$0")" && pwd)
[ -x $D/packsft ] || (cd $D && xz -d -k packsft.xz)
STEPS=${STEPS:-60}
ARGS="recipes/quickstart.yaml train.device=cuda train.dtype=bf16 train.max_steps=$STEPS train.eval_steps=0 data.eval=null
  train.logging_steps=10 model.config.hidden_size=256 model.config.intermediate_size=704"
$D/packsft train $ARGS output_dir=/tmp/d-plain 2>/tmp/d-plain.err | tail -1
for z in 0 1; do
  $D/packsft launch --nproc-per-node 1 -- train $ARGS output_dir=/tmp/d-z$z dist.zero=$z 2>/tmp/d-z$z.err | tail -1
  grep -E "error|NCCL|data parallel" /tmp/d-z$z.err | head -5
done
python3 - <<'PY'
import json
runs = {k: [json.loads(l) for l in open(f"/tmp/d-{k}/metrics.jsonl") if '"loss"' in l] for k in ("plain", "z0", "z1")}
for k in ("z0", "z1"):
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(runs[k], runs["plain"]))
    tps = lambda rs: sum(r["tokens_per_s"] for r in rs[5:]) / len(rs[5:])
    print(f"{k}: steps {len(runs[k])}, worst loss rel diff vs plain {worst:.2e}, "
          f"tokens/s {tps(runs[k]):.0f} vs plain {tps(runs['plain']):.0f} ({tps(runs[k]) / tps(runs['plain']):.3f}x)")
PY
