"""The record contract: what flows between stages, typed once.

A synthetic record is one JSON object per line:

    id             stable hash of pipeline + prompt turns + final turn
    pipeline       the synth_data pipeline that made it
    messages       OpenAI-style turns; the last is the assistant's
    tools          the functions offered (tool-use records only)
    meta           validators (required), teacher, length_bucket, source, scores,
                   post_edit, ... and what later stages add: dedup, review
    reject_reason  why it was rejected (rejected files only): a pipeline's code,
                   a dedup code, or human_reject
    unused_reason  why the mix left it out (mix's unused.jsonl only)

`meta.validators` is every automatic check's verdict in one shape,
`{name: {passed, score, reason}}`: `score` in [0, 1] (higher is better) where the
check grades, `reason` the code a failed check gives (the record's reject_reason).
`meta.review` is what review pull decided (`decision`: accepted, corrected,
rejected, disputed or pending). `meta` may carry other, pipeline-specific keys.

Stages build records with `make_record` and read them with `read_records`, both of
which check this contract; a record that breaks it stops the stage with one error
naming the file, line, record id and every problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.records import InputError, iter_jsonl, stable_hash, validation_problems

# What pull writes to reviewed.jsonl: the records that may train.
TRAINABLE = ("accepted", "corrected")


class RecordError(InputError):
    """A record that breaks the contract; the message names where and what."""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ValidatorResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passed: bool
    score: float | None = Field(None, ge=0.0, le=1.0)
    reason: str | None = None

    @model_validator(mode="after")
    def _failure_says_why(self):
        if not self.passed and not self.reason:
            raise ValueError("a failed validator must give a reason code")
        return self


class Review(BaseModel):
    """What review pull decided about a record, and how."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["accepted", "corrected", "rejected", "disputed", "pending"]
    by: Literal["human", "automatic", "nobody"]
    # why no human decided: no_server, not_sampled, not_reviewed, awaiting_reviewers
    reason: str | None = None
    reviewers: int | None = None
    required: int | None = None  # reviewers a decision needs (review.min_submitted), when more than one
    disputed_on: list[str] | None = None  # the questions reviewers answered differently
    verdicts: dict[str, int] | None = None  # verdict -> reviewers who gave it
    quality: float | None = None  # mean of the reviewers' 1-5 ratings
    corrected_by: str | None = None
    corrections: int | None = None
    original_final_turn: Message | None = None  # the teacher's turn a correction replaced


class Meta(BaseModel):
    model_config = ConfigDict(extra="allow")  # pipeline-specific keys: seed ids, sampling, ...

    validators: dict[str, ValidatorResult] = Field(min_length=1)
    teacher: str | None = None
    # Long-context pipelines give student tokens (int); others may use words ("short").
    length_bucket: int | str | None = None
    source: Any = None  # the document, table or needles a reviewer needs
    scores: dict[str, Any] | None = None
    post_edit: list[str] | None = None
    dedup: dict[str, Any] | None = None
    review: Review | None = None


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    meta: Meta
    reject_reason: str | None = None
    unused_reason: str | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_the_answer(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "assistant":
            raise ValueError("the final turn is not the assistant's")
        return messages


def record_id(pipeline: str, prompt: Any, response: Any) -> str:
    return stable_hash(pipeline, prompt, response)


def check_record(record: Any, where: str = "record") -> dict[str, Any]:
    """The record itself if it keeps the contract, else RecordError naming every problem."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: not a JSON object")
    try:
        Record.model_validate(record)
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc, whole="record", show_input=False))
        raise RecordError(f"{where}: record {record.get('id', '?')!r}: {problems}") from None
    return record


def make_record(
    pipeline: str,
    messages: list[dict[str, Any]],
    meta: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
    reject_reason: str | None = None,
) -> dict[str, Any]:
    """Build a checked record; its id hashes the pipeline, the prompt turns and the final turn."""
    prompt, response = messages[:-1], messages[-1:]
    record: dict[str, Any] = {
        "id": record_id(pipeline, prompt, response),
        "pipeline": pipeline,
        "messages": messages,
    }
    if tools:
        record["tools"] = tools
    record["meta"] = meta
    if reject_reason is not None:
        record["reject_reason"] = reject_reason
    return check_record(record, f"{pipeline} record")


def read_records(path: str | Path, trainable: bool = False) -> list[dict[str, Any]]:
    """Records from a JSONL file, each checked. `trainable`: every record must be one
    review pull put in reviewed.jsonl (decision accepted or corrected)."""
    records = []
    for number, record in enumerate(iter_jsonl(path), 1):
        where = f"{path}:{number}"
        check_record(record, where)
        if trainable:
            review = record["meta"].get("review")
            decision = review.get("decision") if review else None
            if decision not in TRAINABLE:
                raise RecordError(
                    f"{where}: record {record['id']!r}: meta.review.decision is {decision!r}; only"
                    f" {' or '.join(TRAINABLE)} records (review pull's reviewed.jsonl) may train"
                )
        records.append(record)
    return records


def validator_summary(validators: dict[str, dict[str, Any]]) -> tuple[str, float | None, list[str]]:
    """(verdict, mean score, one term per validator) from `meta.validators`.

    verdict: "reject" if any validator failed, else "accept". The mean is over the
    validators that grade (score not None). Terms read `name:reason` for a failed
    validator and `name:pass` for a passed one, so a reviewer can filter on either."""
    failed = any(not v["passed"] for v in validators.values())
    scores = [v["score"] for v in validators.values() if v.get("score") is not None]
    terms = [f"{name}:{v['reason'] if not v['passed'] else 'pass'}" for name, v in validators.items()]
    return ("reject" if failed else "accept"), (round(sum(scores) / len(scores), 4) if scores else None), terms
