"""`posttrain review pull`: turn reviewers' decisions into the records that train.

Every input record ends in exactly one bucket, decided in this order:
  pending    fewer than `review.min_submitted` reviewers submitted (some, or none
             and `review.unreviewed` is "pending"): no decision counts yet
  disputed   reviewers disagree: some accept and some reject, or they wrote
             different corrections. Nobody's answer wins silently: a lead decides
             (in Argilla), then pull again
  rejected   every reviewer submitted "reject"         reject_reason "human_reject"
  corrected  reviewers accepted and wrote a corrected   it replaces the final turn
             final answer (one, or several identical)   exactly as typed; meta.review
                                                        keeps the original
  accepted   reviewers accepted, or nobody reviewed it and `review.unreviewed` is
             "keep" (or it was not sampled, or there is no server in `auto` mode)
Only submitted responses count; drafts and discards are "not reviewed".

Each output record carries `meta.review` (typed in pipeline.contract.Review):
`decision` (the bucket), `by` (human / automatic / nobody), and the reviewers'
verdicts, quality, corrector, original final turn and disputed questions where they
apply. review_stats.json also gives, per pipeline and question, Fleiss' kappa over
the records several reviewers answered (review/agreement.py).

Writes to --out: reviewed.jsonl (accepted + corrected: what enters training),
rejected.jsonl, disputed.jsonl, pending.jsonl and review_stats.json, all at the end
and atomically, so a failure mid-way leaves the previous outputs untouched. Reviews
keep changing on the server while the inputs do not, so DVC cannot see new reviews:
rerun the stage with `dvc repro --force review_pull`. Rerunning is always safe.

With `--pairs`, prefs' preference pairs come back the same way, into the same five
files (by default under data/prefs/review); a reviewer's correction of a pair is a
swap of chosen and rejected (review/pairs.py).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.contract import (
    Message,
    Pair,
    Record,
    Review,
    ReviewStats,
    check_record,
    read_pairs,
    write_pairs,
    write_records,
    write_report,
)
from pipeline.recipe import load_recipe
from review import pairs
from review.agreement import fleiss_by_question
from review.dataset import CORRECTION, QUALITY, VERDICT, dataset_name, load_candidates, sample_for_review
from review.server import ReviewServerError, argilla_client, reachable_server

BUCKETS = ("accepted", "rejected", "corrected", "disputed", "pending")
PAGE = 1000  # the server's largest page when listing records


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.review
    if getattr(args, "pairs", None):  # namespaces built by hand (tests, bench) review records
        candidates = load_candidates(args.pairs, read_pairs, "--pairs")
        name, judge, apply, write = pairs.dataset_name, pairs.human_decision, pairs.apply_decision, write_pairs
        questions, out = (VERDICT, pairs.SWAP), Path(args.out or "data/prefs/review")
    else:
        candidates = load_candidates(args.input)
        name, judge, apply, write = dataset_name, human_decision, apply_decision, write_records
        questions, out = (VERDICT, QUALITY), Path(args.out or "data/review")
    conn, note = reachable_server(cfg.mode)
    reviews: dict[str, dict[str, dict[str, dict]]] = {}
    if conn is not None:
        client = argilla_client(conn)
        for pipeline in candidates:
            reviews[pipeline] = fetch_reviews(client, cfg, name(cfg.dataset_prefix, pipeline))

    buckets, stats = decide(candidates, reviews, cfg, server=conn is not None, judge=judge, apply=apply)
    stats["kappa"] = {pipeline: fleiss_by_question(reviews.get(pipeline, {}), questions)
                      for pipeline in sorted(candidates)}
    stats.update(mode=cfg.mode, server=conn.api_url if conn else None, note=note,
                 pulled_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write(out / "reviewed.jsonl", buckets["accepted"] + buckets["corrected"])
    write(out / "rejected.jsonl", buckets["rejected"])
    write(out / "disputed.jsonl", buckets["disputed"])
    write(out / "pending.jsonl", buckets["pending"])
    write_report(out / "review_stats.json", ReviewStats, stats)
    print(note)
    print("  ".join(f"{b}: {stats[b]}" for b in BUCKETS) + f"  -> {out}")
    for pipeline, by_question in stats["kappa"].items():
        rated = {q: k for q, k in by_question.items() if k["records"]}
        if rated:
            print(f"  {pipeline} agreement: " + ", ".join(
                f"{q} kappa {_num(k['kappa'])} ({k['records']} records x {k.get('raters', '?')} reviewers)"
                for q, k in rated.items()))
    return 0


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def fetch_reviews(client, cfg, name: str) -> dict[str, dict[str, dict]]:
    """record id -> user id -> {question: answer}, submitted responses only, from dataset
    `name`. A dataset that does not exist yet has no reviews: {}. Read page by page
    from the records list (plain JSON: building SDK objects for every record would
    cost more than the transfer)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = client.datasets(name, workspace=cfg.workspace)
    if dataset is None:
        return {}
    found: dict[str, dict[str, dict]] = {}
    offset = 0
    try:
        while True:
            reply = client.http_client.get(f"/api/v1/datasets/{dataset.id}/records",
                                           params={"offset": offset, "limit": PAGE, "include": "responses"})
            reply.raise_for_status()
            items = reply.json()["items"]
            for item in items:
                by_user: dict[str, dict] = defaultdict(dict)
                for response in item.get("responses") or []:
                    if response.get("status") == "submitted":
                        for question, answer in (response.get("values") or {}).items():
                            by_user[str(response["user_id"])][question] = answer.get("value")
                found[str(item["external_id"])] = dict(by_user)
            offset += len(items)
            if len(items) < PAGE:
                return found
    except Exception as exc:
        raise ReviewServerError(f"reading {name} from {client.api_url} failed: {type(exc).__name__}: {exc}") from None


def decide(
    candidates: dict[str, list[Record | Pair]],
    reviews: dict[str, dict[str, dict[str, dict]]],
    cfg,
    server: bool,
    judge: Callable[[Any, dict], tuple[str, dict]],
    apply: Callable[[Any, str, dict], Any],
) -> tuple[dict[str, list[Record | Pair]], dict[str, Any]]:
    """Every record into one bucket. `judge(record, answers by user)` -> (bucket, review)
    reads what reviewers said; `apply(record, bucket, review)` -> the output record
    (human_decision and apply_decision below for records, review.pairs' for pairs)."""
    buckets: dict[str, list[Record | Pair]] = {b: [] for b in BUCKETS}
    per_pipeline: dict[str, Any] = {}
    several = unanimous = 0
    for pipeline, records in sorted(candidates.items()):
        on_server = reviews.get(pipeline, {})
        chosen = sample_for_review(records, cfg.sample_per_pipeline, cfg.seed)
        counts: Counter = Counter()
        why: Counter = Counter()
        for record in records:
            by_user = on_server.get(record.id, {})
            if not server:
                bucket, review = "accepted", {"by": "automatic", "reason": "no_server"}
            elif len(by_user) >= cfg.min_submitted:
                bucket, review = judge(record, by_user)
                if cfg.min_submitted > 1:
                    review["required"] = cfg.min_submitted
            elif by_user:
                bucket, review = "pending", {"by": "nobody", "reason": "awaiting_reviewers",
                                             "reviewers": len(by_user), "required": cfg.min_submitted}
            elif record.id not in chosen and record.id not in on_server:
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
            "on_server_not_in_input": len(set(on_server) - {r.id for r in records}),
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


def apply_decision(record: Record, bucket: str, review: dict[str, Any]) -> Record:
    out = record.model_copy(deep=True)
    if bucket == "corrected":
        out.messages[-1] = Message(role="assistant", content=review["corrected_answer"])
        review = {k: v for k, v in review.items() if k != "corrected_answer"}
    if bucket == "rejected":
        out.reject_reason = "human_reject"
    out.meta.review = Review.model_validate({"decision": bucket, **review})
    return check_record(out.dump(), f"review pull ({bucket})")


def human_decision(record: Record, by_user: dict[str, dict]) -> tuple[str, dict[str, Any]]:
    verdicts = [answers.get(VERDICT) for answers in by_user.values()]
    qualities = [answers[QUALITY] for answers in by_user.values() if answers.get(QUALITY) is not None]
    review: dict[str, Any] = {
        "by": "human",
        "reviewers": len(by_user),
        "verdicts": dict(Counter(str(v) for v in verdicts)),
    }
    if qualities:
        review["quality"] = round(sum(qualities) / len(qualities), 2)
    # The corrected answer exactly as typed: it is what trains.
    corrections = [(user, answers[CORRECTION]) for user, answers in sorted(by_user.items())
                   if isinstance(answers.get(CORRECTION), str) and answers[CORRECTION].strip()]
    disputed = [q for q, differ in ((VERDICT, len(set(verdicts)) > 1),
                                    (CORRECTION, len({text for _, text in corrections}) > 1)) if differ]
    if disputed:
        return "disputed", {**review, "disputed_on": disputed}
    if "reject" in verdicts:
        return "rejected", review
    if corrections:
        user, text = corrections[0]  # all the same text: the first by user id wrote it too
        original = record.messages[-1]
        return "corrected", {**review, "corrected_answer": text, "corrected_by": user,
                             "corrections": len(corrections), "original_final_turn": original}
    return "accepted", review
