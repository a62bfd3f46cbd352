#!/usr/bin/env python3
"""transformers' `generate` at a bench shape, beside `packsft bench-generate`: a random model (hf_peer.py's
SHAPES, float32 as packsft decodes), `--batch-size` random prompts of `--prompt-len` tokens continued
greedily by exactly `--new-tokens` each (min_new_tokens, no EOS), KV cache on (transformers' default);
new tokens per second of the best of `--repeats` runs after a warm-up.

usage: generate_peer.py --shape llama-1.1b [--batch-size 8] [--prompt-len 128] [--new-tokens 128] [--repeats 2]
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_peer  # noqa: E402
import torch, transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="llama-1.1b"); ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--prompt-len", type=int, default=128); ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--repeats", type=int, default=2); ap.add_argument("--attn", default="sdpa")
a = ap.parse_args()
dev = os.environ.get("PEER_DEVICE", "cuda")
torch.manual_seed(0)
cfg = LlamaConfig(**hf_peer.SHAPES[a.shape])
model = AutoModelForCausalLM.from_config(cfg, attn_implementation=a.attn).to(dev).eval()
ids = torch.randint(0, cfg.vocab_size, (a.batch_size, a.prompt_len), device=dev)
mask = torch.ones_like(ids)


def run(n):
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    if dev == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == a.prompt_len + n
    return time.perf_counter() - t


run(min(8, a.new_tokens))
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
best = min(run(a.new_tokens) for _ in range(a.repeats))
print(json.dumps(dict(peer="hf-transformers generate", transformers=transformers.__version__, shape=a.shape,
                      attn=a.attn, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                      batch_size=a.batch_size, prompt_len=a.prompt_len, new_tokens=a.new_tokens, seconds=best,
                      new_tokens_per_s=a.batch_size * a.new_tokens / best,
                      peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)))
