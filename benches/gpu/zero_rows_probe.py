"""Times one decoder layer's matrix products (TinyLlama's shape: q/k/v stacked, o, gate, up, down;
forward, input gradient, weight gradient) on 3,424 and 5,224 rows of random bf16 data, and on 5,224
rows whose output gradient is zero on the rows that padding adds (the last 225 of each of 8
sequences of 653: no loss at or after a right-pad position, so no gradient reaches it). It asks
whether padded batches' products are cheaper per row than padding-free ones because of their row
count or because of those zero rows.

    python3 zero_rows_probe.py          # on the GPU machine (PyTorch's bf16 matmul: cuBLAS)
"""
import torch
H, KV, F = 2048, 256, 5632
def timed(fn, iters=30):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters): fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / iters
shapes = {"qkv": (H, H + 2 * KV), "o": (H, H), "gate": (H, F), "up": (H, F), "down": (F, H)}
def layer(n, zero_from=None):
    tot = {"fwd": 0.0, "dx": 0.0, "dw": 0.0}
    for name, (k, o) in shapes.items():
        x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(o, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dy = torch.randn(n, o, device="cuda", dtype=torch.bfloat16)
        if zero_from is not None:
            # padding: the last (n - zero_from) / 8 rows of each of 8 sequences get no gradient
            assert n % 8 == 0 and zero_from % 8 == 0
            dy.view(8, n // 8, o)[:, zero_from // 8:] = 0
        tot["fwd"] += timed(lambda: x @ w.t())
        tot["dx"] += timed(lambda: dy @ w)
        tot["dw"] += timed(lambda: dy.t() @ x)
    return tot
flops = 2 * (H * (H + 2 * KV) + H * H + 3 * H * F)
for n, z, label in ((3424, None, "3424 rows, random"), (5224, None, "5224 rows, random"),
                    (5224, 3424, "5224 rows, dy zero on 1800 (padding)")):
    t = layer(n, z)
    print(label + ": " + ", ".join(f"{k} {v*1e3:.0f} us ({flops*n/v/1e9:.0f} TFLOP/s)" for k, v in t.items()), flush=True)
