"""Times one decoder layer's matrix products (forward, input and weight gradients) for TinyLlama's
shape at the row counts of the benchmark batches, with the q/k/v and gate/up projections as
separate products and as one product each. PyTorch's bf16 matmul calls cuBLAS as candle's does
(float32 accumulation, bf16 output), so the difference estimates what fusing the projections at run
time would save a step (x 22 layers) before anything is written in packsft.

    python3 gemm_shapes.py [rows ...]     # default: 2692 3581 7236 (FLAN-like / OrcaMath-like
                                          # padding-free, FLAN-like padded)
Tested with torch 2.x on the GPU machine; prints one line per row count and layout.
"""
import functools
import sys

import torch

H, KV, F, LAYERS = 2048, 256, 5632, 22


def timed(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def linear_cost(n, k, outs):
    """ms of forward, dx and dW products of a linear layer k -> sum(outs) on n rows, with its
    output columns split into the products `outs` (one product each)."""
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(o, k, device="cuda", dtype=torch.bfloat16) for o in outs]
    dys = [torch.randn(n, o, device="cuda", dtype=torch.bfloat16) for o in outs]
    fwd = timed(lambda: [x @ w.t() for w in ws])
    if len(outs) == 1:
        dx = timed(lambda: dys[0] @ ws[0])
    else:
        # separate products add their input gradients (one add kernel per extra product)
        dx = timed(lambda: functools.reduce(torch.add, [dy @ w for dy, w in zip(dys, ws)]))
    dw = timed(lambda: [dy.t() @ x for dy in dys])
    return fwd, dx, dw


def main():
    rows = [int(a) for a in sys.argv[1:]] or [2692, 3581, 7236]
    print(torch.cuda.get_device_name(), torch.__version__)
    for n in rows:
        for name, qkv, gu in (
            ("separate", [H, KV, KV], [F, F]),
            ("fused", [H + 2 * KV], [2 * F]),
        ):
            parts = {
                "qkv": linear_cost(n, H, qkv),
                "o": linear_cost(n, H, [H]),
                "gate_up": linear_cost(n, H, gu),
                "down": linear_cost(n, F, [H]),
            }
            per_layer = sum(sum(p) for p in parts.values())
            detail = "  ".join(
                f"{k} {p[0]:.3f}/{p[1]:.3f}/{p[2]:.3f}" for k, p in parts.items()
            )
            flops = 6 * n * (H * (H + 2 * KV) + H * H + 3 * H * F)
            print(
                f"rows {n} {name:8s} {per_layer * LAYERS:7.2f} ms a step "
                f"({flops / per_layer / 1e9:.0f} TFLOP/s)  fwd/dx/dW ms a layer: {detail}"
            )


if __name__ == "__main__":
    main()
