#!/usr/bin/env bash
# Builds the `flash-attn` binary and the GPU test binaries on this (CPU-only) machine and assembles
# .device/ (ignored by git) for the GPU machine: stripped, xz-compressed binaries (the device tool
# carries at most 64 MiB) and the scripts. Then, there: `bash .device/gpu_flash.sh` (GPU tests and
# attention kernels) and `bash .device/gpu_bench.sh` (training throughput with the peer).
set -euo pipefail
cd "$(dirname "$0")/../.."
# The kit's first run pipes quiet pip commands through `grep -v`, which fails on empty output: under
# `set -e` that ends the kit half-done (no libcudart.so link, no CUTLASS). Run it outside `set -e`,
# then check what it should have delivered.
source ../shared/gpu/setup-cuda.sh >/dev/null || true
command -v nvcc >/dev/null || { echo "pack.sh: ../shared/gpu/setup-cuda.sh did not provide nvcc" >&2; exit 1; }
ln -sf libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
# The nccl feature links libnccl.so, which this machine lacks: the nvidia-nccl-cu13 wheel's library
# goes beside the kit's stubs (the GPU machine loads PyTorch's copy at run time).
stubs=${PACKSFT_CUDA_DIR:-$HOME/.cache/packsft-cuda13}/stubs
if [ ! -e "$stubs/libnccl.so" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" nvidia-nccl-cu13 2>&1 | grep -v WARNING || true
  (cd "$tmp" && python3 -m zipfile -e nvidia_nccl_cu13-*.whl x)
  cp "$tmp"/x/nvidia/nccl/lib/libnccl.so.2 "$stubs/" && ln -sf libnccl.so.2 "$stubs/libnccl.so"
  rm -rf "$tmp"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
cargo build --release --features flash-attn,nccl
tests=(flash_attn gpu_optim gpu_ops)
cargo test --release --features flash-attn,nccl "${tests[@]/#/--test=}" --no-run
mkdir -p .device
rm -f .device/packsft .device/*.xz "${tests[@]/#/.device/}"
cp benches/gpu/*.sh benches/gpu/*.py ../shared/bench/make_bench_data.py ../shared/bench/hf_peer.py ../shared/bench/strong_peer.py .device/
strip -o .device/packsft "$CARGO_TARGET_DIR/release/packsft"
for t in "${tests[@]}"; do
  strip -o ".device/$t" "$(ls -t "$CARGO_TARGET_DIR"/release/deps/"$t"-* | grep -v '\.d$' | head -1)"
done
xz -6 -T2 .device/packsft "${tests[@]/#/.device/}"
du -sh .device
