"""`posttrain prefs RECIPE`: preference pairs whose ranking code decided.

Two pipelines already sample several responses per prompt and check each by code:
steerability (the instructions' validators) and tool_use (the calls against the
sampled assignments). For every such prompt that has both

- a **chosen** response: accepted (it passed every validator; after dedup, so it is
  decontaminated like every training record) and ranked best by the pipeline, and
- a **rejected** response: it failed a validator that judges the *response* (a
  violated instruction, a wrong call, a truncated answer; not a flaw of the prompt
  such as a request missing a value), with the most failed validators,

one pair is written in TRL's conversational preference format: `prompt` (the turns
before the answer), `chosen` and `rejected` (one assistant turn each), `tools`, plus
`id`, `pipeline` and `meta`. `meta.checks` holds what the validators checked (the
steerability constraints, the tool_use expected calls), so anyone can re-verify a
pair with the project's own validators; `meta.rejected_reason` is the rejected
response's reason code. Pairs whose text shares an n-gram with a held-out eval item
are dropped, as dedup drops records.

With `code_rejected` (tool_use only), a prompt whose samples all passed (with answers
built by code there is one sample per prompt, so no pair otherwise) gets its rejected
answer built by code, for the faults the recipe names (both measured on a trained
student): `call_when_irrelevant`, a call of an offered function where none fits;
`wrong_arguments`, the right calls with one argument left out (no call, if no argument
can be); `no_call`, the refusal where calls fit (its mirror: without it every code-built
pair ends a rejected answer where a call ends). A call record with both named gets one
of them, picked by its id. The pipeline's own validator must fail it, and its
reason becomes `rejected_reason`; `meta.rejected_source` is "code" (else "sample").

Every prompt ends in exactly one place: a pair, or `prefs_stats.json`'s
`no_pair` count under its reason (all_passed, all_failed, prompt_rejected,
chosen_removed, contaminated, single_sample). Writes OUT/pairs.jsonl and
OUT/prefs_stats.json.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from pipeline.contract import Pair, PrefsStats, Record, read_records, write_pairs, write_report
from pipeline.recipe import RecipeError, add_recipe_arguments, load_recipe
from pipeline.records import stable_hash
from synth_data.dedup import Decontaminator, heldout_reference, record_text
from synth_data.four_steps import verdict
# REFUSAL: the no-call answer the SFT data teaches, so a no_call rejected answer is
# the student's own refusal.
from synth_data.tool_use import REFUSAL, calls_turn, code_answer, match_calls, sample_value

log = logging.getLogger(__name__)

# Reject reasons that say the response is wrong (not the prompt, not the ranking).
RESPONSE_FAILURES: dict[str, set[str]] = {
    "steerability": {"empty", "truncated"},  # plus every violates_<kind>
    "tool_use": {"empty", "truncated", "malformed_call", "no_call", "call_when_irrelevant",
                 "wrong_function", "missing_call", "extra_call", "wrong_type", "wrong_arguments"},
}
NO_PAIR_REASONS = ("all_passed", "all_failed", "prompt_rejected", "chosen_removed", "contaminated",
                   "single_sample")


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--synth", default="data/synth", help="generation outputs: <pipeline>/rejected.jsonl")
    parser.add_argument("--dedup", default="data/dedup/accepted",
                        help="dedup's kept records: <pipeline>.jsonl (the chosen responses come from here)")
    parser.add_argument("--out", default="data/prefs", help="folder for pairs.jsonl and prefs_stats.json")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.prefs
    synth, kept = Path(args.synth), Path(args.dedup)
    missing = [str(p) for name in cfg.pipelines
               for p in (synth / name / "accepted.jsonl", synth / name / "rejected.jsonl", kept / f"{name}.jsonl")
               if not p.is_file()]
    if missing:
        raise RecipeError(f"prefs.pipelines: missing input {', '.join(missing)} (run generate and dedup first)")

    items = heldout_reference(recipe)  # the same held-out eval items dedup checks against
    decontaminator = Decontaminator(items, recipe.dedup.ngram) if items else None

    pairs, stats = [], {"pipelines": {}}
    for name in cfg.pipelines:
        accepted = read_records(synth / name / "accepted.jsonl")
        rejected = read_records(synth / name / "rejected.jsonl")
        survivors = {r.id for r in read_records(kept / f"{name}.jsonl")}
        made, counts = build_pairs(name, accepted, rejected, survivors, decontaminator,
                                   code_rejected=cfg.code_rejected if name == "tool_use" else [])
        pairs += made
        stats["pipelines"][name] = counts
    out = Path(args.out)
    write_pairs(out / "pairs.jsonl", pairs)
    stats["pairs"] = len(pairs)
    stats["prompts"] = sum(c["prompts"] for c in stats["pipelines"].values())
    write_report(out / "prefs_stats.json", PrefsStats, stats)
    print(json.dumps({name: {"prompts": c["prompts"], "pairs": c["pairs"], "no_pair": c["no_pair"]}
                      for name, c in stats["pipelines"].items()}))
    return 0


def is_response_failure(pipeline: str, reason: str | None) -> bool:
    return bool(reason) and (reason in RESPONSE_FAILURES[pipeline] or reason.startswith("violates_"))


def failed_count(record: Record) -> int:
    return sum(not v.passed for v in record.meta.validators.values())


def sample_of(record: Record) -> int:
    """Which of the prompt's samples the record is (pipelines that sample once say none)."""
    return getattr(record.meta, "sample", 0)


def rank(record: Record) -> tuple:
    """Best first: the pipeline's own rank (steerability's scorer), then the mean
    validator score, then the sample index."""
    meta = record.meta
    scores = [v.score for v in meta.validators.values() if v.score is not None]
    return ((meta.scores or {}).get("rank", 0), -(sum(scores) / len(scores) if scores else 0.0), sample_of(record))


def checks_of(pipeline: str, record: Record) -> dict[str, Any]:
    """What the validators checked, enough to re-verify either response."""
    if pipeline == "steerability":
        return {"constraints": record.meta.constraints}
    return {"expected_calls": json.loads(record.meta.expected_calls)}


def build_pairs(
    pipeline: str, accepted: list[Record], rejected: list[Record], survivors: set[str], decontaminator,
    code_rejected: Sequence[str] = (),
) -> tuple[list[Pair], dict[str, Any]]:
    by_prompt: dict[str, dict[str, list[Record]]] = defaultdict(lambda: {"pass": [], "fail": [], "other": []})
    for record in accepted:
        by_prompt[record.meta.seed_id]["pass"].append(record)
    for record in rejected:
        kind = "fail" if is_response_failure(pipeline, record.reject_reason) else "other"
        if record.reject_reason == "not_selected":
            kind = "other"  # it passed, but the ranking preferred another sample
        by_prompt[record.meta.seed_id][kind].append(record)

    pairs, no_pair = [], Counter()
    for seed_id, group in sorted(by_prompt.items()):
        samples = len(group["pass"]) + len(group["fail"]) + len(group["other"])
        passing = sorted((r for r in group["pass"] if r.id in survivors), key=rank)
        built = code_rejected and passing and not group["fail"] and rejected_by_code(passing[0], code_rejected)
        if built:
            pair = make_pair(pipeline, seed_id, passing[0], built)
            if decontaminator is not None and decontaminator.match(pair_text(pair)):
                no_pair["contaminated"] += 1
            else:
                pairs.append(pair)
        elif samples < 2:
            no_pair["single_sample"] += 1
        elif not group["pass"] and not group["fail"]:
            no_pair["prompt_rejected"] += 1
        elif not group["fail"]:
            no_pair["all_passed"] += 1
        elif not group["pass"]:
            no_pair["all_failed"] += 1
        elif not passing:
            no_pair["chosen_removed"] += 1
        else:
            chosen = passing[0]
            loser = sorted(group["fail"], key=lambda r: (-failed_count(r), sample_of(r)))[0]
            pair = make_pair(pipeline, seed_id, chosen, loser)
            if decontaminator is not None and decontaminator.match(pair_text(pair)):
                no_pair["contaminated"] += 1
            else:
                pairs.append(pair)
    counts = {"prompts": len(by_prompt), "pairs": len(pairs),
              "code_rejected": sum(p.meta.rejected_source == "code" for p in pairs),
              "no_pair": {reason: no_pair[reason] for reason in NO_PAIR_REASONS if no_pair[reason]}}
    if counts["pairs"] + sum(counts["no_pair"].values()) != counts["prompts"]:
        raise AssertionError(f"prefs: counts not conserved for {pipeline}: {counts}")
    return pairs, counts


def make_pair(pipeline: str, seed_id: str, chosen: Record, loser: Record) -> Pair:
    pair: dict[str, Any] = {
        "id": stable_hash("prefs", pipeline, chosen.id, loser.id),
        "pipeline": pipeline,
        "prompt": chosen.messages[:-1],
        "chosen": [chosen.messages[-1]],
        "rejected": [loser.messages[-1]],
    }
    if chosen.tools:
        pair["tools"] = chosen.tools
    pair["meta"] = {
        "seed_id": seed_id,
        "chosen_id": chosen.id,
        "rejected_id": loser.id,
        "rejected_reason": loser.reject_reason,
        "rejected_source": getattr(loser.meta, "rejected_source", "sample"),
        "rejected_failed": sorted(n for n, v in loser.meta.validators.items() if not v.passed),
        "checks": checks_of(pipeline, chosen),
        "teacher": chosen.meta.teacher,
    }
    return Pair.model_validate(pair)


def pair_text(pair: Pair) -> str:
    return record_text(pair.prompt + pair.chosen + pair.rejected)


# ------------------------------------------------------------ rejected by code
def rejected_by_code(chosen: Record, faults: Sequence[str]) -> Record | None:
    """A failing answer to a tool_use record's request with one of `faults`, built by
    code and failed by the pipeline's validator (`match_calls`), as a rejected sample;
    None if the record's kind has no fault named, or no answer fails."""
    expected = json.loads(chosen.meta.expected_calls)
    named = [f for f in (("wrong_arguments", "no_call") if expected else ("call_when_irrelevant",)) if f in faults]
    if not named:
        return None
    tools, request = chosen.tools, chosen.messages[-2].content
    rng = random.Random(chosen.id)
    fault = rng.choice(named) if len(named) > 1 else named[0]
    if fault == "no_call":
        options = [[]]
    elif not expected:  # irrelevance: the call a model makes anyway
        options = [[{"name": t["function"]["name"], "arguments": made_up_arguments(t["function"], request, rng)}]
                   for t in rng.sample(tools, len(tools))]
    else:
        dropped = [[*expected[:i], {**call, "arguments": {k: v for k, v in call["arguments"].items() if k != key}},
                    *expected[i + 1:]]
                   for i, call in enumerate(expected) for key in sorted(call["arguments"])]
        # Not "no call" first: no answer of a trained student lacked a call where one
        # fitted, and pairs that reward calling would teach calling where none fits.
        options = [*rng.sample(dropped, len(dropped)), []]
    for calls in options:
        reason = match_calls(code_answer(calls) if calls else REFUSAL, expected, tools)
        if reason is not None:
            break
    else:
        return None
    turn = calls_turn(calls) if calls else {"role": "assistant", "content": REFUSAL}
    return Record.model_validate({
        "id": stable_hash("prefs-code-rejected", chosen.id, turn), "pipeline": chosen.pipeline,
        "messages": [*chosen.messages[:-1], turn], "reject_reason": reason,
        "meta": {"rejected_source": "code", "validators": {"calls": verdict(reason)}}})


def made_up_arguments(function: dict[str, Any], request: str, rng: random.Random) -> dict[str, Any]:
    """A value of the schema's type for every required parameter (free strings: the
    request's first words, as a model that calls anyway fills them)."""
    params = function.get("parameters", {})
    return {name: made_up_value(params.get("properties", {}).get(name, {}), request, rng)
            for name in params.get("required", [])}


def made_up_value(spec: dict[str, Any], request: str, rng: random.Random) -> Any:
    kind = spec.get("type")
    # The generator's sampler speaks BFCL's type names.
    value = sample_value({**spec, "type": {"number": "float"}.get(kind, kind)}, [], rng)
    if value is not None:
        return value
    phrase = " ".join(request.split()[:4])
    return {"object": {}, "array": [phrase]}.get(kind, phrase)
