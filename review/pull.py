"""`posttrain review pull`: turn reviewers' decisions into the records that train.

Every input record ends in exactly one bucket, decided in this order:
  rejected   any reviewer submitted "reject"           reject_reason "human_reject"
  corrected  a reviewer wrote a corrected final answer  it replaces the final turn;
                                                        meta.review keeps the original
  accepted   reviewers accepted, or nobody reviewed it and `review.unreviewed` is
             "keep" (or it was not sampled, or there is no server in `auto` mode)
  pending    nobody reviewed it and `review.unreviewed` is "pending"
Only submitted responses count; drafts and discards are "not reviewed".

Each output record carries `meta.review` (typed in pipeline.contract.Review):
`decision` (the bucket), `by` (human / automatic / nobody), and the reviewers'
verdicts, quality, corrector and original final turn where they apply.

Writes to --out: reviewed.jsonl (accepted + corrected: what enters training),
rejected.jsonl, pending.jsonl and review_stats.json, all at the end and atomically,
so a failure mid-way leaves the previous outputs untouched. Reviews keep changing
on the server while the inputs do not, so DVC cannot see new reviews: rerun the
stage with `dvc repro --force review_pull`. Rerunning is always safe.

With `--pairs`, prefs' preference pairs come back the same way, into the same four
files (by default under data/prefs/review); a reviewer's correction of a pair is a
swap of chosen and rejected (review/pairs.py).
"""

from __future__ import annotations

import copy
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.contract import check_record
from pipeline.recipe import load_recipe
from pipeline.records import write_json, write_jsonl
from review import pairs
from review.dataset import CORRECTION, QUALITY, VERDICT, dataset_name, load_candidates, sample_for_review
from review.server import ReviewServerError, argilla_client, reachable_server

BUCKETS = ("accepted", "rejected", "corrected", "pending")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.review
    if getattr(args, "pairs", None):  # namespaces built by hand (tests, bench) review records
        candidates = load_candidates(args.pairs, pairs.check_pair, "--pairs")
        name, judge, apply = pairs.dataset_name, pairs.human_decision, pairs.apply_decision
        out = Path(args.out or "data/prefs/review")
    else:
        candidates = load_candidates(args.input)
        name, judge, apply = dataset_name, human_decision, apply_decision
        out = Path(args.out or "data/review")
    conn, note = reachable_server(cfg.mode)
    reviews: dict[str, dict[str, dict[str, dict]]] = {}
    if conn is not None:
        client = argilla_client(conn)
        for pipeline in candidates:
            reviews[pipeline] = fetch_reviews(client, cfg, name(cfg.dataset_prefix, pipeline))

    buckets, stats = decide(candidates, reviews, cfg, server=conn is not None, judge=judge, apply=apply)
    stats.update(mode=cfg.mode, server=conn.api_url if conn else None, note=note,
                 pulled_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_jsonl(out / "reviewed.jsonl", buckets["accepted"] + buckets["corrected"])
    write_jsonl(out / "rejected.jsonl", buckets["rejected"])
    write_jsonl(out / "pending.jsonl", buckets["pending"])
    write_json(out / "review_stats.json", stats)
    print(note)
    print("  ".join(f"{b}: {stats[b]}" for b in BUCKETS) + f"  -> {out}")
    return 0


def fetch_reviews(client, cfg, name: str) -> dict[str, dict[str, dict]]:
    """record id -> user id -> {question: answer}, submitted responses only, from dataset
    `name`. A dataset that does not exist yet has no reviews: {}."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = client.datasets(name, workspace=cfg.workspace)
    if dataset is None:
        return {}
    found: dict[str, dict[str, dict]] = {}
    try:
        for record in dataset.records(with_responses=True, with_suggestions=False, batch_size=1000):
            by_user: dict[str, dict] = defaultdict(dict)
            for response in record.responses:
                if str(getattr(response.status, "value", response.status)) == "submitted":
                    by_user[str(response.user_id)][response.question_name] = response.value
            found[str(record.id)] = dict(by_user)
    except Exception as exc:
        raise ReviewServerError(f"reading {name} from {client.api_url} failed: {type(exc).__name__}: {exc}") from None
    return found


def decide(
    candidates: dict[str, list[dict[str, Any]]],
    reviews: dict[str, dict[str, dict[str, dict]]],
    cfg,
    server: bool,
    judge: Callable[[dict, dict], tuple[str, dict]],
    apply: Callable[[dict, str, dict], dict],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Every record into one bucket. `judge(record, answers by user)` -> (bucket, review)
    reads what reviewers said; `apply(record, bucket, review)` -> the output record
    (human_decision and apply_decision below for records, review.pairs' for pairs)."""
    buckets: dict[str, list[dict[str, Any]]] = {b: [] for b in BUCKETS}
    per_pipeline: dict[str, Any] = {}
    several = unanimous = 0
    for pipeline, records in sorted(candidates.items()):
        on_server = reviews.get(pipeline, {})
        chosen = sample_for_review(records, cfg.sample_per_pipeline, cfg.seed)
        counts: Counter = Counter()
        why: Counter = Counter()
        for record in records:
            by_user = on_server.get(record["id"], {})
            if not server:
                bucket, review = "accepted", {"by": "automatic", "reason": "no_server"}
            elif by_user:
                bucket, review = judge(record, by_user)
            elif record["id"] not in chosen and record["id"] not in on_server:
                bucket, review = "accepted", {"by": "automatic", "reason": "not_sampled"}
            elif cfg.unreviewed == "keep":
                bucket, review = "accepted", {"by": "automatic", "reason": "not_reviewed"}
            else:
                bucket, review = "pending", {"by": "nobody", "reason": "not_reviewed"}
            buckets[bucket].append(apply(record, bucket, review))
            counts[bucket] += 1
            why[f"{bucket}:{review['by']}" + (f":{review['reason']}" if "reason" in review else "")] += 1
            if len(by_user) > 1:
                several += 1
                unanimous += len({u.get(VERDICT) for u in by_user.values()}) == 1
        per_pipeline[pipeline] = {
            "total": len(records),
            **{b: counts[b] for b in BUCKETS},
            "how": dict(sorted(why.items())),
            "on_server_not_in_input": len(set(on_server) - {r["id"] for r in records}),
        }
        if sum(counts.values()) != len(records):
            raise AssertionError(f"{pipeline}: {len(records)} records in, {sum(counts.values())} decided")

    total = sum(len(r) for r in candidates.values())
    stats = {
        "total": total,
        **{b: len(buckets[b]) for b in BUCKETS},
        "per_pipeline": per_pipeline,
        "agreement": {
            "records_with_several_reviewers": several,
            "unanimous_verdict": unanimous,
            "rate": round(unanimous / several, 4) if several else None,
        },
    }
    if sum(stats[b] for b in BUCKETS) != total:
        raise AssertionError(f"counts not conserved: {total} in, {sum(stats[b] for b in BUCKETS)} out")
    return buckets, stats


def apply_decision(record: dict[str, Any], bucket: str, review: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(record)
    if bucket == "corrected":
        out["messages"][-1] = {"role": "assistant", "content": review["corrected_answer"]}
        review = {k: v for k, v in review.items() if k != "corrected_answer"}
    if bucket == "rejected":
        out["reject_reason"] = "human_reject"
    out["meta"]["review"] = {"decision": bucket, **review}
    return check_record(out, f"review pull ({bucket})")


def human_decision(record: dict[str, Any], by_user: dict[str, dict]) -> tuple[str, dict[str, Any]]:
    verdicts = [answers.get(VERDICT) for answers in by_user.values()]
    qualities = [answers[QUALITY] for answers in by_user.values() if answers.get(QUALITY) is not None]
    review: dict[str, Any] = {
        "by": "human",
        "reviewers": len(by_user),
        "verdicts": dict(Counter(str(v) for v in verdicts)),
    }
    if qualities:
        review["quality"] = round(sum(qualities) / len(qualities), 2)
    if "reject" in verdicts:
        return "rejected", review
    corrections = [
        (user, answers[CORRECTION].strip())
        for user, answers in sorted(by_user.items())
        if isinstance(answers.get(CORRECTION), str) and answers[CORRECTION].strip()
    ]
    if corrections:
        user, text = corrections[0]  # several reviewers rarely correct one record: first by user id
        original = record["messages"][-1]
        return "corrected", {**review, "corrected_answer": text, "corrected_by": user,
                             "corrections": len(corrections), "original_final_turn": original}
    return "accepted", review
