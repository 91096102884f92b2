"""The SFT mix trains on what review accepted, keeps every category at its ratio and
loses no record. Its input is real review pull output (reviewed.jsonl) made from real
pipeline output."""

import argparse
import subprocess
import sys

import pytest
from stage_outputs import needle_records

from pipeline.contract import read_records
from pipeline.records import read_json, read_jsonl, write_jsonl
from review import pull


def reviewed(tmp_path, inputs: list[str]) -> list[dict]:
    """Review pull with review off: every record passes with its automatic verdict."""
    recipe = tmp_path / "review.yaml"
    recipe.write_text("review:\n  mode: 'off'\n")
    out = tmp_path / "review"
    ns = argparse.Namespace(recipe=str(recipe), overrides=[], input=inputs, out=str(out))
    assert pull.main(ns) == 0
    return [r.dump() for r in read_records(out / "reviewed.jsonl", trainable=True)]


@pytest.fixture(scope="module")
def needles_reviewed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-input")
    needle_records(root / "needle", 10)
    return reviewed(root, [str(root / "needle" / "accepted.jsonl")])


def run_mix(tmp_path, recs, *overrides):
    src = tmp_path / "reviewed.jsonl"
    write_jsonl(src, recs)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mix:\n  eval_fraction: 0.1\n  seed: 3\n")
    cmd = [sys.executable, "-m", "posttrain.cli", "mix", str(recipe), "--input", str(src),
           "--out", str(tmp_path / "mix"), *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(cmd, capture_output=True, text=True)


def mix_stats(tmp_path, recs, *overrides):
    result = run_mix(tmp_path, recs, *overrides)
    assert result.returncode == 0, result.stderr
    return read_json(tmp_path / "mix" / "mix_stats.json")


@pytest.mark.slow
def test_mix_respects_ratios_and_conserves_records(tmp_path, pipeline_outputs):
    inputs = sorted(str(p) for p in pipeline_outputs.glob("*/accepted.jsonl"))
    recs = reviewed(tmp_path, inputs)
    stats = mix_stats(tmp_path, recs)
    assert stats["train"] + stats["eval"] + stats["unused"] == len(recs) == stats["input"]
    per = stats["per_category"]
    by_pipeline = {p: sum(r["pipeline"] == p for r in recs) for p in {r["pipeline"] for r in recs}}
    # Needle buckets are student tokens (long context); steerability's words ("short") are not.
    assert per["long_context"]["available"] == by_pipeline.get("needle", 0) + sum(
        r["pipeline"] == "doc_qa" and isinstance(r["meta"].get("length_bucket"), int) for r in recs)
    assert per["conversational"]["available"] == by_pipeline.get("chat", 0)
    # The mix is the largest one that keeps every category's share given what exists:
    # the scarcest category (relative to its ratio) is used up, the others are drawn
    # at their ratios to it (to rounding). A category with no records stays empty.
    present = {n: c for n, c in per.items() if c["target_ratio"] > 0 and c["available"] > 0}
    assert present, per
    size = min(c["available"] / c["target_ratio"] for c in present.values())
    for name, c in per.items():
        want = size * c["target_ratio"] if name in present else 0
        assert c["in_mix"] <= c["available"] and abs(c["in_mix"] - want) <= 0.51, per
    assert any(c["in_mix"] == c["available"] for c in present.values())
    train = read_jsonl(tmp_path / "mix" / "train.jsonl")
    evals = read_jsonl(tmp_path / "mix" / "eval.jsonl")
    unused = read_jsonl(tmp_path / "mix" / "unused.jsonl")
    ids = [r["id"] for r in train + evals + unused]
    assert len(ids) == len(set(ids)) == len(recs)
    assert all(r["unused_reason"] == "over_ratio" for r in unused)
    assert len(evals) == max(1, round(0.1 * (len(train) + len(evals))))


def test_mix_is_deterministic_and_ignores_input_order(tmp_path, needles_reviewed):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = mix_stats(tmp_path / "a", needles_reviewed)
    second = mix_stats(tmp_path / "b", list(reversed(needles_reviewed)))
    assert first == second and first["input"] == len(needles_reviewed) == 10
    for name in ("train.jsonl", "eval.jsonl", "unused.jsonl"):
        assert (tmp_path / "a" / "mix" / name).read_text() == (tmp_path / "b" / "mix" / name).read_text()


def test_what_review_did_not_accept_never_enters_the_mix(tmp_path, needles_reviewed):
    """reviewed.jsonl holds accepted and corrected records only; anything else in the
    mix's input (a record review rejected or left pending, one that skipped review, a
    field no stage writes) stops the stage, naming the record."""
    good = needles_reviewed[:4]
    rejected = {**good[0], "meta": {**good[0]["meta"], "review": {"decision": "rejected", "by": "human"}},
                "reject_reason": "human_reject"}
    skipped = {**good[1], "meta": {k: v for k, v in good[1]["meta"].items() if k != "review"}}
    stray = {**good[2], "review_status": "accepted"}
    for i, (bad, message) in enumerate([
        (rejected, "meta.review.decision is 'rejected'"),
        (skipped, "meta.review.decision is None"),
        (stray, "review_status: Extra inputs are not permitted"),
    ]):
        folder = tmp_path / str(i)
        folder.mkdir()
        result = run_mix(folder, [*good[3:], bad])
        assert result.returncode == 2
        assert f":2: record '{bad['id']}': {message}" in result.stderr
        assert not (folder / "mix" / "train.jsonl").exists()
    stats = mix_stats(tmp_path, good, "mix.ratios={long_context: 1.0}")
    mixed = read_jsonl(tmp_path / "mix" / "train.jsonl") + read_jsonl(tmp_path / "mix" / "eval.jsonl")
    assert stats["input"] == 4 and {r["id"] for r in mixed} == {r["id"] for r in good}
