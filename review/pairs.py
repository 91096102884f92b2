"""Preference pairs in Argilla: what a reviewer sees, and what pull makes of it.

`posttrain review push|pull RECIPE --pairs data/prefs/pairs.jsonl` reviews the pairs
`posttrain prefs` wrote instead of SFT records: the same push (upsert by pair id,
batched, retried), the same buckets and the same `review:` settings (mode,
sample_per_pipeline, unreviewed, ...). One dataset per pipeline,
`<dataset_prefix>-pairs-<pipeline>`:

  fields     prompt (the turns before the answer), chosen and rejected (one
             assistant turn each; tool calls rendered as text), tools (JSON),
             checks (what the validators checked: constraints, expected calls)
  questions  verdict accept/reject (required): may this pair train?
             swap (optional): the ranking is wrong, the rejected response is better
  metadata   pipeline, rejected_reason (the code that ranked it lower), teacher

A pair counts once `review.min_submitted` reviewers answered it. It is disputed
when they disagree (one accepts, another rejects; or one swaps and another keeps);
rejected when all reject (reject_reason human_reject); corrected when all accept and
they swap: chosen and rejected are exchanged and meta.review says who swapped
(`swapped_by`, the first by user id) and how many (`swaps`); else accepted. The rest
of `meta` stays as prefs wrote it, so chosen_id, rejected_id and rejected_reason
describe the code's ranking, before any swap. Every text field is escaped for the UI
as SFT records' are (review/dataset.py); guidelines: review/guidelines.py. What a pair
holds is typed in pipeline.contract (Pair).
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

from pipeline.contract import Pair, PairReview, check_pair
from review.dataset import VERDICT, Shortened, json_block, render_conversation
from review.guidelines import PAIR_QUESTIONS, pair_guidelines

SWAP = "swap"


def dataset_name(prefix: str, pipeline: str) -> str:
    return f"{prefix}-pairs-{pipeline}"


# -------------------------------------------------------------------- settings
def pair_settings(pipeline: str, min_submitted: int):
    import argilla as rg

    return rg.Settings(
        guidelines=pair_guidelines(pipeline),
        fields=[
            # The exact text is what a reviewer judges: plain text, escaped (pair_item).
            rg.ChatField(name="prompt", title="Prompt", required=True, use_markdown=False),
            rg.ChatField(name="chosen", title="Chosen (ranked better by code)", required=True, use_markdown=False),
            rg.ChatField(name="rejected", title="Rejected (ranked worse by code)", required=True,
                         use_markdown=False),
            rg.TextField(name="tools", title="Tools offered", required=False, use_markdown=True),
            rg.TextField(name="checks", title="What the validators checked", required=False, use_markdown=True),
            rg.TextField(name="shown", title="Shortened for display", required=False, use_markdown=False),
        ],
        questions=[
            rg.LabelQuestion(name=VERDICT, title="Accept this pair for preference training?",
                             labels=["accept", "reject"], required=True, description=PAIR_QUESTIONS[VERDICT]),
            rg.LabelQuestion(name=SWAP, title="Is the ranking right?", required=False,
                             labels={"keep": "yes: chosen is better", SWAP: "no: rejected is better (swap)"},
                             description=PAIR_QUESTIONS[SWAP]),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="pipeline", title="Pipeline"),
            rg.TermsMetadataProperty(name="rejected_reason", title="Why code ranked it lower"),
            rg.TermsMetadataProperty(name="teacher", title="Teacher"),
        ],
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
    )


def pair_item(pair: Pair, display_chars: int) -> dict[str, Any]:
    """One pair as the review UI gets it (review.dataset.review_item's shape)."""
    meta = pair.meta.model_extra  # what prefs records: checks, rejected_reason, teacher
    cut = Shortened(display_chars)
    fields: dict[str, Any] = {
        name: [{**t, "content": cut.text(f"{name}, the {t['role']} turn {i}", t["content"])}
               for i, t in enumerate(render_conversation(turns), 1)]
        for name, turns in (("prompt", pair.prompt), ("chosen", pair.chosen), ("rejected", pair.rejected))
    }
    for name, value in (("tools", pair.tools), ("checks", meta.get("checks"))):
        if value:
            fields[name] = json_block(value)
    if cut.notes:
        fields["shown"] = html.escape(cut.statement(pair.id), quote=False)
    metadata = {"pipeline": pair.pipeline, "rejected_reason": meta.get("rejected_reason"),
                "teacher": meta.get("teacher")}
    return {"id": pair.id, "fields": fields, "suggestions": [],
            "metadata": {k: str(v) for k, v in metadata.items() if v is not None}}


# ---------------------------------------------------------------- from Argilla
def human_decision(pair: Pair, by_user: dict[str, dict]) -> tuple[str, dict[str, Any]]:
    verdicts = [answers.get(VERDICT) for answers in by_user.values()]
    review: dict[str, Any] = {"by": "human", "reviewers": len(by_user),
                              "verdicts": dict(Counter(str(v) for v in verdicts))}
    # An unanswered swap question means the reviewer kept the code's ranking.
    swaps = sorted(user for user, answers in by_user.items() if answers.get(SWAP) == SWAP)
    disputed = [q for q, differ in ((VERDICT, len(set(verdicts)) > 1),
                                    (SWAP, "reject" not in verdicts and 0 < len(swaps) < len(by_user))) if differ]
    if disputed:
        return "disputed", {**review, "disputed_on": disputed}
    if "reject" in verdicts:
        return "rejected", review
    if swaps:
        return "corrected", {**review, "swapped_by": swaps[0], "swaps": len(swaps)}
    return "accepted", review


def apply_decision(pair: Pair, bucket: str, review: dict[str, Any]) -> Pair:
    out = pair.model_copy(deep=True)
    if "swapped_by" in review:
        out.chosen, out.rejected = out.rejected, out.chosen
    if bucket == "rejected":
        out.reject_reason = "human_reject"
    out.meta.review = PairReview.model_validate({"decision": bucket, **review})
    return check_pair(out.dump(), f"review pull ({bucket})")
