#!/usr/bin/env python3
"""TRL 0.12's data pipeline on the benchmark rows, timed like `packsft bench-data`: read the JSONL
(datasets), format each row with the Alpaca prompt, tokenize (dataset.map, batched, as SFTTrainer's
_prepare_non_packed_dataloader: add_special_tokens=True, truncation at max_length), then collate every
8 rows with DataCollatorForCompletionOnlyLM(response_template="### Response:", padding_free=True).
Prints one JSON line (best of --repeat runs).

    python3 benches/trl_data_pipeline.py target/bench-data [--repeat 3]

Pinned: trl==0.12.2 transformers==4.46.3 datasets==5.0.1 torch==2.5.1.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import datasets
import torch
import transformers
import trl
from transformers import PreTrainedTokenizerFast
from trl import DataCollatorForCompletionOnlyLM

PINS = {"trl": "0.12.2", "transformers": "4.46.3", "datasets": "5.0.1", "torch": "2.5.1"}
for mod, want in PINS.items():
    got = sys.modules[mod].__version__.split("+")[0]
    if got != want:
        sys.exit(f"{mod} {got} installed, the benchmark is pinned to {want}")

# Stanford Alpaca's PROMPT_DICT (templates/alpaca.jinja renders the same text).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def run_once(data_dir, tok, batch_size, max_length):
    cache = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=os.path.join(data_dir, "alpaca.jsonl"), split="train",
                                   cache_dir=cache, keep_in_memory=True)

        def tokenize(batch):
            texts = [(PROMPT_INPUT if inp else PROMPT_NO_INPUT).format(instruction=ins, input=inp) + out
                     for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"])]
            enc = tok(texts, add_special_tokens=True, truncation=True, max_length=max_length, padding=False,
                      return_overflowing_tokens=False, return_length=False)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                    keep_in_memory=True)
        collator = DataCollatorForCompletionOnlyLM(response_template="### Response:", tokenizer=tok,
                                                   padding_free=True)
        n_tokens = n_targets = n_batches = 0
        for i in range(0, len(ds), batch_size):
            rows = ds[i:i + batch_size]
            feats = [{"input_ids": a, "attention_mask": m} for a, m in zip(rows["input_ids"], rows["attention_mask"])]
            b = collator(feats)
            n_tokens += b["input_ids"].numel()
            n_targets += int((b["labels"] != -100).sum())
            n_batches += 1
        return time.perf_counter() - t0, len(ds), n_tokens, n_targets, n_batches
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    a = ap.parse_args()
    datasets.disable_progress_bars()
    warnings.simplefilter("ignore")
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(a.data_dir, "tokenizer"))
    runs = [run_once(a.data_dir, tok, a.batch_size, a.max_length) for _ in range(a.repeat)]
    best = min(runs, key=lambda r: r[0])
    secs, n, toks, targets, batches = best
    print(json.dumps(dict(pipeline="trl-0.12.2", examples=n, tokens=toks, target_tokens=targets, batches=batches,
                          seconds=secs, examples_per_s=n / secs, tokens_per_s=toks / secs,
                          all_seconds=[r[0] for r in runs], torch_threads=torch.get_num_threads())))


if __name__ == "__main__":
    main()
