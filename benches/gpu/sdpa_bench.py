#!/usr/bin/env python3
"""PyTorch's own flash attention (scaled_dot_product_attention, FLASH_ATTENTION backend) on
equal-length causal sequences, timed as `packsft bench-attn --equal BxL` times its kernels:
forward, and forward+backward, TFLOP/s with the same count (4 * visible pairs * D * heads
forward, 2.5x that backward). Runs on the GPU machine (torch only).

usage: sdpa_bench.py BxL [BxL ...] [--heads 32] [--kv-heads 4] [--head-dim 64] [--iters 10]
"""
import argparse, json, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

def bench(b, l, nh, nkv, d, iters):
    dev = "cuda"
    q = torch.randn(b, nh, l, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, nkv, l, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, nkv, l, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(b, nh, l, d, device=dev, dtype=torch.bfloat16)
    def attend():
        # GQA as transformers' sdpa path does it: key/value heads repeated to the query heads.
        kk = k.repeat_interleave(nh // nkv, dim=1); vv = v.repeat_interleave(nh // nkv, dim=1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    def timed(backward):
        for i in range(iters + 1):
            if i == 1:
                torch.cuda.synchronize(); t0 = time.perf_counter()
            o = attend()
            if backward:
                (o * w).sum().backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters
    with torch.no_grad():
        fwd = timed(False)
    both = timed(True)
    flops = 4.0 * b * l * (l + 1) / 2 * d * nh
    return dict(bench="attention", attn="torch-sdpa-flash", torch=torch.__version__, heads=nh, kv_heads=nkv,
                head_dim=d, batch=f"{b}x{l}", fwd_ms=fwd * 1e3, fwd_bwd_ms=both * 1e3,
                fwd_tflops=flops / fwd / 1e12, fwd_bwd_tflops=3.5 * flops / both / 1e12)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="+"); ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4); ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    for s in a.shapes:
        b, l = map(int, s.split("x"))
        print(json.dumps(bench(b, l, a.heads, a.kv_heads, a.head_dim, a.iters)), flush=True)
