"""Held-out loss: the model's cross-entropy on the mix's eval split, per category.

The eval split (data/mix/eval.jsonl) holds records of every category the SFT mix
draws (conversational / skill / long-context) that training never saw. Each record is
rendered with the training template and masked exactly as SFT masks it
(pipeline.chat_template.encode_conversation, which works for templates without
`{% generation %}` markers too), and the loss is the mean token-level cross-entropy
(nats) over the assistant tokens only. A record the template cannot render faithfully
(SmolLM2's own template drops tools) cannot train either; it is counted under
`unrenderable`, not scored. Means are over tokens, per category and overall, so
a long record weighs by its length as it does in training.

Lower is better: a trained model that learned the mix ends below the base; a run that
destroyed the model ends far above it.

Per-record rows carry `id`, `category`, `tokens`, `loss` and, where records share a
source (one document, one table, one prompt answered twice), `cluster`. `stderr` holds
the standard error of each token-weighted mean: the ratio estimator with the cluster
(else the record) as the unit (evals/standard_error.py).

This measures fit to the mix, not forgetting: see evals/forgetting.py for loss on
general text the SFT never saw.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from evals import standard_error
from pipeline.categories import category_of
from pipeline.chat_template import BadRecord, encode_conversation, turn_end
from pipeline.contract import Conversation
from pipeline.records import stable_hash

NAME = "heldout_loss"


def cluster_of(record: Conversation) -> str | None:
    """The source a record shares with others in the split, if any: the document of a
    doc_qa record, the table of a table_qa record, the prompt of a record that is one of
    several answers to it. Records of one cluster are not independent."""
    # The pipelines' own seed keys, which the contract leaves to model_extra.
    meta = record.meta.model_extra if record.meta else {}
    seeds = meta.get("seed_ids") if isinstance(meta.get("seed_ids"), dict) else {}
    if "doc_id" in seeds:
        return f"doc:{seeds['doc_id']}"
    if "dataset" in seeds:
        return f"table:{seeds['dataset']}:{stable_hash(seeds.get('rows'), seeds.get('columns'), length=8)}"
    if meta.get("seed_id"):
        return f"{record.pipeline}:{meta['seed_id']}"
    return None


def assistant_tokens(tokenizer, record: Conversation, max_length: int,
                     marker: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids, 1 where the token is an assistant token) as SFT renders and masks
    the record. Raises BadRecord when the template cannot render it."""
    enc = encode_conversation(tokenizer, record.turns(), record.tools or None, marker)
    return enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]


@torch.inference_mode()
def record_loss(model, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """(sum of CE over the assistant tokens, their count) for one record."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
    targets = input_ids[0, 1:]
    keep = torch.tensor(mask[1:], device=device, dtype=torch.bool)  # predicted token is assistant's
    if not keep.any():
        return 0.0, 0
    ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return float(ce), int(keep.sum())


def evaluate(model, tokenizer, records: list[Conversation], mix_cfg, max_length: int) -> dict[str, Any]:
    """{"metrics": {category: loss, ..., "overall": loss, "tokens": {...}, "records": {...},
    "stderr": {...}}, "items": [per-record id, category, tokens, loss, cluster]}"""
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    records_per: dict[str, int] = defaultdict(int)
    items, unrenderable = [], 0
    units: dict[str, dict[str, list]] = defaultdict(dict)  # metric -> cluster -> [loss sum, tokens]
    marker = turn_end(tokenizer)
    for record in records:
        category = category_of(record, mix_cfg)
        try:
            ids, mask = assistant_tokens(tokenizer, record, max_length, marker)
        except BadRecord:
            unrenderable += 1
            continue
        total, n = record_loss(model, ids, mask)
        row = {"id": record.id, "category": category, "tokens": n,
               "loss": round(total / n, 4) if n else None}
        cluster = cluster_of(record)
        items.append(row | ({"cluster": cluster} if cluster else {}))
        if n:
            sums[category] += total
            counts[category] += n
            records_per[category] += 1
            unit = cluster or f"record:{record.id}"
            for key in (category, "overall"):
                units[key].setdefault(unit, [0.0, 0])
                units[key][unit][0] += total
                units[key][unit][1] += n
    metrics: dict[str, Any] = {c: round(sums[c] / counts[c], 4) for c in sorted(counts)}
    all_tokens = sum(counts.values())
    metrics["overall"] = round(sum(sums.values()) / all_tokens, 4) if all_tokens else None
    metrics["perplexity"] = round(math.exp(metrics["overall"]), 2) if all_tokens else None
    metrics["tokens"] = {c: counts[c] for c in sorted(counts)}
    metrics["records"] = {c: records_per[c] for c in sorted(records_per)}
    metrics["unrenderable"] = unrenderable
    metrics["stderr"] = {key: standard_error.of_ratio([u[0] for u in per.values()], [u[1] for u in per.values()])
                         for key, per in units.items()}
    return {"metrics": metrics, "items": items}
