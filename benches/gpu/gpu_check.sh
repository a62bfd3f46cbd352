#!/usr/bin/env bash
# Assemble .device/ with `bash benches/gpu/pack.sh`; run from the repository root: `bash .device/gpu_check.sh`.
# GPU correctness: the quickstart trained on the GPU (f32) tracks the CPU run of the same recipe.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
D=$(cd "$(dirname "$0")" && pwd)
[ -x $D/packsft ] || (cd $D && xz -d -k packsft.xz)
for dev in cuda cpu; do
  $D/packsft train recipes/quickstart.yaml train.device=$dev train.max_steps=100 train.eval_steps=50 output_dir=/tmp/q-$dev 2>/dev/null | tail -1
done
python3 - <<'PY'
import json
rows = {d: [json.loads(l) for l in open(f"/tmp/q-{d}/metrics.jsonl") if '"loss"' in l] for d in ("cuda", "cpu")}
worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(rows["cuda"], rows["cpu"]))
print("quickstart 100 steps, cuda vs cpu f32: worst relative step-loss difference", worst)
PY
