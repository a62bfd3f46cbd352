#!/usr/bin/env python3
"""The multi-GPU peer of issue 22: hf_peer.py's training step, data-parallel under torchrun.

hf_peer's step (../shared/bench, copied into .device/ by pack.sh) is a random-init transformers Llama of a
named shape with float32 master weights, fused AdamW at lr 1e-5, grad-norm clipping at 1.0, and padded or
packed rows. Here it runs under one of two wrappers:
  ddp    DistributedDataParallel with bf16 autocast (what HF Trainer does on several GPUs by default);
  fsdp2  fully_shard on every decoder layer, then the root, with bf16 parameters in compute and float32
         gradient reduction (MixedPrecisionPolicy): the sharded peer of packsft's ZeRO stages.

Each global step takes BS x WORLD examples in file order (cycling), and rank r takes the r-th slice of BS.
That is the global batch packsft's data parallelism takes with train.batch_size=BS. Each rank's loss is the
mean over its own targets, and DDP averages over ranks (HF Trainer's normalisation), not packsft's global
target count: the steps' arithmetic differs slightly, the work does not.

As in hf_peer, `packed` rows let examples attend to each other: that is a cheaper computation than the
document-masked one packsft does (hf_peer's docstring).

Output: one JSON line from rank 0, with
  - tokens_per_s: real tokens of all ranks per second over the timed steps (after 3 warm-up steps);
  - peak_gib: the largest peak of any rank;
  - the first losses of rank 0.

usage: torchrun --nproc-per-node N dist_peer.py DATA.jsonl [--shape llama-1.1b] [--bs 8] [--steps 15]
       [--wrap ddp|fsdp2] [--mode packed|padded] [--attn sdpa] [--gc]
Without GPUs (to check the script): PEER_DEVICE=cpu torchrun --nproc-per-node 2 dist_peer.py DATA.jsonl --shape tiny
Keep NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 in its environment.
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_peer  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

WARM = 3


def fsdp2(model, dev_type):
    try:  # torch >= 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4-2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--shape", default="llama-1.1b", choices=sorted(hf_peer.SHAPES))
    ap.add_argument("--bs", type=int, default=8, help="examples a step on each rank")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--wrap", default="ddp", choices=["ddp", "fsdp2"])
    ap.add_argument("--mode", default="packed", choices=["packed", "padded"])
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--gc", action="store_true")
    a = ap.parse_args()
    gpu = os.environ.get("PEER_DEVICE", "cuda") == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo")
    torch.manual_seed(0)  # the same initial weights on every rank (fully_shard keeps each rank's own)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**hf_peer.SHAPES[a.shape]), attn_implementation=a.attn)
    if a.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    if a.wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if gpu else None)
    else:
        model = fsdp2(model, dev.type)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    data = hf_peer.load(a.data)
    glob = a.bs * world
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    losses, real, t0 = [], 0, None
    for i in range(WARM + a.steps):
        if i == WARM:
            if gpu:
                torch.cuda.synchronize()
            dist.barrier()
            t0, real = time.perf_counter(), 0
        step = [data[(i * glob + j) % len(data)] for j in range(glob)]
        mine = step[rank * a.bs:(rank + 1) * a.bs]
        batch, r, _ = (hf_peer.packed if a.mode == "packed" else hf_peer.padded)(mine, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.wrap == "ddp"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        real += r
    if gpu:
        torch.cuda.synchronize()
    dist.barrier()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if gpu else 0.0
    tokens = torch.tensor([float(real)], device=dev)
    dist.all_reduce(tokens)
    peaks = torch.tensor([peak], device=dev)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps(dict(
            peer=f"torch-{a.wrap}", world_size=world, shape=a.shape, mode=a.mode, attn=a.attn,
            bs_per_rank=a.bs, steps=a.steps, gradient_checkpointing=a.gc,
            tokens_per_s=tokens.item() / dt, step_s=dt / a.steps,
            peak_gib=peaks.item() if gpu else None,
            # Per GPU, at hf_peer's 790e12 FLOP/s (the bf16 dense matmul rate measured on the H100).
            mfu=6 * n_params * tokens.item() / dt / 790e12 / world,
            first_losses=[float(x) for x in losses[:10]],
            torch=torch.__version__)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
