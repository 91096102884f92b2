"""What packing buys on the default mix: real-token fraction padded vs packed, real
tokens/s of training steps padded vs packed, and the step time of exact packing
(boundaries reset in the Mamba layers) vs leaky plain packing, on the tiny student,
the settings interleaved step by step so machine noise hits all alike. Not a test.

The conversations: news articles (gensim's Lee corpus) and Python reference topics
(pydoc) as read-and-answer chats, with lengths drawn to match the default mix
(median ~194, max ~1,006 tokens with the student's chat template; ~20 % long-context).

    python bench/packing.py [--conversations 160] [--steps 6] [--max-length 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.recipe import ModelSection  # noqa: E402
from pipeline.sources import lee_documents, pydoc_documents, sentences  # noqa: E402
from pipeline.student import load_student, load_tokenizer  # noqa: E402


def conversations(tokenizer, n: int, seed: int) -> list[list[int]]:
    """Token ids of `n` chats whose lengths follow the default mix's distribution."""
    rng = random.Random(seed)
    pool = [s for doc in (*lee_documents(), *pydoc_documents()[:60]) for s in sentences(doc["text"])]
    counts: dict[int, int] = {}
    out = []
    for _ in range(n):
        if rng.random() < 0.2:  # long-context records (needle / doc_qa buckets)
            target = rng.randint(450, 1100)
        else:
            target = min(int(rng.lognormvariate(4.9, 0.5)), 600)
        start = rng.randrange(len(pool))
        i, total = start, 30  # ~30 tokens of template, question and answer
        while total < target:
            k = i % len(pool)
            if k not in counts:
                counts[k] = len(tokenizer(pool[k], add_special_tokens=False)["input_ids"]) + 1
            total += counts[k]
            i += 1
        messages = [
            {"role": "user", "content": "Read this and say what it is about.\n\n"
             + " ".join(pool[j % len(pool)] for j in range(start, i))},
            {"role": "assistant", "content": pool[(start + 7) % len(pool)]},
        ]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out.append(list(ids[:1006]))
    return out


def padded_batches(seqs, batch: int, pad_id: int):
    for i in range(0, len(seqs) - batch + 1, batch):
        group = seqs[i:i + batch]
        width = max(map(len, group))
        ids = torch.full((len(group), width), pad_id)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum()), ids.numel()


def packed_rows(seqs, max_length: int):
    """TRL's bfd packing and padding-free collator: one flattened row per batch."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    packed = pack_dataset(Dataset.from_dict({"input_ids": seqs}), max_length, "bfd")
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    for row in packed:
        batch = collator([row])
        n = batch["input_ids"].numel()
        yield {k: batch[k] for k in ("input_ids", "position_ids", "labels")}, n, n


@contextlib.contextmanager
def leaky():
    """Plain packing as transformers runs it: the boundary wrappers bypassed."""
    from transformers.models.jamba import modeling_jamba as mj

    conv, scan = mj.causal_conv1d_fn, mj.mamba_selective_scan
    mj.causal_conv1d_fn, mj.mamba_selective_scan = conv._posttrain_original, scan._posttrain_original
    try:
        yield
    finally:
        mj.causal_conv1d_fn, mj.mamba_selective_scan = conv, scan


def step(model, batch) -> float:
    start = time.perf_counter()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=160)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    parser.add_argument("--batch", type=int, default=4, help="padded batch size (the recipe's)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    seqs = conversations(tokenizer, args.conversations, args.seed)
    random.Random(args.seed).shuffle(seqs)
    lengths = sorted(map(len, seqs))
    print(f"conversations: {len(seqs)}, tokens median {statistics.median(lengths):.0f}, "
          f"mean {statistics.mean(lengths):.0f}, max {lengths[-1]}")

    padded = list(padded_batches(seqs, args.batch, tokenizer.pad_token_id))
    packed = list(packed_rows(seqs, args.max_length))
    real_padded = sum(r for _, r, _ in padded) / sum(t for _, _, t in padded)
    fill = sum(lengths) / (len(packed) * args.max_length)
    print(f"real-token fraction: padded (batch {args.batch}) {real_padded:.3f}, packed padding-free "
          f"1.000 (bfd rows of {args.max_length} filled to {fill:.3f}); {len(padded)} padded batches "
          f"vs {len(packed)} packed rows")

    model = load_student(section, tokenizer).train()
    times = {"padded": [], "packed exact": [], "packed leaky": []}
    tokens = {"padded": 0, "packed exact": 0, "packed leaky": 0}
    for i in range(args.steps + 1):  # the first round warms up
        batch, real, _ = padded[i % len(padded)]
        t = step(model, batch)
        row, real_row, _ = packed[i % len(packed)]
        t_exact = step(model, row)
        with leaky():
            t_leaky = step(model, row)
        if i == 0:
            continue
        times["padded"].append(t)
        tokens["padded"] += real
        times["packed exact"].append(t_exact)
        times["packed leaky"].append(t_leaky)
        tokens["packed exact"] += real_row
        tokens["packed leaky"] += real_row
    speed = {k: tokens[k] / sum(times[k]) for k in times}
    for k in times:
        print(f"{k:>13}: {speed[k]:7.1f} real tokens/s, median step {statistics.median(times[k]):.2f} s")
    exact_vs_leaky = statistics.median(
        a / b for a, b in zip(times["packed exact"], times["packed leaky"]))
    print(f"ratios: real-token fraction packed/padded {1 / real_padded:.2f}x; real tokens/s "
          f"packed/padded {speed['packed exact'] / speed['padded']:.2f}x; step time exact/leaky "
          f"packing {exact_vs_leaky:.3f}x (median of per-row ratios)")
    epoch_padded = sum(lengths) / speed["padded"]
    epoch_packed = sum(lengths) / speed["packed exact"]
    print(f"one pass over these {len(seqs)} conversations (forward + backward): padded "
          f"{epoch_padded:.0f} s, packed {epoch_packed:.0f} s")


if __name__ == "__main__":
    main()
