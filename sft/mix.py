"""`posttrain mix RECIPE`: build the SFT mix from reviewed records.

The SFT mix must keep long-context and conversational ability while it adds skills,
so records are grouped into categories (by pipeline, recipe `mix.categories`) and
drawn to the recipe's ratios, then split into train and eval. Every input record ends
in exactly one of train, eval or unused (with the reason), and mix_stats.json says so.

The input is review pull's reviewed.jsonl, read through the record contract: every
record must carry review's decision, accepted or corrected. Anything else (a record
review rejected or left pending, or one that never went through review) stops the
stage with an error naming it, rather than being trained on or silently dropped.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

from pipeline.categories import category_of
from pipeline.recipe import add_recipe_arguments, load_recipe
from pipeline.contract import MixStats, Record, read_records, write_records, write_report

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--input", nargs="+", required=True, help="reviewed JSONL file(s)")
    parser.add_argument("--out", default="data/mix", help="folder for train/eval/unused JSONL")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.mix
    records = [r for path in args.input for r in read_records(path, trainable=True)]
    stats = build_mix(records, cfg, Path(args.out))
    log.info("mix: %d train, %d eval, %d unused", stats["train"], stats["eval"], stats["unused"])
    return 0


def build_mix(records: list[Record], cfg, out: Path) -> dict:
    rng = random.Random(cfg.seed)
    by_category: dict[str, list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.id):  # input order never matters
        by_category[category_of(record, cfg)].append(record)
    for group in by_category.values():
        rng.shuffle(group)

    # The largest total that keeps every category at its ratio, given what exists.
    ratios = {c: w for c, w in cfg.ratios.items() if w > 0}
    total = sum(ratios.values())
    present = {c: len(by_category.get(c, [])) for c in ratios}
    feasible = [present[c] / (w / total) for c, w in ratios.items() if present[c] > 0]
    size = min(feasible) if feasible else 0
    if cfg.max_records is not None:
        size = min(size, cfg.max_records)

    chosen, unused = [], []
    for category, group in by_category.items():
        want = round(size * ratios[category] / total) if category in ratios else 0
        for i, record in enumerate(group):
            if i < want:
                chosen.append(record)
            else:
                reason = "category_not_in_mix" if category not in ratios else "over_ratio"
                unused.append(record.model_copy(update={"unused_reason": reason}))

    rng.shuffle(chosen)
    n_eval = int(round(len(chosen) * cfg.eval_fraction))
    if cfg.eval_fraction > 0 and len(chosen) > 1:
        n_eval = max(1, n_eval)
    eval_set, train_set = chosen[:n_eval], chosen[n_eval:]
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "train.jsonl", train_set)
    write_records(out / "eval.jsonl", eval_set)
    write_records(out / "unused.jsonl", unused)

    stats = {
        "input": len(records),
        "train": len(train_set),
        "eval": len(eval_set),
        "unused": len(unused),
        "per_category": {
            c: {
                "available": len(by_category.get(c, [])),
                "target_ratio": round(ratios.get(c, 0) / total, 4) if total else 0,
                "in_mix": sum(1 for r in chosen if category_of(r, cfg) == c),
            }
            for c in sorted(set(by_category) | set(ratios))
        },
        "per_pipeline": dict(Counter(r.pipeline for r in chosen)),
        "unused_reasons": dict(Counter(r.unused_reason for r in unused)),
    }
    if stats["train"] + stats["eval"] + stats["unused"] != stats["input"]:
        raise AssertionError(f"mix lost records: {stats}")
    write_report(out / "mix_stats.json", MixStats, stats)
    return stats
