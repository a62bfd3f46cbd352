#!/usr/bin/env bash
# Where a training step's GPU time goes, kernel by kernel, with Nsight Compute (the GPU machine
# has ncu but no nsys): one warm-up and one timed step of `packsft bench`, every kernel timed once
# (gpu__time_duration, no replay, clocks left alone), summed per kernel name. Assemble .device/
# with `bash benches/gpu/pack.sh`, then `bash .device/gpu_profile.sh [data] [mode]` there.
# Writes $OUT/ncu_<data>_<mode>.csv when OUT is set, else to the current folder. SHAPE picks the
# shape (llama-1.1b), EXTRA adds bench flags (e.g. EXTRA="--lora 16 --bs 4").
set -u
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")"
[ -x packsft ] || xz -d -k packsft.xz
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -f flan.jsonl ] || python3 make_bench_data.py flan 200 32000 flan.jsonl
[ -f orca.jsonl ] || python3 make_bench_data.py orcamath 200 32000 orca.jsonl
dest=${OUT:-.}
for data in ${1:-flan}; do
  for mode in ${2:---padding-free --padded}; do
    f=$dest/ncu_${data}${mode/--/_}.csv
    "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      --print-summary per-kernel --print-units base --csv \
      ./packsft bench $data.jsonl --shape ${SHAPE:-llama-1.1b} --device cuda --dtype bf16 $mode \
      --steps 1 --warmup 1 ${EXTRA:-} > "$f" 2>"$f.err"
    python3 - "$f" <<'PY'
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
rows = rows[next(i for i, r in enumerate(rows) if "Kernel Name" in r):]
head = rows[0]
col = {h: i for i, h in enumerate(head)}
ki, ni = col["Kernel Name"], col["Invocations"]
ai = col.get("Average", col.get("Average Value"))
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[1:]:
    try:
        name = r[ki].split("(")[0].split("<")[0][:60]
        n = int(r[ni]); s = float(r[ai].replace(",", "")) * n
    except (ValueError, IndexError, TypeError):
        continue
    tot[name] += s; cnt[name] += n
all_ns = sum(tot.values())
print(f"{sys.argv[1]}: {sum(cnt.values())} kernels, {all_ns/2e6:.1f} ms GPU per step (2 steps profiled)")
for k, v in tot.most_common(40):
    print(f"{v/2e6:9.2f} ms {cnt[k]//2:6d}x  {k}")
PY
  done
done
