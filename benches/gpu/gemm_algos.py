"""Times every algorithm cuBLASLt's heuristic offers for the layer matrix products of TinyLlama's
shape (forward, input gradient, weight gradient of q/k/v stacked, o, gate, up, down) at given row
counts, against the heuristic's first choice (what cuBLAS's plain gemm_ex, candle's matmul, runs).
It answers whether the padding-free products (~2,700-3,400 rows) can be made as efficient as the
padded ones (~5,200-7,200 rows) by choosing another algorithm, before anything is written in packsft.

    python3 gemm_algos.py [rows ...]      # default: 2692 3424 5224 7236

Talks to libcublasLt through ctypes (the GPU machine has PyTorch, which ships it); tensors from torch.
"""
import ctypes
import sys

import torch

H, KV, F = 2048, 256, 5632
lt = None
for name in ("libcublasLt.so", "libcublasLt.so.13", "libcublasLt.so.12"):
    try:
        lt = ctypes.CDLL(name)
        break
    except OSError:
        continue
if lt is None:
    import glob
    import os

    cands = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cublas", "lib", "libcublasLt.so*"))
    lt = ctypes.CDLL(cands[0])

COMPUTE_32F, R_32F, R_16BF = 68, 0, 14
DESC_TRANSA, DESC_TRANSB = 3, 4
PREF_MAX_WORKSPACE = 1
ALGO_CONFIG_TILE_ID, ALGO_CONFIG_SPLITK, ALGO_CONFIG_STAGES = 1, 2, 6
WORKSPACE = 32 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heur(ctypes.Structure):
    _fields_ = [
        ("algo", Algo),
        ("workspaceSize", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("wavesCount", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def check(status, what):
    if status != 0:
        raise RuntimeError(f"{what}: cublasLt status {status}")


handle = ctypes.c_void_p()
check(lt.cublasLtCreate(ctypes.byref(handle)), "create")
workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")


def layout(rows, cols, ld):
    l = ctypes.c_void_p()
    check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(l), R_16BF, ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld)), "layout")
    return l


def product(opa, opb, m, n, k, a, lda, b, ldb, c, ldc):
    """Column-major C (m, n) = op(A) op(B) in bf16 with float32 accumulation; returns
    [(ms, index, waves, tile, splitk)] for every heuristic candidate, the first choice at index 0."""
    desc = ctypes.c_void_p()
    check(lt.cublasLtMatmulDescCreate(ctypes.byref(desc), COMPUTE_32F, R_32F), "desc")
    for attr, op in ((DESC_TRANSA, opa), (DESC_TRANSB, opb)):
        v = ctypes.c_int32(op)
        check(lt.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), 4), "trans")
    la = layout(*((m, k) if opa == 0 else (k, m)), lda)
    lb = layout(*((k, n) if opb == 0 else (n, k)), ldb)
    lc = layout(m, n, ldc)
    pref = ctypes.c_void_p()
    check(lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
    ws = ctypes.c_uint64(WORKSPACE)
    check(lt.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, ctypes.byref(ws), 8), "pref ws")
    want = 64
    res = (Heur * want)()
    got = ctypes.c_int()
    check(lt.cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, lc, lc, pref, want, res, ctypes.byref(got)), "heuristic")
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    out = []
    for i in range(got.value):
        h = res[i]
        if h.state != 0:
            continue

        def run():
            return lt.cublasLtMatmul(handle, desc, ctypes.byref(alpha), ctypes.c_void_p(a.data_ptr()), la,
                                     ctypes.c_void_p(b.data_ptr()), lb, ctypes.byref(beta),
                                     ctypes.c_void_p(c.data_ptr()), lc, ctypes.c_void_p(c.data_ptr()), lc,
                                     ctypes.byref(h.algo), ctypes.c_void_p(workspace.data_ptr()),
                                     ctypes.c_size_t(WORKSPACE), stream)
        if run() != 0:
            continue
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        iters = 20
        e0.record()
        for _ in range(iters):
            run()
        e1.record()
        torch.cuda.synchronize()
        tile, splitk = ctypes.c_uint32(), ctypes.c_uint32()
        sz = ctypes.c_size_t()
        lt.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(h.algo), ALGO_CONFIG_TILE_ID, ctypes.byref(tile), 4, ctypes.byref(sz))
        lt.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(h.algo), ALGO_CONFIG_SPLITK, ctypes.byref(splitk), 4, ctypes.byref(sz))
        out.append((e0.elapsed_time(e1) / iters, i, h.wavesCount, tile.value, splitk.value))
    return out


def linear(n, k, o):
    """The three products of a linear layer k -> o on n rows, row-major as packsft holds them:
    forward y = x W^T, input gradient dx = dy W, weight gradient dW = dy^T x."""
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(o, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(n, o, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(n, o, device="cuda", dtype=torch.bfloat16)
    dx = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    dw = torch.empty(o, k, device="cuda", dtype=torch.bfloat16)
    # Column-major views of the row-major products.
    return {
        "fwd": product(1, 0, o, n, k, w, k, x, k, y, o),
        "dx": product(0, 0, k, n, o, w, k, dy, o, dx, k),
        "dw": product(0, 1, k, o, n, x, k, dy, o, dw, k),
    }


def main():
    rows = [int(r) for r in sys.argv[1:]] or [2692, 3424, 5224, 7236]
    shapes = {"qkv": (H, H + 2 * KV), "o": (H, H), "gate": (H, F), "up": (H, F), "down": (F, H)}
    flops_layer = 6 * (H * (H + 2 * KV) + H * H + 3 * H * F)
    for n in rows:
        first = best = 0.0
        for name, (k, o) in shapes.items():
            for op, cands in linear(n, k, o).items():
                if not cands:
                    print(f"rows {n} {name} {op}: no algorithm")
                    continue
                d = cands[0]
                b = min(cands)
                first += d[0]
                best += b[0]
                print(f"rows {n} {name:5s} {op:3s}: first {d[0]*1e3:7.1f} us (waves {d[2]:.2f} tile {d[3]}) "
                      f"best {b[0]*1e3:7.1f} us (#{b[1]} of {len(cands)}, waves {b[2]:.2f} tile {b[3]} splitk {b[4]}) "
                      f"{(1 - b[0] / d[0]) * 100:4.1f}% less", flush=True)
        print(f"rows {n}: a layer's 15 products {first*1e3:.0f} us with the first choice ({flops_layer*n/first/1e9:.0f} TFLOP/s), "
              f"{best*1e3:.0f} us with the best ({flops_layer*n/best/1e9:.0f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
