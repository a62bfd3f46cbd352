# Sourced by the GPU scripts here (`source "$(dirname "$0")/gpu_env.sh"`): the CUDA runtime and
# the NCCL library on the loader's path. Builds with `nccl` link libnccl.so.2: PyTorch's copy on the
# GPU machine (its Python package, else wherever the file is).
NCCL_LIB=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null \
  || dirname "$(find / -name libnccl.so.2 -not -path '/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${NCCL_LIB}:${LD_LIBRARY_PATH:-}
