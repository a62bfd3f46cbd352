#!/usr/bin/env bash
# Multi-GPU scaling (issue 22), on a machine with several GPUs, from the repository root:
#   SHAPE=llama-1.1b bash .device/dist_bench.sh      (NS="1 2 4 8" up to the GPUs present)
#   SHAPE=llama-8b NS="2 8" bash .device/dist_bench.sh
#
# Per data set and N:
# - packsft runs `launch --nproc-per-node N -- train` under dist.zero 0, 1 and 2 (llama-8b: 1 and 2; its
#   full fine-tuning does not fit one GPU), with 8 examples a GPU a step (train.batch_size=8);
# - dist_peer.py runs under torchrun (DDP and FSDP2; llama-8b: FSDP2) on the same data, with the same
#   global batch, on the same machine, in the same call.
# Each run reports tokens/s over the steps after the first two, and the largest memory any GPU used
# (nvidia-smi, sampled every 200 ms, the same for both sides).
# For N > 1 at llama-1.1b, one process also runs the same global batch (train.batch_size=8N), and the
# first 10 losses of every N-GPU run are compared with it (worst relative difference).
# Data: FLAN-like and OrcaMath-like rows from make_bench_data.py (DATAS="flan orca").
#
# DEVICE=cpu SHAPE=tiny NS="1 2" checks the script on a machine without GPUs (TCP ranks, gloo peer).
# Each run is cut at RUN_TIMEOUT seconds (240). A device call lasts at most 600 s: at llama-1.1b one data set
# with NS="1 2 4 8" is about 24 runs, so give each call one data set (DATAS=flan, then DATAS=orca) or fewer Ns.
# NVLink multicast stays off for both sides.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=$(cd "$(dirname "$0")" && pwd)
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  source "$D/gpu_env.sh"
  GPUS=$(nvidia-smi -L | wc -l)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
else
  GPUS=${GPUS:-2}
  export PEER_DEVICE=cpu
fi
PACKSFT=${PACKSFT:-$D/packsft}
[ -x "$PACKSFT" ] || (cd "$D" && xz -d -k packsft.xz)
SHAPE=${SHAPE:-llama-1.1b}
STEPS=${STEPS:-20}
OUTS=${OUTS:-/tmp/dist-bench}
mkdir -p "$OUTS"
case $SHAPE in
  llama-1.1b) CONFIG="hidden_size=2048 intermediate_size=5632 num_hidden_layers=22 num_attention_heads=32
      num_key_value_heads=4 vocab_size=32000 max_position_embeddings=4096"
    ZEROS=${ZEROS:-"0 1 2"}; WRAPS=${WRAPS:-"ddp fsdp2"}; ONE=1 ;;
  llama-8b) CONFIG="hidden_size=4096 intermediate_size=14336 num_hidden_layers=32 num_attention_heads=32
      num_key_value_heads=8 vocab_size=128256 max_position_embeddings=8192 rope_theta=500000.0"
    ZEROS=${ZEROS:-"1 2"}; WRAPS=${WRAPS:-"fsdp2"}; ONE=0 ;;
  tiny) CONFIG="hidden_size=64 intermediate_size=128 num_hidden_layers=2 num_attention_heads=4
      num_key_value_heads=2 vocab_size=32000 max_position_embeddings=4096"
    ZEROS=${ZEROS:-"0 1 2"}; WRAPS=${WRAPS:-"ddp"}; ONE=1 ;;
  *) echo "dist_bench.sh: SHAPE is llama-1.1b, llama-8b or tiny" >&2; exit 2 ;;
esac
MODEL=$(for kv in $CONFIG; do printf 'model.config.%s ' "$kv"; done)

# Runs "$@" while sampling every GPU's used memory; prints the command's last line, then the peak.
sampled() {
  local log=$1; shift
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$log.mem" &
    local smi=$!
  fi
  # A run that hangs (an NCCL initialisation that never completes) costs RUN_TIMEOUT, not the call.
  timeout --kill-after=10 "${RUN_TIMEOUT:-240}" "$@" > "$log" 2> "$log.err"
  local rc=$?
  [ "$DEVICE" = cuda ] && kill $smi 2>/dev/null
  tail -1 "$log"
  if [ "$DEVICE" = cuda ]; then
    echo "peak GPU memory used (nvidia-smi): $(sort -n "$log.mem" | tail -1) MiB"
  fi
  [ $rc = 0 ] || { echo "FAILED (rc $rc): $*"; grep -iE "error|panicked" "$log.err" | head -3; }
}

# packsft's run in $1: tokens/s over the steps after the first two, the ranks' mean compute-time
# spread over those steps, and the first 10 losses.
summary() {
  python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l]
late = rows[2:] or rows
tokens = sum(r["tokens"] for r in late)
seconds = late[-1]["elapsed_s"] - (rows[1]["elapsed_s"] if len(rows) > 2 else 0.0)
# rank_spread: (slowest - fastest) / slowest of the ranks' forward + backward device times.
spreads = [r["rank_spread"] for r in late if "rank_spread" in r]
print(json.dumps(dict(dir=sys.argv[1], steps=len(rows), tokens_per_s=tokens / seconds,
                      mean_rank_spread=sum(spreads) / len(spreads) if spreads else None,
                      first_losses=[r["loss"] for r in rows[:10]])))
PY
}

# The worst relative difference between the first 10 losses of two packsft runs.
compare() {
  python3 - "$1" "$2" <<'PY'
import json, sys
loss = lambda d: [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl") if '"loss"' in l][:10]
a, b = loss(sys.argv[1]), loss(sys.argv[2])
print(f"first {len(a)} losses of {sys.argv[1]} against {sys.argv[2]}: worst rel diff "
      f"{max(abs(x - y) / abs(y) for x, y in zip(a, b)):.2e}")
PY
}

for d in ${DATAS:-flan orca}; do
  DATA=$OUTS/$d.jsonl
  [ -f "$DATA" ] || python3 "$D/make_bench_data.py" $([ $d = flan ] && echo flan || echo orcamath) 2000 32000 "$DATA"
  ARGS="recipes/quickstart.yaml train.device=$DEVICE train.dtype=$([ $DEVICE = cuda ] && echo bf16 || echo f32)
    train.max_steps=$STEPS train.eval_steps=0 data.eval=null train.logging_steps=1 train.save_steps=0
    data.train=$DATA data.max_length=8192 train.batch_size=8 $MODEL"
  for n in ${NS:-1 2 4 8}; do
    [ "$n" -le "$GPUS" ] || { echo "N=$n: only $GPUS GPUs here, skipped"; continue; }
    echo "=== $SHAPE $d, $n GPU(s), 8 examples a GPU a step"
    if [ "$ONE" = 1 ] && [ "$n" -gt 1 ]; then
      sampled "$OUTS/one-$d-$n.log" "$PACKSFT" train $ARGS train.batch_size=$((8 * n)) \
        output_dir="$OUTS/one-$d-$n"
      summary "$OUTS/one-$d-$n"
    fi
    for z in $ZEROS; do
      out=$OUTS/packsft-$d-n$n-z$z
      sampled "$out.log" "$PACKSFT" launch --nproc-per-node "$n" -- train $ARGS dist.zero=$z output_dir="$out"
      summary "$out"
      [ "$ONE" = 1 ] && [ "$n" -gt 1 ] && compare "$out" "$OUTS/one-$d-$n"
    done
    for w in $WRAPS; do
      sampled "$OUTS/peer-$d-n$n-$w.log" torchrun --nproc-per-node "$n" "$D/dist_peer.py" "$DATA" \
        --shape "$SHAPE" --bs 8 --steps "$STEPS" --wrap "$w"
    done
  done
done
