#!/usr/bin/env python3
"""Splits a padding-free and a padded training step into what padding does not change and what
grows with positions, from two Nsight Compute CSVs of the same batches (`gpu_profile.sh <data>`
writes ncu_<data>_padding-free.csv and ncu_<data>_padded.csv: one warm-up and one timed step,
batches 0 and 1 of the data), and says what the padding-free/padded ratio of the timed batches
would be under changes to either part. Plain Python, no GPU needed: rerun it on the CSVs kept in
benches/gpu/profiles/.

  python3 benches/gpu/split_profile.py PF.csv PADDED.csv DATA.jsonl [--bs 8 --warmup 3 --steps 15]
          [--target 1.4]

Kernel groups (per step, the two profiled steps averaged):
  - layer matrix products: cuBLAS kernels (nvjet / gemm / cutlass names) that change with the
    layout; their TFLOP/s from the llama-1.1b shape's linear weights (6 FLOPs a weight a position);
  - fixed: kernels within 10% of each other in both layouts (the optimizer, attention, which never
    attends padding, the loss rows' projection and cross-entropy);
  - other per-position kernels: everything else (norms, activations, RoPE, residual adds);
  - first step only (`--first-step-only`, default cast_bf16_multi, the first step's bf16 weight
    copies; later steps' copies are written by the optimizer): left out.
"""
import argparse
import collections
import csv
import json

GEMM_MARKERS = ("nvjet", "gemm", "cutlass", "xmma")
# TinyLlama-1.1B (`--shape llama-1.1b`): q, k, v, o and the gated MLP, per layer, 22 layers.
HIDDEN, INTER, HEADS, KV, LAYERS = 2048, 5632, 32, 4, 22
HEAD_DIM = HIDDEN // HEADS
LINEAR = LAYERS * (HIDDEN * (HEADS + 2 * KV) * HEAD_DIM + HIDDEN * HIDDEN + 3 * HIDDEN * INTER)


def per_step_ms(path, steps=2):
    rows = list(csv.reader(open(path)))
    rows = rows[next(i for i, r in enumerate(rows) if "Kernel Name" in r):]
    col = {h: i for i, h in enumerate(rows[0])}
    avg = col.get("Average", col.get("Average Value"))
    ms = collections.Counter()
    for r in rows[1:]:
        try:
            name = r[col["Kernel Name"]].split("(")[0].split("<")[0]
            total_ns = float(r[avg].replace(",", "")) * int(r[col["Invocations"]])
        except (ValueError, IndexError):
            continue
        ms[name] += total_ns / 1e6 / steps
    return ms


def batch_sizes(path, bs):
    lens = [len(json.loads(line)["input_ids"]) for line in open(path) if line.strip()]
    batches = [lens[i:i + bs] for i in range(0, len(lens), bs)]
    return [(sum(b), len(b) * max(b)) for b in batches]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("packed_csv")
    ap.add_argument("padded_csv")
    ap.add_argument("data")
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--first-step-only", default="cast_bf16_multi")
    a = ap.parse_args()

    pf, pd = per_step_ms(a.packed_csv), per_step_ms(a.padded_csv)
    skip = set(a.first_step_only.split(",")) if a.first_step_only else set()
    groups = {k: [0.0, 0.0] for k in ("gemm", "fixed", "other")}
    for name in set(pf) | set(pd):
        if name in skip:
            continue
        x, y = pf[name], pd[name]
        if x > 0 and y > 0 and 0.9 <= y / x <= 1.1:
            g = "fixed"
        elif any(m in name for m in GEMM_MARKERS):
            g = "gemm"
        else:
            g = "other"
        groups[g][0] += x
        groups[g][1] += y

    sizes = batch_sizes(a.data, a.bs)
    prof = sizes[:2]
    pos = [sum(s[0] for s in prof) / 2, sum(s[1] for s in prof) / 2]
    timed = sizes[a.warmup:a.warmup + a.steps]
    tpos = [sum(s[0] for s in timed) / len(timed), sum(s[1] for s in timed) / len(timed)]

    print(f"profiled batches: {pos[0]:.0f} positions padding-free, {pos[1]:.0f} padded a step "
          f"({pos[1] / pos[0]:.3f}x)")
    print(f"{'ms a step':34s} {'padding-free':>12s} {'padded':>9s} {'ratio':>6s}")
    for g, label in (("fixed", "fixed (same in both layouts)"),
                     ("gemm", "layer matrix products"),
                     ("other", "other per-position kernels")):
        x, y = groups[g]
        print(f"{label:34s} {x:12.2f} {y:9.2f} {y / x if x else float('nan'):6.3f}")
    fixed = (groups["fixed"][0] + groups["fixed"][1]) / 2
    us = [(groups["gemm"][i] + groups["other"][i]) / pos[i] * 1e3 for i in range(2)]
    tflops = [6 * LINEAR * pos[i] / (groups["gemm"][i] / 1e3) / 1e12 for i in range(2)]
    print(f"per position: {us[0]:.2f} us padding-free, {us[1]:.2f} us padded; layer matrix "
          f"products at {tflops[0]:.0f} and {tflops[1]:.0f} TFLOP/s")

    # The timed batches' kernels as fixed + per-position cost x positions.
    pred = [fixed + us[i] * tpos[i] / 1e3 for i in range(2)]
    print(f"timed batches ({a.steps} from batch {a.warmup}): {tpos[0]:.0f} / {tpos[1]:.0f} positions "
          f"({tpos[1] / tpos[0]:.3f}x); kernels {pred[0]:.1f} / {pred[1]:.1f} ms, "
          f"ratio {pred[1] / pred[0]:.3f}")
    same = fixed + us[1] * tpos[0] / 1e3
    print(f"  with padding-free positions as cheap as padded ones: ratio {pred[1] / same:.3f}")
    if a.target:
        # (F + P1) / (F + P0) = target  ->  F = (P1 - target P0) / (target - 1)
        p0, p1 = us[0] * tpos[0] / 1e3, us[1] * tpos[1] / 1e3
        need = (p1 - a.target * p0) / (a.target - 1)
        need_same = (p1 - a.target * us[1] * tpos[0] / 1e3) / (a.target - 1)
        print(f"  {a.target}x needs the fixed part at most {need:.1f} ms (now {fixed:.1f}), or "
              f"{need_same:.1f} ms with padding-free positions as cheap as padded ones")


if __name__ == "__main__":
    main()
