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

The contract covers every other file that crosses a stage boundary the same way, one
model, one reader and one writer each (ARTIFACTS at the end maps dvc.yaml's paths to
them):

    preference pairs   Pair            read_pairs / write_pairs
                       prefs -> review pairs push/pull -> dpo
    SFT conversations  Conversation    read_conversations (mix writes them as records)
                       mix -> sft, audit, eval (held-out loss)
    reports            one model each  read_report / write_report
                       generation, dedup, review, mix, prefs stats; train, dpo, audit,
                       eval, gate and export reports; the DPO-off pointer

    GRPO prompts       GrpoPrompt      read_grpo_prompts / write_grpo_prompts
                       grpo-prompts -> grpo

Every one reaches a stage as its model, validated: a stage reads fields as
attributes (a pipeline's own meta keys, which the model leaves to model_extra, too),
builds or changes a model, and hands the writer the model (or a dict it checks). A
model keeps the layout it was given (`Layout`): keys in the order given, a key left
out stays out, a key set later comes last, and a number keeps its type (`Number`),
so a file read and written again is the same file. Reports allow keys beyond their
model (a stage may add one); the model types every key some later stage, the summary
or the plots read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    RootModel,
    ValidationError,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)

from pipeline.records import (
    InputError,
    iter_jsonl,
    json_safe,
    read_json,
    stable_hash,
    validation_problems,
    write_json,
    write_jsonl,
)

# What pull writes to reviewed.jsonl: the records that may train.
TRAINABLE = ("accepted", "corrected")


class RecordError(InputError):
    """A record that breaks the contract; the message names where and what."""


def _keep_int(value: Any, handler) -> Any:
    return value if type(value) is int else handler(value)


# A number as written: 9 stays 9 and 9.0 stays 9.0 (a plain `float` field turns 9
# into 9.0, and the file would read and write other than it was written); anything
# else is checked as a float, with a float's error.
Number = Annotated[float, WrapValidator(_keep_int), PlainSerializer(lambda value: value)]


class Layout(BaseModel):
    """A model that writes the layout it was given: keys in the order the data gave
    them (a model's field order, typed fields first and the rest after, would change
    it), a key never given is not written (dump with exclude_unset), and a key a stage
    sets later comes after the rest, as it would in a dict."""

    # The keys in the order the data gave them.
    _keys: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(cls, data: Any, handler) -> Any:
        model = handler(data)
        if isinstance(data, dict):
            model._keys = list(data)
        return model

    @model_serializer(mode="wrap")
    def _in_key_order(self, handler) -> dict[str, Any]:
        out = handler(self)
        return {**{k: out[k] for k in self._keys if k in out}, **out}

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_") and name not in self._keys:
            self._keys = [*self._keys, name]  # a new list: a model_copy shares the old one

    def dump(self) -> dict[str, Any]:
        """The row as its file holds it."""
        return self.model_dump(exclude_unset=True)


class Message(Layout):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ValidatorResult(Layout):
    model_config = ConfigDict(extra="forbid")

    passed: bool
    score: Number | None = Field(None, ge=0.0, le=1.0)
    reason: str | None = None

    @model_validator(mode="after")
    def _failure_says_why(self):
        if not self.passed and not self.reason:
            raise ValueError("a failed validator must give a reason code")
        return self


class Review(Layout):
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
    quality: Number | None = None  # mean of the reviewers' 1-5 ratings
    corrected_by: str | None = None
    corrections: int | None = None
    original_final_turn: Message | None = None  # the teacher's turn a correction replaced


class ConversationMeta(Layout):
    """What a stage reads of any training conversation's meta (a user's own data may
    have none): its length bucket, by which the mix and the held-out loss group it."""

    model_config = ConfigDict(extra="allow")  # pipeline-specific keys: seed ids, sampling, ...

    # Long-context pipelines give student tokens (int); others may use words ("short").
    length_bucket: int | str | None = None


class Meta(ConversationMeta):
    validators: dict[str, ValidatorResult] = Field(min_length=1)
    teacher: str | None = None
    source: Any = None  # the document, table or needles a reviewer needs
    scores: dict[str, Any] | None = None
    post_edit: list[str] | None = None
    dedup: dict[str, Any] | None = None
    review: Review | None = None


class Record(Layout):
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


def _validated(row: Any, model: type[Layout], kind: str, where: str) -> Any:
    """The row as `model` if it keeps its contract, else RecordError naming the place,
    the row's id and every problem."""
    if isinstance(row, model):
        return row
    if not isinstance(row, dict):
        raise RecordError(f"{where}: not a JSON object")
    try:
        return model.model_validate(row)
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc, whole=kind, show_input=False))
        raise RecordError(f"{where}: {kind} {row.get('id', '?')!r}: {problems}") from None


def check_record(record: Any, where: str = "record") -> Record:
    """The record as a Record if it keeps the contract, else RecordError naming every problem."""
    return _validated(record, Record, "record", where)


def make_record(
    pipeline: str,
    messages: list[dict[str, Any]],
    meta: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
    reject_reason: str | None = None,
) -> Record:
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


def read_records(path: str | Path, trainable: bool = False) -> list[Record]:
    """Records from a JSONL file, each checked. `trainable`: every record must be one
    review pull put in reviewed.jsonl (decision accepted or corrected)."""
    return _read_checked(path, check_record, "record", trainable)


def write_records(path: str | Path, records: Iterable[Record | dict[str, Any]]) -> int:
    """Check every record, then write them atomically as JSONL; returns the count."""
    return _write_checked(path, check_record, records)


def _read_checked(path: str | Path, check, kind: str, trainable: bool) -> list[Any]:
    """Rows of a JSONL file of records or pairs, each through `check`; `trainable`: only
    the rows review pull let through (accepted or corrected) may train."""
    rows = []
    for number, data in enumerate(iter_jsonl(path), 1):
        where = f"{path}:{number}"
        row = check(data, where)
        if trainable:
            decision = row.meta.review.decision if row.meta.review else None
            if decision not in TRAINABLE:
                raise RecordError(
                    f"{where}: {kind} {row.id!r}: meta.review.decision is {decision!r}; only"
                    f" {' or '.join(TRAINABLE)} {kind}s (review pull's reviewed.jsonl) may train")
        rows.append(row)
    return rows


def _write_checked(path: str | Path, check, rows: Iterable[Any]) -> int:
    """Each row (a model, or a dict) checked as the file will hold it, then written."""
    data = [row.dump() if isinstance(row, Layout) else row for row in rows]
    for number, row in enumerate(data, 1):
        check(row, f"{path}:{number} (writing)")
    return write_jsonl(path, data)


def validator_summary(validators: dict[str, ValidatorResult]) -> tuple[str, float | None, list[str]]:
    """(verdict, mean score, one term per validator) from `meta.validators`.

    verdict: "reject" if any validator failed, else "accept". The mean is over the
    validators that grade (score not None). Terms read `name:reason` for a failed
    validator and `name:pass` for a passed one, so a reviewer can filter on either."""
    failed = any(not v.passed for v in validators.values())
    scores = [v.score for v in validators.values() if v.score is not None]
    terms = [f"{name}:{v.reason if not v.passed else 'pass'}" for name, v in validators.items()]
    return ("reject" if failed else "accept"), (round(sum(scores) / len(scores), 4) if scores else None), terms


# ------------------------------------------------------------ preference pairs
class PairReview(Review):
    swapped_by: str | None = None  # the reviewer whose swap exchanged chosen and rejected
    swaps: int | None = None  # reviewers who said the rejected response is better


class PairMeta(Layout):
    model_config = ConfigDict(extra="allow")  # seed_id, chosen_id, rejected_reason, checks, ...

    review: PairReview | None = None


class Pair(Layout):
    """A preference pair as prefs writes it: TRL's conversational preference format
    (prompt, one chosen and one rejected assistant turn, tools) + id, pipeline, meta;
    review pull adds meta.review, and reject_reason on the pairs reviewers rejected."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    prompt: list[Message] = Field(min_length=1)
    chosen: list[Message] = Field(min_length=1, max_length=1)
    rejected: list[Message] = Field(min_length=1, max_length=1)
    tools: list[dict[str, Any]] | None = None
    meta: PairMeta
    reject_reason: str | None = None  # human_reject, on review pull's rejected pairs

    @field_validator("chosen", "rejected")
    @classmethod
    def _one_answer(cls, turns: list[Message]) -> list[Message]:
        if turns[0].role != "assistant":
            raise ValueError("not the assistant's turn")
        return turns


def check_pair(pair: Any, where: str = "pair") -> Pair:
    """The pair as a Pair if it keeps the contract, else RecordError naming every problem."""
    if isinstance(pair, Pair):
        return pair
    if not isinstance(pair, dict):
        raise RecordError(f"{where}: not a JSON object")
    if "messages" in pair and "chosen" not in pair:
        raise RecordError(f"{where}: record {pair.get('id', '?')!r} is an SFT record, not a preference"
                          " pair (review records with --input, pairs with --pairs)")
    return _validated(pair, Pair, "pair", where)


def read_pairs(path: str | Path, trainable: bool = False) -> list[Pair]:
    """Pairs from a JSONL file, each checked. `trainable`: every pair must be one review
    pull put in reviewed.jsonl (accepted, or corrected: swapped by reviewers)."""
    return _read_checked(path, check_pair, "pair", trainable)


def write_pairs(path: str | Path, pairs: Iterable[Pair | dict[str, Any]]) -> int:
    """Check every pair, then write them atomically as JSONL; returns the count."""
    return _write_checked(path, check_pair, pairs)


# --------------------------------------------------------------- GRPO prompts
class GrpoPrompt(Layout):
    """A GRPO prompt as `posttrain grpo-prompts` writes it: a pipeline's step-1 prompt
    as chat turns (no answer: the policy writes it), the tools it offers, and what the
    pipeline's validator needs to score an answer (`verifier`: expected calls,
    constraints, or the computed answer)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    prompt: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    verifier: dict[str, Any]
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _ends_with_a_request(cls, turns: list[Message]) -> list[Message]:
        if turns[-1].role != "user":
            raise ValueError("the final turn is not the user's")
        return turns

    def turns(self) -> list[dict[str, Any]]:
        """The prompt as a chat template takes it."""
        return [turn.dump() for turn in self.prompt]


def check_grpo_prompt(prompt: Any, where: str = "GRPO prompt") -> GrpoPrompt:
    """The prompt as a GrpoPrompt if it keeps the contract, else RecordError naming every problem."""
    return _validated(prompt, GrpoPrompt, "GRPO prompt", where)


def read_grpo_prompts(path: str | Path) -> list[GrpoPrompt]:
    """GRPO prompts from a JSONL file, each checked."""
    return _read_checked(path, check_grpo_prompt, "GRPO prompt", False)


def write_grpo_prompts(path: str | Path, prompts: Iterable[GrpoPrompt | dict[str, Any]]) -> int:
    """Check every prompt, then write them atomically as JSONL; returns the count."""
    return _write_checked(path, check_grpo_prompt, prompts)


# -------------------------------------------------------- what SFT trains on
class TextMessage(Message):
    content: str | None = None  # the chat template renders text; parts are not trained


class Conversation(Layout):
    """What SFT trains on, and what the audit and the held-out loss read: turns ending
    in the assistant's (+ the tools offered). The mix writes whole records, each one a
    Conversation; a user's own data.train file needs only `messages`."""

    model_config = ConfigDict(extra="allow")  # reject_reason, ...: carried, not read

    id: str | None = None
    pipeline: str | None = None
    messages: list[TextMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    meta: ConversationMeta | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_the_answer(cls, messages: list[TextMessage]) -> list[TextMessage]:
        if messages[-1].role != "assistant":
            raise ValueError("does not end with an assistant turn (nothing to learn)")
        return messages

    @field_validator("tools", mode="before")
    @classmethod
    def _tools_as_json_text(cls, tools: Any) -> Any:
        # Parquet files often hold them so: one Arrow type cannot hold every schema.
        return json.loads(tools) if isinstance(tools, str) else tools

    def turns(self) -> list[dict[str, Any]]:
        """The messages as a chat template takes them."""
        return [message.dump() for message in self.messages]


def read_conversations(path: str | Path, bad: list | None = None) -> list[Conversation]:
    """Conversations from a JSONL file, each checked. One that breaks the contract raises
    RecordError naming the file, line, id and problem; given a list `bad`, it is left out
    and appended there as (where, problem) instead: SFT's data.on_bad_record: skip. A .parquet file (a user's own data) is
    read by rows; its places are row numbers."""
    parquet = str(path).endswith(".parquet")
    conversations = []
    for index, record in enumerate(_parquet_rows(path) if parquet else iter_jsonl(path)):
        try:
            conversations.append(Conversation.model_validate(record))
        except ValidationError as exc:
            place = f"row {index + 1}" if parquet else _line_of(path, index)
            where = f"{path}:{place}: record {record.get('id', '?')!r}"
            problem = "; ".join(validation_problems(exc, whole="record", show_input=False))
            if bad is None:
                raise RecordError(f"{where}: {problem}") from None
            bad.append((where, problem))
    return conversations


def _parquet_rows(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet

    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    return pyarrow.parquet.read_table(path).to_pylist()


def _line_of(path: str | Path, index: int) -> int:
    """The line number of the index-th record (blank lines hold none)."""
    with open(path, encoding="utf-8") as handle:
        return [n for n, line in enumerate(handle, 1) if line.strip()][index]


# --------------------------------------------------------------------- reports
class Report(Layout):
    """A report file's model. A stage may add keys to its report (they are kept, in
    model_extra); the fields typed here are what others read."""

    model_config = ConfigDict(extra="allow")


class GenerateStats(Report):
    """data/synth/<pipeline>/stats.json: read by the plots and the summary."""

    generated: int
    accepted: int
    rejected: int
    acceptance_rate: Number
    reject_reasons: dict[str, int]


class DedupStats(Report):
    input: int
    kept: int
    removed: dict[str, int]  # reason -> records


class KappaCell(Report):
    records: int
    kappa: Number | None = None


class ReviewStats(Report):
    """review_stats.json of records (data/review) and of pairs (data/prefs/review)."""

    total: int
    accepted: int
    corrected: int
    rejected: int
    disputed: int
    pending: int
    mode: str | None = None
    server: str | None = None
    kappa: dict[str, dict[str, KappaCell]] | None = None  # pipeline -> question -> agreement


class MixCategory(Report):
    in_mix: int


class MixStats(Report):
    input: int
    train: int
    eval: int
    unused: int
    per_category: dict[str, MixCategory] | None = None


class PrefsCounts(Report):
    prompts: int
    pairs: int
    no_pair: dict[str, int]


class PrefsStats(Report):
    pairs: int
    prompts: int
    pipelines: dict[str, PrefsCounts]


class TruncationCounts(Report):
    truncated: int
    answer_cut: int
    skipped: int


class Truncation(Report):
    """Records longer than max_length: counts per split (SFT: train, eval), or of the
    one split (DPO's pairs: the counts at the top)."""

    max_length: int | None = None
    truncated: int | None = None
    answer_cut: int | None = None
    skipped: int | None = None
    train: TruncationCounts | None = None
    eval: TruncationCounts | None = None


class ActivationLossSummary(Report):
    alpha: Number | None = None
    max_abs: dict[str, Number | None] | None = None  # site kind -> max |activation| in training


class TrainMetrics(Report):
    """outputs/sft/train_metrics.json: the summary's training line."""

    mode: str
    global_step: int
    first_loss: Number | None
    final_loss: Number | None
    truncation: Truncation | None = None
    activation_loss: ActivationLossSummary | None = None


class ActivationStats(RootModel[dict[str, dict[str, Number | None]]]):
    """outputs/sft/activation_stats.json: site kind -> layer -> max |activation| ({} when off)."""


class LossPoint(Report):
    step: int
    loss: Number | None


class LossCurve(RootModel[list[LossPoint]]):
    """outputs/sft/loss_curve.json: one row per logging step (DVC plot data)."""


class DpoMetrics(Report):
    """outputs/dpo/dpo_metrics.json: `enabled` false says the SFT model stands in."""

    enabled: bool
    global_step: int | None = None
    pairs: int | None = None
    margin_first: Number | None = None  # reward margin at the first and last logging step
    margin_last: Number | None = None
    accuracy_first: Number | None = None
    accuracy_last: Number | None = None
    truncation: Truncation | None = None


class GrpoPromptCounts(Report):
    sampled: int
    contaminated: int
    kept: int


class GrpoHeldoutCounts(Report):
    sampled: int
    contaminated: int  # shares an n-gram with a held-out eval item
    trained: int  # the same prompt as a training prompt
    kept: int


class GrpoPromptStats(Report):
    """data/grpo/prompt_stats.json: prompts per pipeline (sampled = contaminated + kept),
    and the held-out prompts the grpo stage measures its effect on."""

    prompts: int
    pipelines: dict[str, GrpoPromptCounts]
    heldout: dict[str, GrpoHeldoutCounts] | None = None


class HeldoutReward(Report):
    """The summed reward on held-out prompts, greedy answers before and after GRPO,
    paired prompt by prompt (evals/paired.compare: permutation p, bootstrap interval)."""

    prompts: int
    before: Number
    after: Number
    delta: Number
    low: Number
    high: Number
    p: Number
    better: int
    worse: int
    per_pipeline: dict[str, dict[str, Number]]


class GrpoMetrics(Report):
    """outputs/grpo/grpo_metrics.json: `enabled` false says the model before it stands in."""

    enabled: bool
    global_step: int | None = None
    prompts: int | None = None
    reward_first: Number | None = None
    reward_last: Number | None = None
    activation_loss_share_mean: Number | None = None
    heldout_reward: HeldoutReward | None = None


class ModelPointer(Report):
    """final/posttrain_model.json: with dpo.enabled (grpo.enabled) false, outputs/dpo/final
    (outputs/grpo/final) names the folder before it instead of holding weights."""

    model: str = Field(min_length=1)


class OffendingSite(Report):
    site: str


class LogitCheck(Report):
    max_abs_diff: Number | None = None  # FP16 vs FP32 logits


class Fp16Audit(Report):
    """outputs/audit/fp16_audit.json: read by the gate (fp16_safe) and the summary."""

    fp16_safe: bool
    max_abs: Number | None  # null: some activation was not finite
    offending: list[OffendingSite]
    max_abs_by_kind: dict[str, Number | None] | None = None
    logits: LogitCheck | None = None


class EvalScores(Report):
    """<eval out>/scores.json: every suite's metrics; the gate pairs two of them."""

    model: str
    engine: str
    scores: dict[str, dict[str, Any]]
    counts: dict[str, int] | None = None


class EvalItem(Report):
    """One item's verdict; which fields a suite fills is its own (the gate's metrics
    read them: evals/gate.suite_metrics)."""

    id: str | None = None  # the gate pairs items by id, and refuses items without one
    passed: bool | None = None  # pass/fail suites: retention, IFEval (strict), tool calls
    score: Number | None = None
    loose_passed: bool | None = None  # IFEval
    loose_score: Number | None = None
    instructions: int | None = None
    task: str | None = None  # retention
    length: int | None = None
    category: str | None = None  # tool calls, held-out loss
    language: str | None = None  # tool calls
    loss: Number | None = None  # held-out loss, forgetting (nats/token)
    tokens: int | None = None
    cluster: str | None = None  # items that share a source (not independent)


class ChanceItems(Report):
    """What an empty answer scores on the same items."""

    items: list[EvalItem] | None = None
    metrics: dict[str, Any] | None = None


class SuiteItems(Report):
    """<eval out>/<suite>.json: per-item answers and verdicts (ids pair them across
    evals), and what an empty answer scores on the same items (`chance`)."""

    items: list[EvalItem]
    metrics: dict[str, Any] | None = None
    chance: ChanceItems | None = None


class ChanceComparison(Report):
    score: Number | None
    base_minus_chance: Number | None
    p: Number | None


class Comparison(Report):
    """One metric, paired item by item: evals/paired.Comparison and what the gate adds."""

    before: Number | None
    after: Number | None
    delta: Number | None
    low: Number | None
    high: Number | None
    p: Number | None
    items: int
    lower_is_better: bool
    unit: str | None = None
    se: Number | None = None  # of the change
    se_before: Number | None = None
    se_after: Number | None = None
    clusters: int | None = None  # independent units the items form
    better: int | None = None
    worse: int | None = None
    chance: ChanceComparison | None = None  # the base against an empty answer


class EvalReport(Report):
    """outputs/eval/eval_report.json (and dpo_effect.json): before, after and the paired
    change of every metric."""

    # suite -> {before, after, delta}: each the suite's own metric tree (EvalScores.scores)
    suites: dict[str, Any]
    comparisons: dict[str, Comparison]


class GateCheck(Report):
    name: str
    status: str
    passed: bool
    detail: str
    detectable: Number | None = None  # the smallest drop a paired check can detect


class GateReport(Report):
    """outputs/gate/gate_report.json: the decision export waits for; the summary's gate line."""

    passed: bool
    enforce: bool
    checks: list[GateCheck]
    off: list[str]
    uninformative: list[str]
    message: str


class ExportProfile(Report):
    """One profile's reload check, or why it was skipped."""

    passed: bool | None = None
    max_abs_logit_diff: Number | None = None
    tolerance: Number | None = None
    skipped: str | None = None


class ExportReport(Report):
    """export_report.json: each profile's reload check (or why it was skipped)."""

    kind: str | None = None
    tolerance: Number | None = None
    profiles: dict[str, ExportProfile]
    adapter_effect_max_abs_logit_diff: Number | None = None


def check_report(data: Any, model: type[BaseModel], where: str) -> Any:
    """The report as its model if it fits, else InputError naming the file, each key
    (and a list entry's id) and its problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc, whole="report", show_input=False, data=data))
        raise InputError(f"{where}: not a valid {_words(model.__name__)} file: {problems}") from None


def _words(name: str) -> str:
    """EvalScores -> 'eval scores': what the file is, as a user would say it."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()


def read_report(path: str | Path, model: type[BaseModel]) -> Any:
    """A JSON report as its model, validated; a missing, broken or misshapen file
    raises InputError naming it."""
    return check_report(read_json(path), model, str(path))


def write_report(path: str | Path, report: BaseModel | type[BaseModel], data: Any = None) -> None:
    """Write a report atomically: `report` a model instance, or a model class and the
    `data` (a dict or list) it checks. Either way the file is checked as JSON will hold
    it (non-finite floats null) before it is written; keys keep the order they were
    given, and a key never given is not written."""
    if isinstance(report, BaseModel):
        model, data = type(report), report.model_dump(exclude_unset=True)
    else:
        model = report
    data = json_safe(data)
    check_report(data, model, f"{path} (writing)")
    write_json(path, data)


# ------------------------------------------------------------- the artifacts
class Artifact(NamedTuple):
    model: type[BaseModel]
    read: Any  # the reader function
    write: Any  # the writer function


_RECORDS = Artifact(Record, read_records, write_records)
_PAIRS = Artifact(Pair, read_pairs, write_pairs)
_GRPO_PROMPTS = Artifact(GrpoPrompt, read_grpo_prompts, write_grpo_prompts)
# The mix writes whole records (checked as Record); SFT, the audit and the held-out
# loss read only the conversation of each.
_TRAINING = Artifact(Conversation, read_conversations, write_records)


def _report(model: type[BaseModel]) -> Artifact:
    return Artifact(model, read_report, write_report)


SUITE_FILES = ("retention", "ifeval", "tool_calls", "heldout_loss", "forgetting")
EVAL_SIDES = ("base", "sft", "after")

# Every file that crosses a stage boundary, by its dvc.yaml path (a glob), and the
# model, reader and writer the stages use for it (tests/test_contract.py checks that
# every dvc.yaml output a later stage, the summary or the plots read is here, and
# that the stages read and write it through these).
ARTIFACTS: dict[str, Artifact] = {
    "data/synth/*/accepted.jsonl": _RECORDS,
    "data/synth/*/rejected.jsonl": _RECORDS,
    "data/synth/*/stats.json": _report(GenerateStats),
    "data/dedup/accepted/*.jsonl": _RECORDS,
    "data/dedup/removed.jsonl": _RECORDS,
    "data/dedup/dedup_stats.json": _report(DedupStats),
    "data/review/*.jsonl": _RECORDS,
    "data/review/review_stats.json": _report(ReviewStats),
    "data/mix/train.jsonl": _TRAINING,
    "data/mix/eval.jsonl": _TRAINING,
    "data/mix/unused.jsonl": _RECORDS,
    "data/mix/mix_stats.json": _report(MixStats),
    "outputs/sft/train_metrics.json": _report(TrainMetrics),
    "outputs/sft/activation_stats.json": _report(ActivationStats),
    "outputs/sft/loss_curve.json": _report(LossCurve),
    "data/prefs/pairs.jsonl": _PAIRS,
    "data/prefs/prefs_stats.json": _report(PrefsStats),
    "data/prefs/review/*.jsonl": _PAIRS,
    "data/prefs/review/review_stats.json": _report(ReviewStats),
    "outputs/dpo/final/posttrain_model.json": _report(ModelPointer),
    "outputs/dpo/dpo_metrics.json": _report(DpoMetrics),
    "data/grpo/prompts.jsonl": _GRPO_PROMPTS,
    "data/grpo/heldout.jsonl": _GRPO_PROMPTS,
    "data/grpo/prompt_stats.json": _report(GrpoPromptStats),
    "outputs/grpo/final/posttrain_model.json": _report(ModelPointer),
    "outputs/grpo/grpo_metrics.json": _report(GrpoMetrics),
    "outputs/audit/fp16_audit.json": _report(Fp16Audit),
    # eval_base, eval_sft and eval write one folder each
    **{f"outputs/eval/{side}/scores.json": _report(EvalScores) for side in EVAL_SIDES},
    **{f"outputs/eval/{side}/{suite}.json": _report(SuiteItems) for side in EVAL_SIDES for suite in SUITE_FILES},
    "outputs/eval/eval_report.json": _report(EvalReport),
    "outputs/eval/dpo_effect.json": _report(EvalReport),
    "outputs/gate/gate_report.json": _report(GateReport),
    "outputs/export/export_report.json": _report(ExportReport),
}
