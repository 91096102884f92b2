"""`posttrain audit`: flags a model with a planted 1e5 activation as not fp16-safe and
names the layer; passes the same model after training with the activation loss."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cli import main as cli
from planted_outlier import PLANTED, planted_runs

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    return planted_runs(tmp_path_factory.getbasetemp() / "planted_outlier")


def run_audit(recipe, model, out) -> dict:
    assert cli(["audit", str(recipe), "--model", str(model), "--out", str(out)]) == 0
    assert (out / "fp16_audit.png").stat().st_size > 0
    return json.loads((out / "fp16_audit.json").read_text())


@pytest.mark.slow
def test_audit_flags_the_planted_outlier_and_passes_the_trained_model(runs, tmp_path):
    recipe = runs["with_term"]["recipe"]

    planted = run_audit(recipe, runs["planted"], tmp_path / "planted")
    assert planted["fp16_safe"] is False
    assert PLANTED.name in [o["site"] for o in planted["offending"]]
    assert planted["max_abs_per_layer"]["mamba"][str(PLANTED.layer)] > 65504
    assert set(planted["max_abs_per_layer"]) == {"moe", "experts", "mamba", "layers"}

    fixed = run_audit(recipe, runs["with_term"]["dir"] / "final", tmp_path / "trained")
    print(f"audit max |activation|: planted {planted['max_abs']:.4g} -> trained {fixed['max_abs']:.4g}; "
          f"max |logit diff| fp16 vs fp32 {fixed['logits']['max_abs_diff']}")
    assert fixed["fp16_safe"] is True, fixed["offending"]
    assert fixed["offending"] == [] and fixed["logits"]["nonfinite_fp16"] == 0
    assert fixed["logits"]["max_abs_diff"] < 0.5


@pytest.mark.slow  # the half-precision forward on CPU is slow (fp16 matmuls are emulated)
def test_audit_of_the_recipe_student_reports_every_site(tmp_path, teacher_dir):
    from pipeline.records import write_jsonl
    from planted_outlier import conversations

    write_jsonl(tmp_path / "eval.jsonl", conversations(4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {tiny: {}, tokenizer: teacher}\n"
        f"data: {{train: [{tmp_path / 'eval.jsonl'}], eval: [{tmp_path / 'eval.jsonl'}]}}\n"
        "audit: {num_batches: 1, batch_size: 4, max_length: 64}\n"
    )
    assert cli(["audit", str(recipe), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "fp16_audit.json").read_text())
    assert report["fp16_safe"] is True and report["model"] == "recipe student"
    assert len(report["max_abs_per_layer"]["layers"]) == 8
    assert {key.split(".")[0] for key in report["max_abs_per_layer"]["experts"]} == {"1", "3", "5", "7"}
    assert report["tokens"] > 0 and report["logits"]["nonfinite_fp16"] == 0
