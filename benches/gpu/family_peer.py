#!/usr/bin/env python3
"""hf_peer.py (../shared/bench, copied into .device/ by pack.sh) at the shapes of the newer families:
`qwen3-8b` (Qwen3-8B's config) and `gemma2-2b` (Gemma-2-2B's), the same as `packsft bench --shape`
builds (src/cli/bench.rs `shape`). hf_peer's training loop (`run`) is used unchanged; only the
config class it builds is swapped for the family's.

usage: family_peer.py DATA.jsonl --shape qwen3-8b|gemma2-2b [--bs 8] [--steps 15] [--attn eager,sdpa]
       [--modes padded,packed] [--lora R]
Needs transformers >= 4.51 (Qwen3). Gemma 2 soft-caps its attention scores: transformers computes that in
`eager` and `flex_attention` only (sdpa and flash-attention-2 drop it), so quote those for Gemma 2.
"""
import argparse, json, os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_peer  # noqa: E402
import torch, transformers  # noqa: E402
from transformers import Gemma2Config, LlamaConfig, Qwen3Config  # noqa: E402

FAMILY_SHAPES = {
    "qwen3-8b": (Qwen3Config, dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                   num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                   rope_theta=1e6, tie_word_embeddings=False)),
    "gemma2-2b": (Gemma2Config, dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                     num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                     head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                                     rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
}
for name, (_, kw) in FAMILY_SHAPES.items():
    hf_peer.SHAPES[name] = dict(kw, _shape=name)


def config(**kw):
    """What hf_peer.run calls as `LlamaConfig(**SHAPES[shape])`: the family's config class."""
    name = kw.pop("_shape", None)
    return FAMILY_SHAPES[name][0](**kw) if name else LlamaConfig(**kw)


hf_peer.LlamaConfig = config

# hf_peer builds the model on the CPU, then moves it: an 8B model's random initialisation there took
# longer than the 250-320 s the device calls gave the peer (sessions 16 and 17). Built under the
# device's context, its weights are made and initialised on the GPU; the training loop is unchanged.
_from_config = hf_peer.AutoModelForCausalLM.from_config


def from_config_on_device(cfg, **kw):
    with torch.device(os.environ.get("PEER_DEVICE", "cuda")):
        return _from_config(cfg, **kw)


hf_peer.AutoModelForCausalLM.from_config = staticmethod(from_config_on_device)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("data"); ap.add_argument("--shape", required=True, choices=sorted(FAMILY_SHAPES))
    ap.add_argument("--bs", type=int, default=8); ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--attn", default="eager,sdpa"); ap.add_argument("--modes", default="padded,packed")
    ap.add_argument("--lora", type=int, default=0); ap.add_argument("--gc", action="store_true")
    a = ap.parse_args()
    data = hf_peer.load(a.data)
    print("torch", torch.__version__, "transformers", transformers.__version__,
          torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", flush=True)
    for attn in a.attn.split(","):
        for mode in a.modes.split(","):
            r = hf_peer.run(data, a.shape, attn, mode, a.bs, a.steps, lora=a.lora, gc=a.gc)
            print(json.dumps(r), flush=True)
