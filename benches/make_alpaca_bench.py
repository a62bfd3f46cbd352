#!/usr/bin/env python3
"""Writes the data-pipeline benchmark inputs (deterministic): 5,000 Alpaca-style rows and a byte-level
BPE tokenizer (8,000 tokens, trained on those rows; "<s> $A </s>" post-processor) so that a row is
about 140 tokens, as with a real tokenizer on real instruction data.

    python3 benches/make_alpaca_bench.py target/bench-data      # then see benches/README.md

Writes OUT/alpaca.jsonl, OUT/tokenizer/{tokenizer.json,tokenizer_config.json}.
Pinned: tokenizers==0.20.3 (the trained vocabulary depends on the trainer's version).
"""
import json
import os
import random
import sys

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if tokenizers.__version__ != "0.20.3":
    sys.exit(f"tokenizers {tokenizers.__version__} installed, the benchmark is pinned to 0.20.3")

# A Zipf-distributed vocabulary of 6,000 pseudo-words (1-4 syllables), so that the tokenizer learns
# sub-words and the tokenizer's word cache does not make tokenization unrealistically cheap.
_rng = random.Random(7)
_SYL = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "an", "in", "on"]
WORDS = sorted({"".join(_rng.choice(_SYL) for _ in range(_rng.choice([1, 2, 2, 3, 3, 4]))) for _ in range(6500)})[:6000]
_rng.shuffle(WORDS)
_WEIGHTS = [1.0 / (i + 1) for i in range(len(WORDS))]


def words(rng, n):
    return rng.choices(WORDS, weights=_WEIGHTS, k=n)


VERBS = ["Explain", "Summarize", "Describe", "List", "Rewrite", "Translate", "Classify", "Compare", "Give", "Write"]
OBJECTS = ["the following text", "this sentence", "the paragraph below", "three examples of", "the main idea of",
           "a short poem about", "the difference between", "a list of", "the steps to", "an answer to"]


def sentence(rng, lo, hi):
    n = rng.randint(lo, hi)
    s = " ".join(words(rng, n))
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!"])


def row(rng):
    instruction = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} {' '.join(words(rng, rng.randint(2, 6)))}."
    inp = " ".join(sentence(rng, 4, 10) for _ in range(rng.randint(1, 2))) if rng.random() < 0.6 else ""
    output = " ".join(sentence(rng, 5, 14) for _ in range(rng.randint(2, 5)))
    return {"instruction": instruction, "input": inp, "output": output}


def main(out):
    rng = random.Random(2024)
    rows = [row(rng) for _ in range(5000)]
    os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
    with open(os.path.join(out, "alpaca.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(r.values()) for r in rows] + [
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n\n\n### Input:\n\n\n### Response:"]
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.save(os.path.join(out, "tokenizer", "tokenizer.json"))
    with open(os.path.join(out, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 1024}, f, indent=2)
    print(f"wrote {len(rows)} rows and an {tok.get_vocab_size()}-token tokenizer to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/bench-data")
