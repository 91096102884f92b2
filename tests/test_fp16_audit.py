"""`posttrain audit`: flags a model with a planted 1e5 activation as not fp16-safe and
names the layer; (unfinished) passes the same model after training with the activation loss."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.cli import main as cli
from planted_outlier import PLANTED, planted_model, planted_runs

torch.set_num_threads(2)


def run_audit(recipe, model, out) -> dict:
    args = ["audit", str(recipe), "--out", str(out)] + (["--model", str(model)] if model else [])
    assert cli(args) == 0
    assert (out / "fp16_audit.png").stat().st_size > 0
    return json.loads((out / "fp16_audit.json").read_text())


@pytest.mark.slow  # two forwards of 8 conversations, one in emulated fp16 on CPU
def test_audit_flags_the_planted_outlier_as_not_fp16_safe(tmp_path, teacher_dir):
    planted_dir, peak = planted_model(tmp_path)
    assert peak > 1e5
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {tiny: {}, tokenizer: teacher}\n"
        f"audit: {{num_batches: 2, batch_size: 4, max_length: 64, data: [{tmp_path / 'train.jsonl'}]}}\n"
    )
    report = run_audit(recipe, planted_dir, tmp_path / "audit")
    assert report["fp16_safe"] is False
    assert PLANTED.name in [o["site"] for o in report["offending"]]
    assert report["max_abs_per_layer"]["mamba"][str(PLANTED.layer)] > 65504
    assert set(report["max_abs_per_layer"]) == {"moe", "experts", "mamba", "layers"}


@pytest.mark.slow
def test_audit_separates_activations_the_term_fixed_from_weights_fp16_cannot_hold(tmp_path_factory, teacher_dir):
    """After training with the term the planted site's fp32 maximum is under the limit,
    but the plant's scaled weights (embedding, residual writers: ~1e6 x 0.02) are
    themselves beyond fp16's range, and the unpenalised sites still carry the scaled
    stream: the audit must still call the model unsafe, and say why per site."""
    runs = planted_runs(tmp_path_factory.getbasetemp() / "planted_outlier")
    out = tmp_path_factory.mktemp("audit")
    report = run_audit(runs["with_term"]["recipe"], runs["with_term"]["dir"] / "final", out)
    assert report["fp16_safe"] is False
    offending = {o["site"]: o for o in report["offending"]}
    planted = offending[PLANTED.name]
    assert planted["max_abs_fp32"] < 6550 and planted["reason"] == "non-finite in fp16"
    assert report["max_abs_per_layer"]["mamba"][str(PLANTED.layer)] < 6550
    others = [o for name, o in offending.items() if name != PLANTED.name]
    assert any("fp32 max" in o["reason"] for o in others)  # the stream, still scaled


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
    assert report["fp16_safe"] is True and report["model"] == "the recipe's student"
    assert len(report["max_abs_per_layer"]["layers"]) == 8
    assert {key.split(".")[0] for key in report["max_abs_per_layer"]["experts"]} == {"1", "3", "5", "7"}
    assert report["tokens"] > 0 and report["logits"]["nonfinite_fp16"] == 0
