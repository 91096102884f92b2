"""What a reviewer sees: the Argilla dataset layout, and records in and out of it.

One dataset per pipeline, named `<dataset_prefix>-<pipeline>`, all with the same
fields and questions so push and pull treat every pipeline alike; the guidelines and
question descriptions are the pipeline's own (review/guidelines.py).

  fields      conversation   every turn; tool calls as `→ call name({arguments})`,
                             tool results as `[result of name] ...`
              tools          the functions offered (JSON; tool-use records)
              table          the table the paragraph states (table QA), as a table
              source         the document (document QA) or other source text
              passage        what the answer rests on: the quoted sentence and its
                             paragraph (document QA), the hidden needles (needle)
              checks         the validators' verdict and every check's result and
                             reason; each constraint's verdict (steerability); the
                             calls the request was written for (tool use)
              shown          said only when a field was cut for display: what was
                             cut and that the record keeps its full text
  questions   verdict accept/reject (required), quality 1-5, corrected_answer
  suggestions the validators' verdict on `verdict`, scored by their mean score, its
              agent naming each validator's result (`well_formed:pass`, ...)
  metadata    pipeline, length_bucket, teacher, validator_reasons, validator_score

The web UI drops anything shaped like an HTML tag, even in plain-text fields, so
text is escaped for it: a model's raw `<tool_call>`, a `<b>` in a table cell or a
lone `<` reaches the page as written. Free text goes to plain-text fields (HTML
entities only); markdown is used only where structure helps (tables, JSON), with
every character markdown would act on written as an entity. A field longer than
`review.display_chars` once escaped is cut for display and `shown` says so
(argilla-server refuses a chat message over 20,000 characters: a long-context
document in a user turn would otherwise fail the push); the record itself, which
pull writes back, is never changed by what the UI shows.

The Argilla record id is the record's stable id, so pushing twice adds nothing.
"""

from __future__ import annotations

import glob
import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.contract import Message, Pair, Record, RecordError, read_records, validator_summary
from pipeline.records import InputError, stable_hash
from review.guidelines import RECORD_QUESTIONS, record_guidelines

VERDICT, QUALITY, CORRECTION = "verdict", "quality", "corrected_answer"
FIELDS = ("conversation", "tools", "table", "source", "passage", "checks", "shown")
MAX_TURNS = 500  # argilla-server refuses a chat field with more messages


class ReviewInputError(InputError):
    """An input file or record that cannot be reviewed; the message names it."""


# ---------------------------------------------------------------------- inputs
def load_candidates(
    patterns: list[str], read: Callable[[str], list[Record | Pair]] = read_records, option: str = "--input",
) -> dict[str, list[Record | Pair]]:
    """Records from JSONL files (globs allowed), grouped by pipeline, each read through
    the contract by `read` (read_records; read_pairs for pairs). `option` names the
    command-line option in errors."""
    paths = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matched:
            raise ReviewInputError(f"{option} {pattern}: matches no file")
        paths += matched
    by_pipeline: dict[str, list[Record | Pair]] = {}
    seen: dict[str, str] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ReviewInputError(f"{option} {path}: no such file")
        try:
            records = read(path)
        except RecordError as exc:
            raise ReviewInputError(str(exc)) from None
        for number, record in enumerate(records, 1):
            where = f"{path}:{number}"
            if record.id in seen:
                raise ReviewInputError(f"{where}: record id {record.id!r} already read at {seen[record.id]}")
            seen[record.id] = where
            by_pipeline.setdefault(record.pipeline, []).append(record)
    return by_pipeline


def sample_for_review(records: list[Record | Pair], size: int | None, seed: int) -> set[str]:
    """Ids chosen for review: all, or the `size` with the smallest seeded hash.

    A hash rank instead of random.sample: adding records to the input keeps most
    earlier choices, so a second push mostly extends the first."""
    ids = [r.id for r in records]
    if size is None or size >= len(ids):
        return set(ids)
    return set(sorted(ids, key=lambda i: stable_hash(seed, i))[:size])


def dataset_name(prefix: str, pipeline: str) -> str:
    return f"{prefix}-{pipeline}"


# -------------------------------------------------------------------- settings
def review_settings(pipeline: str, min_submitted: int):
    import argilla as rg

    return rg.Settings(
        guidelines=record_guidelines(pipeline),
        fields=[
            # Plain text, escaped (see the module docstring): the exact text is what a reviewer judges.
            rg.ChatField(name="conversation", title="Conversation", required=True, use_markdown=False),
            rg.TextField(name="tools", title="Tools offered", required=False, use_markdown=True),
            rg.TextField(name="table", title="Table", required=False, use_markdown=True),
            rg.TextField(name="source", title="Source document", required=False, use_markdown=False),
            rg.TextField(name="passage", title="Passage the answer rests on", required=False, use_markdown=False),
            rg.TextField(name="checks", title="Automatic checks", required=False, use_markdown=True),
            rg.TextField(name="shown", title="Shortened for display", required=False, use_markdown=False),
        ],
        questions=[
            rg.LabelQuestion(name=VERDICT, title="Accept this example for training?", labels=["accept", "reject"],
                             required=True, description=RECORD_QUESTIONS[VERDICT]),
            rg.RatingQuestion(name=QUALITY, title="Quality (1 = poor, 5 = excellent)", values=[1, 2, 3, 4, 5],
                              required=False, description=RECORD_QUESTIONS[QUALITY]),
            rg.TextQuestion(name=CORRECTION, title="Corrected final answer (leave empty if none)",
                            required=False, use_markdown=False, description=RECORD_QUESTIONS[CORRECTION]),
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
def review_item(record: Record, display_chars: int) -> dict[str, Any]:
    """One record as the review UI gets it: {id, fields, metadata, suggestions}, the
    suggestions as {question, value, score, agent}. Plain data, so push can send it
    to the bulk endpoint directly and the SDK can take it too (argilla_record)."""
    meta = record.meta
    verdict, score, reasons = validator_summary(meta.validators)
    cut = Shortened(display_chars)
    turns = render_conversation(record.messages)
    if len(turns) > MAX_TURNS:
        cut.note(f"the first {len(turns) - MAX_TURNS + 1} turns (of {len(turns)})")
        turns = [{"role": "system", "content": f"[{len(turns) - MAX_TURNS + 1} earlier turns not shown]"},
                 *turns[-(MAX_TURNS - 1):]]
    fields: dict[str, Any] = {
        "conversation": [{**t, "content": cut.text(f"the {t['role']} turn {i}", t["content"])}
                         for i, t in enumerate(turns, 1)],
    }
    if record.tools:
        fields["tools"] = json_block(record.tools)
    fields.update(_source_fields(record, cut))
    fields["checks"] = checks_markdown(record)
    if cut.notes:
        fields["shown"] = html.escape(cut.statement(record.id), quote=False)
    metadata = {
        "pipeline": record.pipeline,
        "length_bucket": _term(meta.length_bucket),
        "teacher": _term(meta.teacher),
        "validator_reasons": reasons or None,
        "validator_score": score,
    }
    return {
        "id": record.id,
        "fields": fields,
        "metadata": {k: v for k, v in metadata.items() if v is not None},
        "suggestions": [{"question": VERDICT, "value": verdict, "score": score, "agent": suggestion_agent(reasons)}],
    }


def argilla_record(item: dict[str, Any]):
    """A review item as the SDK's rg.Record (the bench logs these through the SDK)."""
    import argilla as rg

    return rg.Record(
        id=item["id"], fields=item["fields"], metadata=item["metadata"],
        suggestions=[rg.Suggestion(question_name=s["question"], value=s["value"], score=s.get("score"),
                                   agent=s.get("agent")) for s in item.get("suggestions", [])],
    )


class Shortened:
    """Cuts text longer than `limit` characters for display and remembers what it cut."""

    def __init__(self, limit: int):
        self.limit, self.notes = limit, []

    def text(self, what: str, text: str) -> str:
        """`text` escaped for a plain-text field, at most `limit` characters once escaped
        (what the server counts); cut with a marker saying how much is not shown."""
        shown = html.escape(text, quote=False)
        if len(shown) <= self.limit:
            return shown
        size = self.limit
        while True:  # escaping lengthens the text: shrink the kept part until it fits
            shown = html.escape(text[:size], quote=False)
            marker = f"\n[... {len(text) - size:,} more characters not shown ...]"
            if len(shown) + len(marker) <= self.limit:
                break
            size -= len(shown) + len(marker) - self.limit
        self.note(f"{what}: the first {size:,} of {len(text):,} characters")
        return shown + marker

    def note(self, what: str) -> None:
        self.notes.append(what)

    def statement(self, record_id: str) -> str:
        return ("Too long to show in full; shown here: " + "; ".join(self.notes) + ". The record"
                f" ({record_id}) keeps its full text: what pull writes, and what trains, is the"
                " whole record, never this shortened view.")


def _source_fields(record: Record, cut: Shortened) -> dict[str, str]:
    """The source a pipeline's answer rests on, in the field that shows it best."""
    pipeline, source = record.pipeline, record.meta.source
    meta = record.meta.model_extra  # doc_qa's own keys: the cited span and its paragraph
    fields: dict[str, str] = {}
    if pipeline == "table_qa" and isinstance(source, str):
        fields["table"] = markdown_table(source)
    elif pipeline == "tool_use":
        pass  # its source is a catalogue item id; the expected calls are in checks
    elif pipeline == "needle" and source:
        fields["passage"] = cut.text("the needles", _text(source))
    elif source:
        fields["source"] = cut.text("the source", _text(source))
    if pipeline == "doc_qa" and meta.get("span_sentence"):
        paragraphs = meta.get("paragraphs") or []
        where = (f"paragraph {meta['cited'] + 1} of {len(paragraphs)} of the document"
                 if isinstance(meta.get("cited"), int) and paragraphs else "the document")
        passage = f"From {where}:\n\n\u201c{meta['span_sentence']}\u201d"
        if meta.get("span"):
            passage += f"\n\nAnswer span: {meta['span']}"
        fields["passage"] = cut.text("the passage", passage)
    return fields


def render_conversation(messages: list[Message]) -> list[dict[str, str]]:
    """OpenAI-style messages as Argilla chat turns; every turn gets visible text (not
    yet escaped for the UI: Shortened.text does that)."""
    turns = []
    for message in messages:
        parts = [_content_text(message.content)]
        for call in message.tool_calls or []:
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            parts.append(f"→ call {function.get('name', '?')}({arguments})")
        role = message.role
        if role == "tool":
            called = message.model_extra.get("name") or message.model_extra.get("tool_call_id") or "tool"
            parts[0] = f"[result of {called}] {parts[0]}"
        text = "\n".join(p for p in parts if p).strip() or "(empty)"
        turns.append({"role": role, "content": text})
    return turns


# ------------------------------------------------------------- markdown fields
# Every character markdown (GFM tables, KaTeX `$`, HTML) would act on, as an entity:
# the cell then shows exactly the text. Newlines become <br>, the only tag added.
_MARKDOWN_ACTIVE = {c: f"&#{ord(c)};" for c in "&<>|\\`*_[]()#!~$"}


def md_literal(text: Any) -> str:
    """`text` for a markdown table cell or paragraph, shown as written."""
    escaped = "".join(_MARKDOWN_ACTIVE.get(c, c) for c in str(text))
    return escaped.replace("\r\n", "\n").replace("\n", "<br>")


def json_block(value: Any) -> str:
    """A markdown JSON code block: how the review UI shows tools and checks. Code blocks
    show their text as is; the fence is longer than any run of backticks inside."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}json\n{text}\n{fence}"


def markdown_table(source: str) -> str:
    """A pipe table (as table QA writes it) re-emitted with every cell escaped, so the
    UI draws a table whose cells read exactly as the source; anything that is not a
    pipe table is shown as plain text."""
    rows = [line.strip() for line in source.strip().splitlines() if line.strip()]
    cells = [_split_row(row) for row in rows]
    is_table = len(rows) >= 2 and all(c is not None for c in cells) and re.fullmatch(r"\|?[\s:|-]+\|?", rows[1])
    if not is_table:
        return md_literal(source)
    header, body = cells[0], cells[2:]
    lines = ["| " + " | ".join(md_literal(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_literal(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _split_row(row: str) -> list[str] | None:
    if not row.startswith("|") or not row.endswith("|") or len(row) < 2:
        return None
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row[1:-1])]


def checks_markdown(record: Record) -> str:
    """The validators' verdict with every check's result and reason; each constraint's
    verdict (steerability); the calls the request was written for (tool use)."""
    validators = record.meta.validators
    meta = record.meta.model_extra  # the pipelines' own keys: constraints, expected calls
    verdict, score, _ = validator_summary(validators)
    lines = [f"**Validators' verdict: {verdict}**" + (f" (mean score {score:g})" if score is not None else ""),
             "", "| check | result | score | reason |", "|---|---|---|---|"]
    for name, v in validators.items():
        lines.append(f"| {md_literal(name)} | {_mark(v.passed)} | "
                     f"{'' if v.score is None else format(v.score, 'g')} | {md_literal(v.reason or '')} |")
    constraints = meta.get("constraints")
    if isinstance(constraints, list) and constraints:
        passed = (record.meta.scores or {}).get("passed") or {}
        lines += ["", "**Constraints**", "", "| constraint | arguments | result |", "|---|---|---|"]
        for constraint in constraints:
            kind = constraint.get("kind", "?") if isinstance(constraint, dict) else str(constraint)
            args = constraint.get("args") if isinstance(constraint, dict) else None
            check = validators.get(f"constraint_{kind}")
            result = check.passed if check else passed.get(kind)
            shown = ", ".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in (args or {}).items())
            lines.append(f"| {md_literal(kind)} | {md_literal(shown)} | {_mark(result)} |")
    if record.pipeline == "tool_use" and "expected_calls" in meta:
        expected = meta["expected_calls"]
        if isinstance(expected, str):
            try:
                expected = json.loads(expected)
            except ValueError:
                pass
        lines += ["", "**Calls the request was written for**", ""]
        if isinstance(expected, list) and not expected:
            lines.append("none: no offered tool fits the request; the right answer calls nothing")
        elif isinstance(expected, list):
            lines += ["| function | arguments |", "|---|---|"]
            lines += [f"| {md_literal(c.get('name', '?'))} | {md_literal(json.dumps(c.get('arguments', {}), ensure_ascii=False))} |"
                      for c in expected if isinstance(c, dict)]
        else:
            lines.append(md_literal(expected))
    return "\n".join(lines)


def _mark(passed: bool | None) -> str:
    # Words, not symbols: a reviewer scans for FAIL, and every font has these glyphs.
    return {True: "pass", False: "FAIL"}.get(passed, "not checked")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return "\n".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


def _term(value: Any) -> str | None:
    return None if value is None else str(value)


def suggestion_agent(terms: list[str]) -> str:
    """The suggestion's agent: who suggested it and each validator's result, so the
    verdict shows its reasons next to it. Argilla allows 200 characters, no commas;
    the validator_reasons metadata keeps every term in full."""
    agent = re.sub(r"[^a-zA-Z0-9\-_:./\s]", "_", "validators: " + " ".join(terms))  # the server's pattern
    return agent if len(agent) <= 200 else agent[:197] + "..."
