"""`posttrain dedup RECIPE`: deduplicate and decontaminate every pipeline's accepted
records together.

- exact duplicates: same normalised text (case, punctuation, whitespace ignored)
- near duplicates: word-shingle Jaccard >= dedup.threshold, found with MinHash + LSH
  banding and confirmed on the exact shingle sets
- contamination: a record sharing a word n-gram (dedup.ngram words, or the whole item
  when it is shorter) with a held-out evaluation item: BFCL's held-out slice, IFEval's
  prompts and any dedup.heldout_files

Records are visited pipeline by pipeline (sorted), in file order; the first of a group
is kept. Kept records go to OUT/accepted/<pipeline>.jsonl, removed ones to
OUT/removed.jsonl with reject_reason duplicate / near_duplicate / contaminated and what
they matched; OUT/dedup_stats.json has the counts, conserved per pipeline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from pipeline.recipe import RecipeError, add_recipe_arguments, load_recipe
from pipeline.contract import DedupStats, Message, Record, read_records, write_records, write_report

# LSH bands of 4 MinHash rows (16 bands at 64 permutations) propose a pair at Jaccard
# 0.8 with probability 0.9998 (0.64 at 0.5); each proposal is then checked on the exact
# shingle sets, so `threshold` is the true Jaccard and a near duplicate is all but
# never missed. (The banding datasketch derives from threshold 0.8 at 64 permutations,
# 5 bands of 11 rows, proposes only 36 % of the pairs at 0.8.)
ROWS_PER_BAND = 4


def record_text(messages: list[Message]) -> str:
    """All turns' text, tool calls included: what makes two records the same."""
    parts = []
    for m in messages:
        parts.append(m.content or "")
        for call in m.tool_calls or []:
            fn = call.get("function", call)
            parts.append(f"{fn.get('name')} {fn.get('arguments')}")
    return "\n".join(parts)


def normalise(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def shingles(words: list[str], k: int) -> set[str]:
    """Word k-grams (the whole text when shorter than k words)."""
    if len(words) < k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def find_duplicates(
    records: list[Record], shingle: int = 5, num_perm: int = 64, threshold: float = 0.8
) -> dict[int, tuple[str, int, float]]:
    """index -> (reason, index of the kept record it repeats, similarity) for every
    record that repeats an earlier one."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=num_perm, params=(num_perm // ROWS_PER_BAND, ROWS_PER_BAND))
    exact: dict[str, int] = {}
    kept_shingles: dict[int, set[str]] = {}
    found: dict[int, tuple[str, int, float]] = {}
    for i, record in enumerate(records):
        words = normalise(record_text(record.messages))
        key = " ".join(words)
        if key in exact:
            found[i] = ("duplicate", exact[key], 1.0)
            continue
        sh = shingles(words, shingle)
        minhash = MinHash(num_perm=num_perm)
        minhash.update_batch([s.encode() for s in sh])
        best = max(((jaccard(sh, kept_shingles[j]), j) for j in lsh.query(minhash)), default=(0.0, -1))
        if best[0] >= threshold:
            found[i] = ("near_duplicate", best[1], round(best[0], 4))
            continue
        exact[key] = i
        kept_shingles[i] = sh
        lsh.insert(i, minhash)
    return found


class Decontaminator:
    """Finds records that share a word n-gram with any held-out item."""

    def __init__(self, items: Iterable[str], n: int = 13):
        self.n = n
        self.grams: dict[int, set[tuple[str, ...]]] = {}
        for item in items:
            words = normalise(item)
            size = min(n, len(words))
            if size >= 4:  # shorter items would match ordinary phrases
                self.grams.setdefault(size, set()).update(
                    tuple(words[i : i + size]) for i in range(len(words) - size + 1))

    def match(self, text: str) -> str | None:
        words = normalise(text)
        for size, grams in self.grams.items():
            for i in range(len(words) - size + 1):
                if tuple(words[i : i + size]) in grams:
                    return " ".join(words[i : i + size])
        return None


def heldout_items(paths: list[str], bfcl_fraction: float | None, ifeval: bool = False) -> list[str]:
    """Text of held-out evaluation items: BFCL's held-out and dev slices, IFEval's prompts, plus
    files (JSONL, JSON or plain text, one item per line); every string inside JSON counts."""
    items: list[str] = []
    if bfcl_fraction is not None:
        from pipeline.bfcl import reserved_questions

        items += reserved_questions(bfcl_fraction)
    if ifeval:
        from pipeline.ifeval_data import ifeval_prompts

        items += ifeval_prompts()
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise RecipeError(f"dedup.heldout_files: {path}: no such file")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".jsonl", ".json"):
            try:
                values = [json.loads(line) for line in text.splitlines() if line.strip()] \
                    if path.suffix == ".jsonl" else [json.loads(text)]
            except ValueError as exc:
                raise RecipeError(f"dedup.heldout_files: {path}: not valid JSON: {exc}") from None
            items += list(_strings(values))
        else:
            items += [line for line in text.splitlines() if line.strip()]
    return items


def heldout_reference(recipe) -> list[str]:
    """The held-out eval items the recipe's dedup section names (BFCL's held-out
    slice at tool_use's heldout_fraction, IFEval's prompts, plus dedup.heldout_files)."""
    from pipeline.bfcl import heldout_fraction

    cfg = recipe.dedup
    fraction = heldout_fraction(recipe) if cfg.bfcl_heldout else None
    return heldout_items(cfg.heldout_files, fraction, cfg.ifeval_heldout)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def dedup(
    inputs: dict[str, list[Record]], decontaminator: Decontaminator | None,
    shingle: int = 5, num_perm: int = 64, threshold: float = 0.8,
) -> tuple[dict[str, list[Record]], list[Record], dict[str, Any]]:
    """(kept per pipeline, removed records with reasons, stats)."""
    order = [(name, r) for name in sorted(inputs) for r in inputs[name]]
    removed_at: dict[int, dict[str, Any]] = {}
    if decontaminator is not None:
        for i, (_, r) in enumerate(order):
            hit = decontaminator.match(record_text(r.messages))
            if hit:
                removed_at[i] = {"reject_reason": "contaminated", "matched_ngram": hit}
    clean = [i for i in range(len(order)) if i not in removed_at]
    for j, (reason, of, sim) in find_duplicates([order[i][1] for i in clean], shingle, num_perm, threshold).items():
        removed_at[clean[j]] = {"reject_reason": reason, "duplicate_of": order[clean[of]][1].id, "similarity": sim}
    kept: dict[str, list[Record]] = {name: [] for name in inputs}
    removed = []
    per: dict[str, dict[str, Any]] = {n: {"input": len(inputs[n]), "kept": 0, "removed": {}} for n in inputs}
    for i, (name, r) in enumerate(order):
        if i in removed_at:
            info = removed_at.pop(i)
            reason = info.pop("reject_reason")
            copy = r.model_copy(deep=True)
            copy.meta.dedup = info
            copy.reject_reason = reason
            removed.append(copy)
            per[name]["removed"][reason] = per[name]["removed"].get(reason, 0) + 1
        else:
            kept[name].append(r)
            per[name]["kept"] += 1
    for name, s in per.items():
        if s["input"] != s["kept"] + sum(s["removed"].values()):
            raise AssertionError(f"dedup: counts not conserved for {name}: {s}")
    totals = {"input": len(order), "kept": sum(len(v) for v in kept.values()), "removed": {}}
    for s in per.values():
        for reason, count in s["removed"].items():
            totals["removed"][reason] = totals["removed"].get(reason, 0) + count
    return kept, removed, {**totals, "pipelines": per}


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--input", default="data/synth",
                        help="folder holding <pipeline>/accepted.jsonl (default data/synth)")
    parser.add_argument("--out", default="data/dedup", help="output folder")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.dedup
    root = Path(args.input)
    names = cfg.pipelines or sorted(p.parent.name for p in root.glob("*/accepted.jsonl"))
    missing = [n for n in names if not (root / n / "accepted.jsonl").is_file()]
    if missing or not names:
        raise RecipeError(f"dedup: no accepted.jsonl under {root} for {missing or 'any pipeline'}")
    inputs = {n: read_records(root / n / "accepted.jsonl") for n in names}
    items = heldout_reference(recipe)
    kept, removed, stats = dedup(inputs, Decontaminator(items, cfg.ngram) if items else None,
                                 cfg.shingle, cfg.num_perm, cfg.threshold)
    stats["heldout_items"] = len(items)
    out = Path(args.out)
    for name, records in kept.items():
        write_records(out / "accepted" / f"{name}.jsonl", records)
    write_records(out / "removed.jsonl", removed)
    write_report(out / "dedup_stats.json", DedupStats, stats)
    print(json.dumps({k: stats[k] for k in ("input", "kept", "removed")}))
    return 0
