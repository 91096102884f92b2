"""GRPO's rewards: the validators that accept or reject the SFT records, now scoring the
policy's own answers (one source of truth: a change to a validator changes the data
and the reward together).

  tool_calls    tool_use.match_calls: 1 when the answer's calls equal the expected call
                set (the same AST comparison that keeps a teacher answer); else 0, or
                with grpo.partial_credit the share of expected calls made exactly
  steerability  constraints.check on every instruction: the share the answer follows
  table_qa      table_qa.check_answer: 1 when the answer states the computed answer
  well_formed   four_steps.rejected_if_malformed (empty, truncated) and, for tool_use,
                the malformed-call check: 0 for a cut-off or malformed answer, else 1

A reward scores only the prompts of its pipeline and returns None for the others (TRL
leaves None out of the group's mean); well_formed scores every prompt. Each prompt
carries what its verifier needs (`verifier`, written by `posttrain grpo-prompts`):
expected calls (checked against the prompt's tools), constraints, or the computed answer.

TRL calls a reward as fn(prompts, completions, completion_ids, **dataset columns,
log_metric, ...). A validator that raises on a sample stops training with
RewardError, which names the sample and its pipeline.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

from pipeline.chat_template import parse_tool_calls
from pipeline.records import InputError
from synth_data import tool_use
from synth_data.constraints import check
from synth_data.four_steps import rejected_if_malformed
from synth_data.table_qa import check_answer


class RewardError(InputError):
    """A reward raised on one sample: the message names the reward, sample and pipeline."""


# ------------------------------------------------------------------ the scores
def score_tool_calls(text: str, verifier: dict[str, Any], partial_credit: bool = False) -> float:
    expected, tools = verifier["calls"], verifier["tools"]
    if tool_use.match_calls(text, expected, tools) is None:
        return 1.0
    if not partial_credit or not expected:
        return 0.0
    calls, errors = parse_tool_calls(text)
    if errors:
        return 0.0
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    try:
        got = Counter(tool_use.canonical_call(c, by_name) for c in calls if c["name"] in by_name)
    except tool_use.TypeMismatch:
        return 0.0
    want = Counter(tool_use.canonical_call(c, by_name) for c in expected)
    # Extra calls cost as much as missing ones: the share of the union matched.
    return sum((got & want).values()) / sum((got | want).values())


def score_steerability(text: str, verifier: dict[str, Any]) -> float:
    constraints = verifier["constraints"]
    answer = text.strip()
    return sum(check(c["kind"], c["args"], answer) for c in constraints) / len(constraints)


def score_table_qa(text: str, verifier: dict[str, Any]) -> float:
    return 1.0 if check_answer(text, verifier["stated"], verifier.get("not_stated", [])) is None else 0.0


def score_well_formed(text: str, finish_reason: str, pipeline: str) -> float:
    answer = {"messages": [{"role": "assistant", "content": text}], "completion": {"finish_reason": finish_reason}}
    if rejected_if_malformed(answer):
        return 0.0
    if pipeline == "tool_use":
        calls, errors = parse_tool_calls(text)
        if errors or ("<tool_call>" in text and not calls):
            return 0.0
    return 1.0


# name -> (the pipeline it scores, or None for every pipeline)
PIPELINE_OF: dict[str, str | None] = {
    "tool_calls": "tool_use", "steerability": "steerability", "table_qa": "table_qa", "well_formed": None,
}


# ------------------------------------------------------------ TRL's functions
def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes a string for text prompts, a list of one
    assistant message for conversational ones."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def reward_functions(names: list[str], *, max_completion_length: int, eos_ids: list[int],
                     partial_credit: bool = False) -> list[Callable[..., list[float | None]]]:
    """TRL reward functions for the recipe's `grpo.rewards`, in order. A completion of
    max_completion_length tokens that does not end in an end token was cut off."""
    unknown = [n for n in names if n not in PIPELINE_OF]
    if unknown:
        raise InputError(f"grpo.rewards: unknown reward {unknown[0]!r} (known: {', '.join(PIPELINE_OF)})")
    eos = set(eos_ids)

    def finish_reason(ids: list[int]) -> str:
        return "length" if len(ids) >= max_completion_length and (not ids or ids[-1] not in eos) else "stop"

    def score(name: str, text: str, ids: list[int], pipeline: str, verifier: dict[str, Any]) -> float:
        if name == "tool_calls":
            return score_tool_calls(text, verifier, partial_credit)
        if name == "steerability":
            return score_steerability(text, verifier)
        if name == "table_qa":
            return score_table_qa(text, verifier)
        return score_well_formed(text, finish_reason(ids), pipeline)

    def make(name: str):
        own = PIPELINE_OF[name]

        def reward(prompts, completions, completion_ids, id, pipeline, verifier, log_metric=None, **_):
            rewards: list[float | None] = []
            for text, ids, sample, source, spec in zip(
                    map(completion_text, completions), completion_ids, id, pipeline, verifier):
                if own is not None and source != own:
                    rewards.append(None)
                    continue
                try:
                    rewards.append(float(score(name, text, list(ids), source, json.loads(spec))))
                except Exception as exc:
                    raise RewardError(f"reward {name} raised on sample {sample} (pipeline {source}): "
                                      f"{type(exc).__name__}: {exc}") from exc
            if log_metric is not None:  # the mean per pipeline, beside TRL's mean over all
                by_pipeline: dict[str, list[float]] = {}
                for value, source in zip(rewards, pipeline):
                    if value is not None:
                        by_pipeline.setdefault(source, []).append(value)
                for source, values in by_pipeline.items():
                    log_metric(f"rewards/{name}/{source}", sum(values) / len(values))
            return rewards

        reward.__name__ = name  # TRL's name for its logs: rewards/<name>/mean
        return reward

    return [make(n) for n in names]
