#!/usr/bin/env bash
# The same training benchmark with two builds on one card in one call, alternating, so that a
# refactor can be shown to change neither losses nor speed: `.device/packsft` (this build) and
# `.device/packsft-before` (the build to compare with; pack it beside the other, xz-compressed).
# Prints one JSON line per run, tagged with the build. Usage (on the GPU machine):
#   ROUNDS=2 DATAS="flan orca" bash .device/before_after.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")"
for b in packsft packsft-before; do [ -x $b ] || xz -d -k $b.xz; done
[ -f flan.jsonl ] || python3 make_bench_data.py flan 200 32000 flan.jsonl
[ -f orca.jsonl ] || python3 make_bench_data.py orcamath 200 32000 orca.jsonl
for round in $(seq ${ROUNDS:-2}); do
  for data in ${DATAS:-flan orca}; do
    for mode in --padding-free --padded; do
      for build in packsft-before packsft; do
        line=$(./$build bench $data.jsonl --shape ${SHAPE:-llama-1.1b} --device cuda --dtype bf16 $mode \
          --steps ${STEPS:-15} 2>/dev/null | tail -1)
        echo "{\"build\":\"$build\",\"data\":\"$data\",\"round\":$round,\"run\":$line}"
      done
    done
  done
done
