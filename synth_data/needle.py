"""Needles in haystacks: long-context retrieval data at the recipe's length buckets,
so the SFT mix keeps the student's long-context ability (RULER-style tasks).

Haystacks are real filler text: Debian `fortunes` when installed, else Lee news
paragraphs and Python reference paragraphs (always present). Needles are sentences
"The special magic number for <key> is <value>." placed at seeded depths; the answer
is written by code, never by the teacher (generate() makes no teacher call).

Kinds: `single` (one needle), `multikey` (several needles with different keys, one
asked for), `multivalue` (one key with several values, all asked for).

(i)   sample_prompts: kind, bucket, keys/values, filler passages, needle depths
(ii)  generate: the record's answer from the known values
(iii) validate: the record (rendered with the student template) falls inside its
      bucket; each needle occurs exactly once; no value occurs in the filler
(iv)  post_edit: the record, with the needles, their depths and the bucket in meta
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import Field

from pipeline.recipe import Section
from pipeline.contract import Record, make_record
from pipeline import sources
from pipeline.engines import Completion
from synth_data.four_steps import candidate, first_failure, verdict

NAME = "needle"
REJECT_REASONS = ("empty", "truncated", "out_of_bucket", "needle_not_unique", "value_in_filler")

ADJECTIVES = ("silent", "amber", "crooked", "distant", "frozen", "golden", "hollow", "lucky",
              "misty", "quiet", "rapid", "scarlet", "tidy", "velvet", "wild", "young")
NOUNS = ("harbour", "lantern", "meadow", "falcon", "orchard", "compass", "glacier", "violin",
         "canyon", "teapot", "bridge", "comet", "island", "ladder", "garden", "anchor")


class Config(Section):
    count: int = Field(8, ge=0)
    length_buckets: list[int] = Field(default_factory=lambda: [1024, 2048, 4096, 8192])
    kinds: list[Literal["single", "multikey", "multivalue"]] = Field(
        default_factory=lambda: ["single", "multikey", "multivalue"]
    )
    needles: int = Field(3, ge=2)  # needles per multikey / multivalue item
    filler: Literal["auto", "fortunes", "lee", "pydoc"] = "auto"
    reserve_tokens: int = Field(96, gt=0)  # room for the question and answer
    seed: int = 0


def needle_sentence(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def haystack(passages: list[dict[str, str]], budget: int, rng: random.Random) -> list[dict[str, str]]:
    """Seeded filler passages whose tokens (+ separators) stay within budget."""
    order = rng.sample(range(len(passages)), len(passages))
    chosen, used = [], 0
    for i in order:
        t = _tokens(passages[i]["text"]) + 2
        if used + t <= budget:
            chosen.append(passages[i])
            used += t
        if used > budget - 16:
            break
    return chosen


_TOKEN_CACHE: dict[str, int] = {}


def _tokens(text: str) -> int:
    if text not in _TOKEN_CACHE:
        _TOKEN_CACHE[text] = sources.count_tokens(text)
    return _TOKEN_CACHE[text]


def sample_prompts(cfg: Config, rng: random.Random) -> list[dict[str, Any]]:
    if not cfg.length_buckets:
        raise ValueError("needle: length_buckets is empty")
    passages = sources.filler_passages(cfg.filler)
    bounds = sources.bucket_bounds(cfg.length_buckets)
    total = sum(_tokens(p["text"]) for p in passages) if max(cfg.length_buckets) > 32768 else None
    if total is not None and total < max(cfg.length_buckets):
        raise ValueError(f"needle: filler {cfg.filler!r} has {total} tokens, fewer than bucket {max(cfg.length_buckets)}")
    prompts = []
    for i in range(cfg.count):
        kind = cfg.kinds[i % len(cfg.kinds)]
        bucket = sorted(bounds)[(i // len(cfg.kinds)) % len(bounds)]
        keys = [f"{a}-{b}" for a, b in zip(rng.sample(ADJECTIVES, cfg.needles), rng.sample(NOUNS, cfg.needles))]
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(cfg.needles)]
        if kind == "single":
            needles = [(keys[0], values[0])]
        elif kind == "multikey":
            needles = list(zip(keys, values))
        else:  # multivalue: one key, several values
            needles = [(keys[0], v) for v in values]
        query = keys[rng.randrange(len(needles))] if kind == "multikey" else keys[0]
        sentences = [needle_sentence(k, v) for k, v in needles]
        budget = bounds[bucket][1] - cfg.reserve_tokens - sum(_tokens(s) + 2 for s in sentences)
        filler = haystack(passages, budget, rng)
        depths = sorted(rng.randint(0, len(filler)) for _ in needles)
        prompts.append({"kind": kind, "length_bucket": bucket, "needles": needles, "query": query,
                        "filler_ids": [p["id"] for p in filler], "filler": [p["text"] for p in filler],
                        "depths": depths, "filler_source": ",".join(sorted({p["source"] for p in filler}))})
    return prompts


def record_messages(p: dict[str, Any]) -> list[dict[str, str]]:
    blocks = list(p["filler"])
    # Insert from the deepest so earlier positions stay valid.
    for depth, (key, value) in sorted(zip(p["depths"], p["needles"]), key=lambda x: -x[0]):
        blocks.insert(depth, needle_sentence(key, value))
    asked = [v for k, v in p["needles"] if k == p["query"]]
    if len(asked) == 1:
        question = f"What is the special magic number for {p['query']} mentioned in the text above?"
        answer = f"The special magic number for {p['query']} is {asked[0]}."
    else:
        question = f"What are all the special magic numbers for {p['query']} mentioned in the text above?"
        answer = f"The special magic numbers for {p['query']} are {', '.join(asked[:-1])} and {asked[-1]}."
    user = "Read the text and answer the question after it.\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def generate(prompts, engine, cfg: Config) -> list[dict[str, Any]]:
    cands = []
    for p in prompts:
        messages = record_messages(p)
        answer = messages[-1]["content"]
        meta = {
            "seed_ids": {"filler": p["filler_ids"]}, "filler_source": p["filler_source"], "kind": p["kind"],
            "needles": [{"key": k, "value": v, "depth": d} for (k, v), d in zip(p["needles"], p["depths"])],
            "query": p["query"], "length_bucket": p["length_bucket"], "answer_by": "code",
            "source": "\n".join(needle_sentence(k, v) for k, v in p["needles"])
        }
        # The haystack rides along outside meta (it is already in the messages).
        cands.append({**candidate(messages[:-1], Completion(answer, 0, "stop"), meta), "prompt": p})
    return cands


def validate(candidates, cfg: Config) -> list[dict[str, Any]]:
    bounds = sources.bucket_bounds(cfg.length_buckets)
    for c in candidates:
        p = c["prompt"]
        text = c["messages"][0]["content"]
        filler = "\n\n".join(p["filler"])
        tokens = sources.conversation_tokens(c["messages"])
        lower, upper = bounds[p["length_bucket"]]
        c["scores"] = {"tokens": tokens, "filler_passages": len(p["filler"])}
        unique = all(text.count(needle_sentence(k, v)) == 1 for k, v in p["needles"])
        c["validators"] = {
            "needles_unique": verdict(None if unique else "needle_not_unique"),
            "values_not_in_filler": verdict("value_in_filler" if any(v in filler for _, v in p["needles"]) else None),
            "length_bucket": verdict(None if lower < tokens <= upper else "out_of_bucket"),
        }
        c["reject_reason"] = first_failure(c["validators"])
    return candidates


def post_edit(c: dict[str, Any], cfg: Config) -> Record:
    meta = dict(c["meta"])
    meta.update(scores=c["scores"], tokens=c["scores"]["tokens"], post_edit=[], validators=c["validators"])
    return make_record(NAME, c["messages"], meta)
