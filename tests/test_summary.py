"""`posttrain summary`: what a run produced, read in about 30 lines, from the reports the
stages really write; a stage that has not run says so instead of failing."""

import pytest
import yaml

from posttrain.cli import main as cli
from pipeline.records import read_json

ROOT_RECIPE = "recipes/tiny-cpu.yaml"


def test_summary_of_a_fresh_checkout_says_what_has_not_run(tmp_path, capsys):
    assert cli(["summary", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    for stage in ("generate", "dedup", "review", "mix", "train", "prefs", "audit", "export"):
        assert any(line.startswith(stage) and "not run" in line for line in out), (stage, out)
    assert not any(line.startswith(("eval", "gate")) for line in out)  # optional stages


@pytest.mark.slow  # one pipeline, dedup, review, mix, 2 training steps, audit, export
def test_summary_of_a_real_run_fits_a_screen_and_carries_the_key_numbers(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    recipe = yaml.safe_load((Path(__file__).parents[1] / ROOT_RECIPE).read_text())
    # The cheapest real chain: needle records are written by code; the transformers
    # engine loads the teacher in seconds where vLLM takes a minute.
    recipe["teacher"].update(engine="transformers", cache_dir=str(tmp_path / "cache"))
    recipe["generate"] = {"needle": {"count": 4, "length_buckets": [512]}}
    recipe["review"]["mode"] = "off"
    recipe["mix"]["eval_fraction"] = 0.25
    recipe["model"]["tiny"] = {"hidden_size": 64, "intermediate_size": 128, "mamba_dt_rank": 4}
    recipe["sft"].update(max_steps=2, logging_steps=1, max_length=640, warmup_steps=0)
    recipe["audit"].update(num_batches=1, batch_size=1, max_length=64)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.chdir(tmp_path)  # the stages' default paths, as in dvc.yaml

    for command in (
        ["generate", "needle", "recipe.yaml"],
        ["dedup", "recipe.yaml", "--input", "data/synth", "--out", "data/dedup"],
        ["review", "pull", "recipe.yaml", "--input", "data/dedup/accepted/*.jsonl", "--out", "data/review"],
        ["mix", "recipe.yaml", "--input", "data/review/reviewed.jsonl", "--out", "data/mix"],
        ["train", "recipe.yaml", "--output-dir", "outputs/sft"],
        ["audit", "recipe.yaml", "--model", "outputs/sft/final", "--out", "outputs/audit"],
        ["export", "recipe.yaml", "--model", "outputs/sft/final", "--out", "outputs/export/profiles",
         "--report", "outputs/export/export_report.json"],
    ):
        assert cli(command) == 0, command
    capsys.readouterr()

    assert cli(["summary"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    print(text)
    assert len(lines) <= 35 and max(map(len, lines)) <= 160

    synth = read_json(tmp_path / "data/synth/needle/stats.json")
    dedup = read_json(tmp_path / "data/dedup/dedup_stats.json")
    mix = read_json(tmp_path / "data/mix/mix_stats.json")
    train = read_json(tmp_path / "outputs/sft/train_metrics.json")
    audit = read_json(tmp_path / "outputs/audit/fp16_audit.json")
    export = read_json(tmp_path / "outputs/export/export_report.json")
    needle = next(line for line in lines if line.strip().startswith("needle"))
    assert f"{synth['accepted']} / {synth['generated']}" in needle
    assert f"{dedup['input']} in, {dedup['kept']} kept" in text
    assert f"train {mix['train']}, eval {mix['eval']}, unused {mix['unused']}" in text
    assert f"2 steps, loss {train['first_loss']:.4g} -> {train['final_loss']:.4g}" in text
    cut = train["truncation"]
    assert (f"max_length {cut['max_length']}: {cut['train']['truncated']} truncated, "
            f"{cut['train']['answer_cut']} answer cut, {cut['train']['skipped']} skipped") in text
    for kind, value in train["activation_loss"]["max_abs"].items():
        assert f"{kind} {value:.4g}" in text
    verdict = "fp16-safe" if audit["fp16_safe"] else "NOT fp16-safe"
    assert f"fp16 audit {verdict}, max |activation| {audit['max_abs']:.4g}" in text
    merged = export["profiles"]["merged"]["max_abs_logit_diff"]
    assert "export     passed (lora)" in text and f"merged {merged:.4g} ok" in text
    assert "outputs/sft/final/" in text and "data/mix/" in text


def test_the_grpo_lines_carry_the_heldout_reward_with_its_interval():
    from posttrain import summary
    from pipeline.contract import GrpoMetrics

    metrics = {"enabled": True, "global_step": 24, "prompts": 96, "reward_first": 0.4, "reward_last": 0.6}
    effect = {"prompts": 72, "before": 0.41, "after": 0.5, "delta": 0.09, "low": 0.01, "high": 0.17, "p": 0.03,
              "better": 20, "worse": 9, "per_pipeline": {"tool_use": {"prompts": 24, "before": 0.3, "after": 0.4}}}
    without = summary.grpo(None, {"grpo": GrpoMetrics.model_validate(metrics)})
    lines = summary.grpo(None, {"grpo": GrpoMetrics.model_validate({**metrics, "heldout_reward": effect})})
    assert len(without) == 1 and lines[0] == without[0]
    assert lines[1].split() == "held-out reward 0.41 -> 0.5 (+0.09 [+0.01, +0.17], p 0.03, 72 prompts)".split()
