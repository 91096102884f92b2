"""The DAG: `dvc repro` on a reduced copy of the default recipe runs every stage, and
counts are conserved from generation to the mix; a changed SFT value reruns only sft
and what follows; a failing gate stops `dvc repro` before export; a changed pipeline
count reruns only that pipeline and what follows."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stage_outputs import records_as_written
from pipeline.records import read_json, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PIPELINES = ["table_qa", "doc_qa", "tool_use", "steerability", "needle", "chat"]
# One `dvc repro` of the reduced recipe, from scratch, on 2 busy cores.
REPRO_TIMEOUT_S = 2 * 3600


def copy_repo(dest: Path) -> Path:
    """The files a fresh clone would have (tracked + untracked, not ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
        capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def reduced_recipe(repo: Path) -> Path:
    recipe = yaml.safe_load((repo / "recipes/tiny-cpu.yaml").read_text())
    # The in-process transformers engine: the vLLM engine has its own slow test, and
    # six vLLM start-ups would dominate this one.
    recipe["teacher"].update(engine="transformers", cache_dir=".cache/completions")
    recipe["teacher"].setdefault("sampling", {})["max_tokens"] = 48
    for name in PIPELINES:
        recipe["generate"][name]["count"] = 3
    recipe["review"]["mode"] = "off"
    recipe["sft"].update(max_steps=4, logging_steps=2, max_length=256)
    recipe["audit"].update(num_batches=1, batch_size=2, max_length=128)
    # Each eval runs five times over the two repros below: a few items per suite (every
    # suite still writes its per-item contract and is gated).
    recipe["eval"].update(length_buckets=[1024], retention={"count": 1, "tasks": ["niah_single_1", "vt"]},
                          tool_calls={"count": 1, "max_tokens": 16}, ifeval={"count": 2, "max_tokens": 16},
                          forgetting={"count": 4})
    path = repo / "recipes/ci-dag.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    (repo / "params.yaml").write_text(
        (repo / "params.yaml").read_text().replace("recipes/tiny-cpu.yaml", "recipes/ci-dag.yaml")
    )
    return path


def dvc(repo: Path, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def repro(repo: Path) -> set[str]:
    """Run `dvc repro` (bounded: a hung stage fails the test); return the stages that ran."""
    return set(re.findall(r"Running stage '([^']+)'", dvc(repo, "repro", timeout=REPRO_TIMEOUT_S)))


def changed_stages(repo: Path) -> set[str]:
    """Stages `dvc status` reports as changed themselves (not through upstream)."""
    return set(re.findall(r"^(\S+):$", dvc(repo, "status"), re.M))


@pytest.mark.slow
@pytest.mark.timeout(2 * REPRO_TIMEOUT_S)  # a whole repro, a partial one, and checks
def test_dvc_repro_runs_every_stage_and_conserves_counts(tiny_dag):
    repo, recipe_path = tiny_dag.repo, tiny_dag.recipe  # one `dvc repro` from scratch (conftest)
    assert tiny_dag.ran >= {"teacher", "dedup", "mix", "sft", "prefs", "dpo", "grpo_prompts", "grpo", "audit",
                           "eval_base", "eval_sft",
                           "eval", "gate", "dpo_effect", "export", "plots"}

    # Generation: every generated record is accepted or rejected (with a reason).
    accepted_total = 0
    for name in PIPELINES:
        stats = read_json(repo / f"data/synth/{name}/stats.json")
        accepted = records_as_written(repo / f"data/synth/{name}/accepted.jsonl")  # checks the contract
        rejected = records_as_written(repo / f"data/synth/{name}/rejected.jsonl")
        assert stats["generated"] == len(accepted) + len(rejected), name
        assert all(v["passed"] for r in accepted for v in r["meta"]["validators"].values()), name
        assert all(r["reject_reason"] in {v["reason"] for v in r["meta"]["validators"].values() if not v["passed"]}
                   for r in rejected), name
        accepted_total += len(accepted)

    # Dedup keeps or removes (with a reason) every accepted record.
    dedup = read_json(repo / "data/dedup/dedup_stats.json")
    kept = sum(len(read_jsonl(p)) for p in (repo / "data/dedup/accepted").glob("*.jsonl"))
    removed = read_jsonl(repo / "data/dedup/removed.jsonl")
    assert kept + len(removed) == accepted_total, dedup

    # Review (off: automatic verdicts) passes every kept record on, in one bucket each.
    review = read_json(repo / "data/review/review_stats.json")
    reviewed = records_as_written(repo / "data/review/reviewed.jsonl", trainable=True)
    assert len(reviewed) == kept, review

    # The mix places every reviewed-accepted record in train, eval or unused.
    mix = read_json(repo / "data/mix/mix_stats.json")
    assert mix["train"] + mix["eval"] + mix["unused"] == mix["input"]
    assert mix["train"] > 0

    # Training, audit, export and plots wrote their reports.
    train = read_json(repo / "outputs/sft/train_metrics.json")
    assert train["global_step"] == 4 and train["final_loss"] is not None
    assert read_json(repo / "outputs/sft/lora_coverage.json")
    # The audit measured every MoE and Mamba site in fp32, found all inside fp16's
    # range, and ran the fp16 forward without a non-finite logit.
    audit = read_json(repo / "outputs/audit/fp16_audit.json")
    per_layer = audit["max_abs_per_layer"]
    assert {"moe", "mamba"} <= set(per_layer) and all(per_layer[k] for k in ("moe", "mamba"))
    peaks = [v for layers in per_layer.values() for v in layers.values()]
    assert all(v is not None for v in peaks) and audit["max_abs"] == max(peaks) < audit["fp16_limit"]
    assert audit["fp16_safe"] is True and audit["offending"] == []
    assert audit["logits"]["nonfinite_fp16"] == audit["logits"]["nonfinite_fp32"] == 0
    assert audit["batches"] == 1 and audit["tokens"] > 0
    # Export reloaded each profile of the LoRA run from disk within the tolerance.
    export = read_json(repo / "outputs/export/export_report.json")
    assert export["kind"] == "lora" and set(export["profiles"]) == {"adapter", "merged", "vllm"}
    for name, profile in export["profiles"].items():
        assert profile["passed"] is True and profile["max_abs_logit_diff"] <= export["tolerance"], name
        assert (repo / profile["path"]).is_dir() or Path(profile["path"]).is_dir(), name
    for png in ("loss.png", "activation_maxima.png", "acceptance.png"):
        assert (repo / "reports" / png).stat().st_size > 1000, png
    metrics = dvc(repo, "metrics", "show", "--json")
    assert "acceptance_rate" in metrics and "final_loss" in metrics
    # What `make run` ends with: the run in about 30 lines.
    summary = subprocess.run([str(BIN / "posttrain"), "summary"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout
    assert len(summary.splitlines()) <= 35, summary
    assert f"loss {train['first_loss']:.4g} -> {train['final_loss']:.4g}" in summary, summary
    assert "not run" not in summary and "unexpected report shape" not in summary, summary
    assert repro(repo) == set(), "a second repro with nothing changed must skip every stage"

    # Precision: an SFT value reruns sft and what follows, and no generation.
    text = recipe_path.read_text()
    recipe_path.write_text(text.replace("learning_rate: 0.001", "learning_rate: 0.002"))
    assert changed_stages(repo) == {"sft"}
    # dpo and grpo (off) rewrite their pointers, which carry the SFT folder's hash; the
    # SFT and the final model are scored again and gated (DPO's own effect too);
    # eval_base (the untrained student) is not rerun.
    assert repro(repo) == {"sft", "dpo", "grpo", "audit", "eval_sft", "eval", "gate", "dpo_effect", "export",
                           "plots"}

    # One pipeline's count changes that pipeline's stage only; DVC then reruns what
    # depends on its outputs.
    text = recipe_path.read_text()
    recipe = yaml.safe_load(text)
    recipe["generate"]["chat"]["count"] = 4
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert changed_stages(repo) == {"generate@chat"}

    # The gate blocks through DVC: a floor on a score (a gate param: the gate and the DPO
    # effect's report rerun; above the scale, so it fails whatever the random student
    # answers) fails the gate stage, dvc repro stops there and export does not run.
    recipe_path.write_text(text)  # the chat count as it ran
    recipe = yaml.safe_load(text)
    recipe["gate"]["min_scores"] = {"ifeval.prompt_strict": 101.0}
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert changed_stages(repo) == {"gate", "dpo_effect"}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    blocked = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=REPRO_TIMEOUT_S)
    output = blocked.stdout + blocked.stderr
    assert blocked.returncode != 0, output[-4000:]
    ran = re.findall(r"Running stage '([^']+)'", output)
    assert "gate" in ran and set(ran) <= {"gate", "dpo_effect"}, output[-4000:]
    gate = read_json(repo / "outputs/gate/gate_report.json")
    assert gate["passed"] is False
    assert [c["name"] for c in gate["checks"] if not c["passed"]] == ["min_score ifeval.prompt_strict"]
    message = next(line for line in output.splitlines() if line.startswith("gate: FAILED"))
    assert "min_score ifeval.prompt_strict: after" in message and "(minimum 101)" in message, message
