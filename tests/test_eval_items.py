"""The per-item contract a paired before/after comparison needs, on real stage outputs:
every suite's rows carry a stable `id`, a `score` in the metric's unit, `passed` where
an item is pass/fail, and the fields naming the metric cell they belong to; held-out
loss rows carry `id`, `category`, `tokens`, `loss` (and `cluster` where records share a
source); every suite's metrics carry `stderr` for each mean, nested like the metric."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stage_outputs import needle_records

from evals import heldout_loss, standard_error
from pipeline.contract import Conversation
from pipeline.recipe import load_recipe
from pipeline.records import read_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/tiny-cpu.yaml"


# ------------------------------------------------------------------ held-out loss
def test_heldout_rows_and_the_standard_error_of_a_token_weighted_loss(tmp_path, teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat_template import apply_training_template

    records = [Conversation.model_validate(r) for r in needle_records(tmp_path / "needle", 3)]
    tokenizer = apply_training_template(AutoTokenizer.from_pretrained(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    result = heldout_loss.evaluate(model, tokenizer, records, load_recipe(TINY).mix, max_length=2048)
    rows = result["items"]
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert all(set(r) == {"id", "category", "tokens", "loss"} for r in rows)  # needle haystacks are their own
    sums, counts = [r["loss"] * r["tokens"] for r in rows], [r["tokens"] for r in rows]
    err = result["metrics"]["stderr"]
    assert err["overall"] == pytest.approx(standard_error.of_ratio(sums, counts), abs=1e-3)
    assert err["long_context"] == err["overall"] and err["overall"] > 0


def test_the_ratio_standard_error_is_the_mean_one_for_equal_weights():
    from lm_eval.api.metrics import mean_stderr

    values = [2.0, 3.5, 1.25, 4.0]
    assert standard_error.of_ratio([10 * v for v in values], [10] * 4) == pytest.approx(mean_stderr(values), abs=1e-4)
    assert standard_error.of_mean(values) == round(mean_stderr(values), 4)
    assert standard_error.of_mean([1.0]) is None and standard_error.of_ratio([1.0], [2]) is None
    assert standard_error.of_mean_of_means([3.0, 4.0]) == 2.5 and standard_error.of_mean_of_means([3.0, None]) is None


@pytest.mark.slow
def test_heldout_records_sharing_a_source_share_a_cluster(pipeline_outputs, teacher_dir):
    """doc_qa records of one document, table_qa records of one table and answers to one
    prompt are clusters; the standard error treats each cluster as one unit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat_template import apply_training_template
    from pipeline.contract import read_conversations

    records = [r for name in ("doc_qa", "table_qa", "chat", "steerability")
               for kind in ("accepted", "rejected")
               for r in read_conversations(pipeline_outputs / name / f"{kind}.jsonl")]
    clusters = [heldout_loss.cluster_of(r) for r in records]
    assert all(clusters)
    prefixes = {c.split(":")[0] for c in clusters}
    assert {"doc", "table", "chat", "steerability"} <= prefixes
    assert len(set(clusters)) < len(clusters)  # some records share their source

    tokenizer = apply_training_template(AutoTokenizer.from_pretrained(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    result = heldout_loss.evaluate(model, tokenizer, records, load_recipe(TINY).mix, max_length=512)
    rows = result["items"]
    units = {}
    for r in rows:
        if r["tokens"]:
            units.setdefault(r["cluster"], [0.0, 0])
            units[r["cluster"]][0] += r["loss"] * r["tokens"]
            units[r["cluster"]][1] += r["tokens"]
    assert all(r["cluster"] for r in rows)
    assert result["metrics"]["stderr"]["overall"] == pytest.approx(
        standard_error.of_ratio([u[0] for u in units.values()], [u[1] for u in units.values()]), abs=1e-3)


# -------------------------------------------------------------- the eval stage
def eval_recipe(work: Path, seed: int) -> Path:
    """tiny-cpu with a few items per suite, transformers engine, its own cache."""
    recipe = yaml.safe_load(TINY.read_text())
    recipe["model"]["seed"] = seed
    recipe["eval"].update(engine="transformers", length_buckets=[1024], cache_dir=str(work / "cache"),
                          heldout_files=[str(work / "eval.jsonl")], data_root=str(work))
    recipe["eval"].update(retention={"count": 1, "tasks": ["vt", "cwe"]},
                          tool_calls={"count": 1, "max_tokens": 8},
                          ifeval={"count": 2, "max_tokens": 8},
                          forgetting={"count": 5})
    path = work / f"recipe-{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_the_eval_stage_writes_the_per_item_contract_for_every_suite(tmp_path):
    """Two different students (two seeds of the tiny model) answer the same items under
    the same ids, and every suite's file holds the rows and standard errors a paired
    comparison reads."""
    write_jsonl(tmp_path / "eval.jsonl", needle_records(tmp_path / "needle", 2))
    outs = {}
    for seed in (0, 1):
        out = tmp_path / f"out-{seed}"
        proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "eval", str(eval_recipe(tmp_path, seed)),
                               "--model", "base", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[seed] = out
    scores = read_json(outs[0] / "scores.json")
    suites = {"heldout_loss", "forgetting", "retention", "tool_calls", "ifeval"}
    assert set(scores["scores"]) == suites
    assert scores["counts"]["forgetting"] == 5

    for suite in suites:
        files = [read_json(outs[seed] / f"{suite}.json") for seed in (0, 1)]
        assert [r["id"] for r in files[0]["items"]] == [r["id"] for r in files[1]["items"]], suite
        assert len({r["id"] for r in files[0]["items"]}) == len(files[0]["items"]) > 0, suite
        assert "stderr" in files[0]["metrics"], suite
        json.dumps(files[0])
    rows = {suite: read_json(outs[0] / f"{suite}.json")["items"] for suite in suites}
    for suite in ("retention", "tool_calls", "ifeval"):
        for r in rows[suite]:
            assert isinstance(r["passed"], bool) and 0 <= r["score"] <= 100, (suite, r)
    assert {(r["task"], r["length"]) for r in rows["retention"]} == {("vt", 1024), ("cwe", 1024)}
    assert {r["category"] for r in rows["tool_calls"]} == {"simple", "multiple", "parallel", "parallel_multiple",
                                                          "irrelevance"}
    assert sorted(r["language"] for r in rows["tool_calls"] if r["category"] == "simple") == [
        "java", "javascript", "python"]
    assert all(set(r) >= {"id", "category", "tokens", "loss"} for r in rows["heldout_loss"])
    assert all(set(r) == {"id", "tokens", "loss"} for r in rows["forgetting"])

    metrics = scores["scores"]
    assert set(metrics["tool_calls"]["stderr"]) >= {"simple", "simple_python", "simple_java", "simple_javascript",
                                                    "non_live_ast", "overall", "irrelevance"}
    assert set(metrics["retention"]["stderr"]) == {"vt", "cwe", "average"}
    assert set(metrics["ifeval"]["stderr"]) == {"prompt_strict", "prompt_loose", "instruction_strict",
                                                "instruction_loose"}
    assert metrics["ifeval"]["notes"] == ["max_tokens: 8 (IFEval uses 1280): length instructions may be unreachable"]
    assert metrics["forgetting"]["stderr"]["overall"] > 0 and metrics["heldout_loss"]["stderr"]["overall"] > 0
    # the probe is reported apart from the in-distribution loss, both near chance here
    assert metrics["forgetting"]["overall"] != metrics["heldout_loss"]["overall"]
    assert 9 < metrics["forgetting"]["overall"] < 13  # random weights: about ln 49,152 = 10.8
