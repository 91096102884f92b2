"""The SFT mix keeps every category at its ratio and loses no record."""

import json
import subprocess
import sys

from pipeline.records import make_record, read_json, read_jsonl, write_jsonl


def records(pipeline, n, bucket=None):
    out = []
    for i in range(n):
        meta = {"length_bucket": bucket} if bucket else {}
        msgs = [{"role": "user", "content": f"{pipeline} q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        out.append(make_record(pipeline, msgs, meta))
    return out


def run_mix(tmp_path, recs, *overrides):
    src = tmp_path / "reviewed.jsonl"
    write_jsonl(src, recs)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mix:\n  eval_fraction: 0.1\n  seed: 3\n")
    cmd = [sys.executable, "-m", "pipeline.cli", "mix", str(recipe), "--input", str(src),
           "--out", str(tmp_path / "mix"), *[a for o in overrides for a in ("--set", o)]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return read_json(tmp_path / "mix" / "mix_stats.json")


def test_mix_respects_ratios_and_conserves_records(tmp_path):
    # Buckets in student tokens mark long context; a pipeline's own word classes do not.
    recs = (records("chat", 40) + records("table_qa", 30) + records("tool_use", 45)
            + records("steerability", 5, "short") + records("needle", 25, 1024))
    stats = run_mix(tmp_path, recs)
    assert stats["train"] + stats["eval"] + stats["unused"] == len(recs) == stats["input"]
    # skill (80 available) limits nothing; long_context (25 at 0.2) bounds the size at 125.
    per = stats["per_category"]
    assert per["long_context"]["in_mix"] == 25
    assert per["conversational"]["in_mix"] == round(125 * 0.3)
    assert per["skill"]["in_mix"] == round(125 * 0.5)
    train = read_jsonl(tmp_path / "mix" / "train.jsonl")
    evals = read_jsonl(tmp_path / "mix" / "eval.jsonl")
    unused = read_jsonl(tmp_path / "mix" / "unused.jsonl")
    ids = [r["id"] for r in train + evals + unused]
    assert len(ids) == len(set(ids)) == len(recs)
    assert all(r["unused_reason"] == "over_ratio" for r in unused)
    assert len(evals) == round(0.1 * (len(train) + len(evals)))


def test_mix_is_deterministic_and_ignores_input_order(tmp_path):
    recs = records("chat", 20) + records("doc_qa", 20)
    first = run_mix(tmp_path / "a", recs) if (tmp_path / "a").mkdir() is None else None
    train_a = (tmp_path / "a" / "mix" / "train.jsonl").read_text()
    (tmp_path / "b").mkdir()
    second = run_mix(tmp_path / "b", list(reversed(recs)))
    assert first == second
    assert train_a == (tmp_path / "b" / "mix" / "train.jsonl").read_text()


def test_rejected_review_status_never_enters_the_mix(tmp_path):
    recs = records("chat", 10)
    for r in recs[:4]:
        r["review_status"] = "rejected"
    stats = run_mix(tmp_path, recs, "mix.ratios={conversational: 1.0}")
    assert stats["input"] == 6
    mixed = read_jsonl(tmp_path / "mix" / "train.jsonl") + read_jsonl(tmp_path / "mix" / "eval.jsonl")
    assert {r["id"] for r in mixed} == {r["id"] for r in recs[4:]}
    assert json.dumps(stats)  # plain JSON
