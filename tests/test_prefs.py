"""Preference pairs from the real steerability and tool_use outputs (the session's
pipeline run on the packaged teacher, then the real dedup stage, then `posttrain prefs`):
counts are conserved, every chosen response passes and every rejected one fails when
re-checked by the project's own validators, and a prompt whose samples all pass or all
fail yields no pair, with its reason counted; with `code_rejected`, every such tool_use
prompt gets a rejected answer built by code that the validator fails for its stated
reason."""

import json
import shutil
from collections import defaultdict

import pytest

from posttrain.cli import main as posttrain
from pipeline.contract import read_records
from pipeline.records import read_json, read_jsonl
from synth_data import constraints, tool_use
from synth_data.prefs import is_response_failure, rejected_by_code

pytestmark = pytest.mark.slow
RECIPE_TEXT = """
generate:
  tool_use: {heldout_fraction: 0.1}
dedup: {}
prefs: {pipelines: [steerability, tool_use]}
"""


@pytest.fixture(scope="module")
def prefs_run(tmp_path_factory, pipeline_outputs):
    """The session's real pipeline outputs -> the real dedup stage -> posttrain prefs."""
    root = tmp_path_factory.mktemp("prefs")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE_TEXT)
    shutil.copytree(pipeline_outputs, root / "synth", ignore=shutil.ignore_patterns("cache"))
    assert posttrain(["dedup", str(recipe), "--input", str(root / "synth"), "--out", str(root / "dedup")]) == 0
    assert posttrain(["prefs", str(recipe), "--synth", str(root / "synth"), "--dedup", str(root / "dedup" / "accepted"),
                      "--out", str(root / "prefs")]) == 0
    return root


def as_text(turn: dict) -> str:
    """An assistant turn as the model would write it (tool calls in their text form)."""
    calls = [c["function"] for c in turn.get("tool_calls") or []]
    text = "".join(f'<tool_call>{json.dumps({"name": c["name"], "arguments": json.loads(c["arguments"])})}</tool_call>'
                   for c in calls)
    return (turn.get("content") or "") + text


def passes(pair: dict, turn: dict) -> bool:
    text = as_text(turn)
    if pair["pipeline"] == "steerability":
        return bool(text.strip()) and all(constraints.check(c["kind"], c["args"], text.strip())
                                          for c in pair["meta"]["checks"]["constraints"])
    return tool_use.match_calls(text, pair["meta"]["checks"]["expected_calls"], pair["tools"]) is None


def test_counts_are_conserved_per_prompt(prefs_run):
    stats = read_json(prefs_run / "prefs" / "prefs_stats.json")
    pairs = read_jsonl(prefs_run / "prefs" / "pairs.jsonl")
    for name, counts in stats["pipelines"].items():
        seeds = {r.meta.seed_id for f in ("accepted", "rejected")
                 for r in read_records(prefs_run / "synth" / name / f"{f}.jsonl")}
        assert counts["prompts"] == len(seeds)
        assert counts["pairs"] + sum(counts["no_pair"].values()) == counts["prompts"]
        assert counts["pairs"] == sum(p["pipeline"] == name for p in pairs)
    assert stats["pairs"] == len(pairs) > 0, stats


def test_every_chosen_passes_and_every_rejected_fails_when_rechecked(prefs_run):
    pairs = read_jsonl(prefs_run / "prefs" / "pairs.jsonl")
    assert pairs
    for pair in pairs:
        assert set(pair) >= {"prompt", "chosen", "rejected"} and pair["prompt"][-1]["role"] == "user"
        assert passes(pair, pair["chosen"][0]), pair["id"]
        assert not passes(pair, pair["rejected"][0]) or pair["meta"]["rejected_reason"] in ("truncated",), pair["id"]
        assert is_response_failure(pair["pipeline"], pair["meta"]["rejected_reason"])


def test_prompts_whose_samples_all_pass_or_all_fail_give_no_pair(prefs_run):
    stats = read_json(prefs_run / "prefs" / "prefs_stats.json")
    paired = {p["meta"]["seed_id"] for p in read_jsonl(prefs_run / "prefs" / "pairs.jsonl")}
    for name in ("steerability", "tool_use"):
        outcome, samples = defaultdict(set), defaultdict(int)
        for record in read_records(prefs_run / "synth" / name / "accepted.jsonl"):
            outcome[record.meta.seed_id].add("pass")
            samples[record.meta.seed_id] += 1
        for record in read_records(prefs_run / "synth" / name / "rejected.jsonl"):
            failed = is_response_failure(name, record.reject_reason)
            outcome[record.meta.seed_id].add("fail" if failed else "other")
            samples[record.meta.seed_id] += 1
        # One sample (the system-message variant's conversation) cannot make a pair at all.
        several = {s for s, n in samples.items() if n >= 2}
        all_failed = {s for s in several if "fail" in outcome[s] and "pass" not in outcome[s]}
        all_passed = {s for s in several if "pass" in outcome[s] and "fail" not in outcome[s]}
        assert not (all_failed | all_passed) & paired
        no_pair = stats["pipelines"][name]["no_pair"]
        assert no_pair.get("all_failed", 0) == len(all_failed)
        assert no_pair.get("all_passed", 0) == len(all_passed)


FAULTS = ("call_when_irrelevant", "wrong_arguments", "no_call")


@pytest.fixture(scope="module")
def code_rejected_run(prefs_run):
    """The same dedup output through prefs with rejected answers built by code."""
    assert posttrain(["prefs", str(prefs_run / "recipe.yaml"), "--set", f"prefs.code_rejected=[{','.join(FAULTS)}]",
                      "--synth", str(prefs_run / "synth"), "--dedup", str(prefs_run / "dedup" / "accepted"),
                      "--out", str(prefs_run / "prefs-code")]) == 0
    return prefs_run / "prefs-code"


def test_code_built_rejected_answers_fail_the_validator_for_their_stated_reason(prefs_run, code_rejected_run):
    plain = {p["meta"]["seed_id"]: p for p in read_jsonl(prefs_run / "prefs" / "pairs.jsonl")}
    pairs = read_jsonl(code_rejected_run / "pairs.jsonl")
    stats = read_json(code_rejected_run / "prefs_stats.json")["pipelines"]
    built = [p for p in pairs if p["meta"]["rejected_source"] == "code"]
    assert built and stats["tool_use"]["code_rejected"] == len(built)
    assert all(p["pipeline"] == "tool_use" for p in built)  # steerability never
    for pair in built:
        assert pair["meta"]["seed_id"] not in plain  # only where the samples made no pair
        expected = pair["meta"]["checks"]["expected_calls"]
        assert passes(pair, pair["chosen"][0])
        reason = tool_use.match_calls(as_text(pair["rejected"][0]), expected, pair["tools"])
        assert reason == pair["meta"]["rejected_reason"]
        assert reason == ("call_when_irrelevant" if not expected else "wrong_arguments") or reason == "no_call"
    # A prompt whose samples all passed is no longer left without a pair.
    assert "all_passed" not in stats["tool_use"]["no_pair"], stats["tool_use"]
    for seed, pair in plain.items():  # the sampled pairs are unchanged
        assert pair in pairs


def test_a_rejected_answer_is_built_for_every_accepted_tool_use_record(prefs_run):
    """Call records too (here their teacher samples made the pairs): each answer built
    fails the validator for its stated reason, and differs from the accepted one."""
    records = read_records(prefs_run / "synth" / "tool_use" / "accepted.jsonl")
    kinds = set()
    for record in records:
        built = rejected_by_code(record, FAULTS)
        expected = json.loads(record.meta.expected_calls)
        kinds.add(bool(expected))
        reason = tool_use.match_calls(as_text(built.messages[-1].dump()), expected, record.tools)
        assert reason is not None and reason == built.reject_reason, record.id
        assert reason in (("wrong_arguments", "no_call") if expected else ("call_when_irrelevant",))
        assert built.messages[:-1] == record.messages[:-1]
    assert kinds == {True, False}, "the session's output lacks call or irrelevance records"
    # Only the faults named are built.
    assert all((rejected_by_code(r, ["call_when_irrelevant"]) is None) == bool(json.loads(r.meta.expected_calls))
               for r in records)
    # no_call, the mirror of call_when_irrelevant: the SFT data's own refusal where calls fit.
    for record in records:
        built = rejected_by_code(record, ["no_call"])
        if not json.loads(record.meta.expected_calls):
            assert built is None
            continue
        assert built.messages[-1].dump() == {"role": "assistant", "content": tool_use.REFUSAL}
        assert built.reject_reason == "no_call", record.id
