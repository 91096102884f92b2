"""What a reviewer sees: the Argilla dataset layout, and records in and out of it.

One dataset per pipeline, named `<dataset_prefix>-<pipeline>`, all with the same
layout so push and pull treat every pipeline alike:

  fields      conversation (chat: system, user, assistant; tool calls and tool
              results rendered as text), tools (JSON, tool-use records only),
              source (the document or table the answer rests on, where there is one)
  questions   verdict accept/reject (required), quality 1-5, corrected_answer
              (a replacement for the assistant's final turn)
  suggestions the validators' verdict on `verdict`, scored by their mean score,
              its agent naming each validator's result (`well_formed:pass`,
              `verbalisation:dropped_value`, ...)
  metadata    pipeline, length_bucket, teacher, validator_reasons (those same
              terms), validator_score (the mean score): filterable in the UI

The Argilla record id is the record's stable id, so pushing twice adds nothing.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.contract import RecordError, check_record, validator_summary
from pipeline.records import InputError, iter_jsonl, stable_hash

VERDICT, QUALITY, CORRECTION = "verdict", "quality", "corrected_answer"


class ReviewInputError(InputError):
    """An input file or record that cannot be reviewed; the message names it."""


# ---------------------------------------------------------------------- inputs
def load_candidates(
    patterns: list[str], check: Callable[[Any, str], Any] = check_record, option: str = "--input",
) -> dict[str, list[dict[str, Any]]]:
    """Records from JSONL files (globs allowed), grouped by pipeline, each passed to
    `check` (the record contract; review.pairs.check_pair for pairs). `option` names
    the command-line option in errors."""
    paths = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matched:
            raise ReviewInputError(f"{option} {pattern}: matches no file")
        paths += matched
    by_pipeline: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, str] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ReviewInputError(f"{option} {path}: no such file")
        for number, record in enumerate(iter_jsonl(path), 1):
            where = f"{path}:{number}"
            try:
                check(record, where)
            except RecordError as exc:
                raise ReviewInputError(str(exc)) from None
            if record["id"] in seen:
                raise ReviewInputError(f"{where}: record id {record['id']!r} already read at {seen[record['id']]}")
            seen[record["id"]] = where
            by_pipeline.setdefault(record["pipeline"], []).append(record)
    return by_pipeline


def sample_for_review(records: list[dict[str, Any]], size: int | None, seed: int) -> set[str]:
    """Ids chosen for review: all, or the `size` with the smallest seeded hash.

    A hash rank instead of random.sample: adding records to the input keeps most
    earlier choices, so a second push mostly extends the first."""
    ids = [r["id"] for r in records]
    if size is None or size >= len(ids):
        return set(ids)
    return set(sorted(ids, key=lambda i: stable_hash(seed, i))[:size])


def dataset_name(prefix: str, pipeline: str) -> str:
    return f"{prefix}-{pipeline}"


# -------------------------------------------------------------------- settings
def review_settings(min_submitted: int):
    import argilla as rg

    return rg.Settings(
        guidelines=(
            "Read the conversation (and the source, where there is one). Accept if the final"
            " assistant turn is correct, grounded and well formatted; otherwise reject. If a"
            " small edit would make it right, write the corrected final answer and accept."
        ),
        fields=[
            rg.ChatField(name="conversation", title="Conversation", required=True),
            rg.TextField(name="tools", title="Tools offered", required=False, use_markdown=True),
            rg.TextField(name="source", title="Source (document or table)", required=False, use_markdown=True),
        ],
        questions=[
            rg.LabelQuestion(name=VERDICT, title="Accept this example for training?",
                             labels=["accept", "reject"], required=True),
            rg.RatingQuestion(name=QUALITY, title="Quality (1 = poor, 5 = excellent)",
                              values=[1, 2, 3, 4, 5], required=False),
            rg.TextQuestion(name=CORRECTION, title="Corrected final answer (leave empty if none)",
                            required=False, use_markdown=False),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="pipeline", title="Pipeline"),
            rg.TermsMetadataProperty(name="length_bucket", title="Length bucket"),
            rg.TermsMetadataProperty(name="teacher", title="Teacher"),
            rg.TermsMetadataProperty(name="validator_reasons", title="Validator reasons"),
            rg.FloatMetadataProperty(name="validator_score", title="Validator score"),
        ],
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
    )


# ------------------------------------------------------------------ to Argilla
def json_block(value: Any) -> str:
    """A markdown JSON code block: how the review UI shows tools and checks."""
    return "```json\n" + json.dumps(value, indent=2, ensure_ascii=False) + "\n```"


def to_argilla_record(record: dict[str, Any]):
    import argilla as rg

    meta = record["meta"]
    verdict, score, reasons = validator_summary(meta["validators"])
    fields: dict[str, Any] = {"conversation": render_conversation(record["messages"])}
    if record.get("tools"):
        fields["tools"] = json_block(record["tools"])
    source = meta.get("source")
    if source:
        fields["source"] = source if isinstance(source, str) else json.dumps(source, indent=2, ensure_ascii=False)
    metadata = {
        "pipeline": record["pipeline"],
        "length_bucket": _term(meta.get("length_bucket")),
        "teacher": _term(meta.get("teacher")),
        "validator_reasons": reasons or None,
        "validator_score": score,
    }
    return rg.Record(
        id=record["id"],
        fields=fields,
        metadata={k: v for k, v in metadata.items() if v is not None},
        suggestions=[rg.Suggestion(question_name=VERDICT, value=verdict, score=score, agent=suggestion_agent(reasons))],
    )


def render_conversation(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI-style messages as Argilla chat turns; every turn gets visible text."""
    turns = []
    for message in messages:
        parts = [_content_text(message.get("content"))]
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            parts.append(f"→ call `{function.get('name', '?')}({arguments})`")
        role = message.get("role", "?")
        if role == "tool":
            parts[0] = f"[result of {message.get('name') or message.get('tool_call_id') or 'tool'}] {parts[0]}"
        text = "\n".join(p for p in parts if p).strip() or "(empty)"
        turns.append({"role": role, "content": text})
    return turns


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return "\n".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _term(value: Any) -> str | None:
    return None if value is None else str(value)


def suggestion_agent(terms: list[str]) -> str:
    """The suggestion's agent: who suggested it and each validator's result, so the
    verdict shows its reasons next to it. Argilla allows 200 characters, no commas;
    the validator_reasons metadata keeps every term in full."""
    agent = "validators: " + " ".join(terms)
    return agent if len(agent) <= 200 else agent[:197] + "..."
