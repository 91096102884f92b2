"""RL on verifier rewards (`posttrain grpo`): the rewards are the validators that filter
the SFT data — change a validator and the reward follows — scoring only their own
pipeline's prompts; the prompts come from each pipeline's own prompt step, with what
the verifier needs; bad input is one line; with grpo.enabled false the stage leaves a
pointer that audit, eval and export follow; and the tiny Jamba trains a few GRPO steps
through DVC with the activation loss on, a raising reward stopping the run with the
finished steps kept."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main as posttrain
from pipeline.contract import read_grpo_prompts
from pipeline.records import read_json
from synth_data import four_steps, rewards, table_qa, tool_use
from synth_data.grpo_prompts import as_grpo_prompt

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"


def step_one(pipeline: str, count: int = 12, **fields) -> list[dict]:
    """GRPO prompts from the pipeline's own step (i), as grpo-prompts builds them."""
    cfg = four_steps.validate_config(pipeline, {"count": count, "seed": 7, **fields})
    module = four_steps.load_pipeline(pipeline)
    return [as_grpo_prompt(pipeline, p).dump() for p in module.sample_prompts(cfg, random.Random(7))]


def score(name: str, prompts: list[dict], texts: list[str], ids=None, partial_credit=False, log=None):
    """One reward over (prompt, answer) pairs, called as TRL calls it."""
    [fn] = rewards.reward_functions([name], max_completion_length=64, eos_ids=[0], partial_credit=partial_credit)
    verifiers = [json.dumps({**p["verifier"], **({"tools": p["tools"]} if p.get("tools") else {})}) for p in prompts]
    return fn(prompts=[p["prompt"] for p in prompts], completions=texts,
              completion_ids=ids or [[5, 0]] * len(texts), id=[p["id"] for p in prompts],
              pipeline=[p["pipeline"] for p in prompts], verifier=verifiers, log_metric=log)


# ------------------------------------------------------------------ rewards
def test_the_tool_call_reward_is_the_validators_exact_match():
    prompts = [p for p in step_one("tool_use", 16) if p["verifier"]["calls"]]
    right = [tool_use.code_answer(p["verifier"]["calls"]) for p in prompts]
    # One argument changed: the validator rejects it, and so must the reward.
    wrong = []
    for p in prompts:
        calls = json.loads(json.dumps(p["verifier"]["calls"]))
        key = next(iter(calls[0]["arguments"]), None)
        calls[0]["arguments"][key] = "something else" if key else None
        wrong.append(tool_use.code_answer(calls))
    assert score("tool_calls", prompts, right) == [1.0] * len(prompts)
    scores = score("tool_calls", prompts, wrong)
    expected = [1.0 if tool_use.match_calls(w, p["verifier"]["calls"], p["tools"]) is None else 0.0
                for w, p in zip(wrong, prompts)]
    assert scores == expected and 0.0 in scores


def test_a_reward_follows_its_validator(monkeypatch):
    # One source of truth: a validator changed to reject everything (or accept
    # everything) changes the reward with it.
    prompts = [p for p in step_one("tool_use", 16) if p["verifier"]["calls"]][:3]
    right = [tool_use.code_answer(p["verifier"]["calls"]) for p in prompts]
    monkeypatch.setattr(tool_use, "match_calls", lambda *a: "wrong_arguments")
    assert score("tool_calls", prompts, right) == [0.0] * 3
    steer = step_one("steerability", 6)
    monkeypatch.setattr(rewards, "check", lambda kind, args, text: True)
    assert score("steerability", steer, ["anything"] * len(steer)) == [1.0] * len(steer)
    tables = step_one("table_qa", 3)
    monkeypatch.setattr(rewards, "check_answer", lambda *a: "wrong_answer")
    assert score("table_qa", tables, [p["meta"]["answer"] for p in tables]) == [0.0] * 3


def test_partial_credit_only_where_the_recipe_asks():
    prompt = next(p for p in step_one("tool_use", 40, mix={"parallel": 1.0}) if len(p["verifier"]["calls"]) >= 2)
    calls = prompt["verifier"]["calls"]
    half = tool_use.code_answer(calls[:1])
    assert score("tool_calls", [prompt], [half]) == [0.0]
    [partial] = score("tool_calls", [prompt], [half], partial_credit=True)
    assert partial == pytest.approx(1 / len(calls))
    assert score("tool_calls", [prompt], [tool_use.code_answer(calls)], partial_credit=True) == [1.0]


def test_the_steerability_reward_is_the_share_of_constraints_followed():
    prompt = {"id": "s1", "pipeline": "steerability", "prompt": [{"role": "user", "content": "Write."}],
              "verifier": {"constraints": [{"kind": "lowercase", "args": {}},
                                           {"kind": "max_words", "args": {"n": 5}}]}}
    assert score("steerability", [prompt] * 3, ["all lower here", "all lower but far too many words here",
                                                "Upper And Too Many Words Here Now"]) == [1.0, 0.5, 0.0]


def test_the_table_reward_is_one_when_the_computed_answer_is_stated():
    prompts = step_one("table_qa", 24)
    answers = [p["meta"]["answer"] for p in prompts]  # pandas' answer, as the SFT record states it
    assert score("table_qa", prompts, answers) == [1.0] * len(prompts)
    assert {p["meta"]["question_type"] for p in prompts} == {"extraction", "aggregation", "attribution"}
    assert score("table_qa", prompts, ["I do not know."] * len(prompts)).count(0.0) >= len(prompts) - 2
    # Naming a row the answer excludes is wrong even when every right row is named.
    attribution = next(p for p in prompts if p["verifier"]["not_stated"] and p["meta"]["question_type"] == "attribution")
    padded = attribution["meta"]["answer"] + " Also " + attribution["verifier"]["not_stated"][0] + "."
    assert table_qa.check_answer(padded, attribution["verifier"]["stated"], attribution["verifier"]["not_stated"])
    assert score("table_qa", [attribution], [padded]) == [0.0]


def test_well_formed_is_zero_for_a_cut_off_empty_or_malformed_answer():
    steer = step_one("steerability", 1)[0]
    tool = next(p for p in step_one("tool_use", 12) if p["verifier"]["calls"])
    prompts = [steer, steer, steer, tool, tool]
    texts = ["A fine answer.", "Cut off in the midd", "  ", '<tool_call>{"name": oops</tool_call>',
             tool_use.code_answer(tool["verifier"]["calls"])]
    ids = [[5, 0], [5] * 64, [5, 0], [5, 0], [5, 0]]  # 64 tokens without the end token: truncated
    assert score("well_formed", prompts, texts, ids=ids) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_a_reward_scores_only_its_own_pipeline_and_logs_per_pipeline_means():
    prompts = step_one("steerability", 2, conversations=0) + step_one("table_qa", 2)
    texts = ["x"] * 2 + [p["meta"]["answer"] for p in prompts[2:]]
    logged = {}
    assert score("table_qa", prompts, texts, log=lambda k, v: logged.setdefault(k, v)) == [None, None, 1.0, 1.0]
    assert logged == {"rewards/table_qa/table_qa": 1.0}
    logged.clear()
    score("well_formed", prompts, texts, log=lambda k, v: logged.setdefault(k, v))
    assert set(logged) == {"rewards/well_formed/steerability", "rewards/well_formed/table_qa"}


def test_a_raising_validator_names_the_sample_and_pipeline(monkeypatch):
    tables = step_one("table_qa", 2)

    def broken(*args):
        raise KeyError("stated")

    monkeypatch.setattr(rewards, "check_answer", broken)
    with pytest.raises(rewards.RewardError, match=rf"reward table_qa raised on sample {tables[0]['id']} "
                                                   r"\(pipeline table_qa\): KeyError"):
        score("table_qa", tables, ["x", "y"])


# ------------------------------------------------------------------ prompts
def test_prompts_come_from_each_pipelines_prompt_step_decontaminated(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    held_out = tmp_path / "heldout.txt"
    raw = {"dedup": {"bfcl_heldout": False, "ifeval_heldout": False, "heldout_files": [str(held_out)]},
           "grpo": {"prompts": {"tool_use": 6, "steerability": 4, "table_qa": 5}, "seed": 3}}
    held_out.write_text("")
    recipe.write_text(yaml.safe_dump(raw))
    assert posttrain(["grpo-prompts", str(recipe), "--out", str(tmp_path / "clean")]) == 0
    clean = read_grpo_prompts(tmp_path / "clean" / "prompts.jsonl")
    # A held-out item that shares a 13-word run with one prompt removes that prompt.
    victim = next(p for p in clean if p.pipeline == "steerability")
    held_out.write_text(" ".join(victim.prompt[-1].content.split()[:13]) + "\n")
    assert posttrain(["grpo-prompts", str(recipe), "--out", str(tmp_path / "out")]) == 0
    stats = read_json(tmp_path / "out" / "prompt_stats.json")
    kept = read_grpo_prompts(tmp_path / "out" / "prompts.jsonl")
    assert victim.id not in {p.id for p in kept}
    assert stats["pipelines"]["steerability"]["contaminated"] >= 1
    for name, counts in stats["pipelines"].items():
        assert counts["sampled"] == counts["contaminated"] + counts["kept"]
        assert counts["kept"] == sum(p.pipeline == name for p in kept)
    assert stats["pipelines"]["table_qa"]["sampled"] == 5
    # No teacher answer anywhere: the last turn is the user's, and the verifier's needs ride along.
    assert all(p.prompt[-1].role == "user" for p in kept)
    assert all("calls" in p.verifier for p in kept if p.pipeline == "tool_use")
    assert all(p.verifier["stated"] for p in kept if p.pipeline == "table_qa")


# ---------------------------------------------------------------- bad input
def test_heldout_prompts_are_sampled_apart_from_the_training_prompts(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "dedup": {"bfcl_heldout": False, "ifeval_heldout": False},
        "grpo": {"prompts": {"tool_use": 6, "table_qa": 5}, "heldout": {"tool_use": 4, "table_qa": 3}, "seed": 3}}))
    assert posttrain(["grpo-prompts", str(recipe), "--out", str(tmp_path)]) == 0
    trained = read_grpo_prompts(tmp_path / "prompts.jsonl")
    heldout = read_grpo_prompts(tmp_path / "heldout.jsonl")
    stats = read_json(tmp_path / "prompt_stats.json")
    assert {k: v["kept"] for k, v in stats["heldout"].items()} == {"tool_use": 4, "table_qa": 3}
    # three times the count sampled; kept never more than what is neither contaminated nor trained
    assert all(v["sampled"] == 3 * v["kept"] and v["kept"] <= v["sampled"] - v["contaminated"] - v["trained"]
               for v in stats["heldout"].values())
    texts = {json.dumps(p.turns()) for p in trained}
    assert not texts & {json.dumps(p.turns()) for p in heldout}
    assert len({p.id for p in heldout}) == len(heldout) == 7
    assert all(p.id.startswith("heldout-") for p in heldout)


@pytest.mark.slow
def test_heldout_answers_are_the_policys_greedy_answers_scored_by_the_rewards(teacher_dir):
    """On real weights (the packaged SmolLM2): a left-padded batch answers each prompt
    as it answers alone, each reward is the rewards' sum on that answer, and the same
    model on both sides is no change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.grpo import answer_heldout, heldout_effect, load_prompts

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype="float32")
    tmp = Path(tempfile.mkdtemp())
    from pipeline.contract import write_grpo_prompts

    write_grpo_prompts(tmp / "heldout.jsonl", step_one("table_qa", 2) + step_one("tool_use", 2))
    rows = load_prompts(tmp / "heldout.jsonl", None, "--heldout")
    fns = rewards.reward_functions(["tool_calls", "table_qa", "well_formed"], max_completion_length=32,
                                   eos_ids=[tokenizer.eos_token_id], partial_credit=False)
    batch = answer_heldout(model, tokenizer, rows, fns, 32, [tokenizer.eos_token_id], batch_size=4)
    alone = [answer_heldout(model, tokenizer, [row], fns, 32, [tokenizer.eos_token_id])[0] for row in rows]
    assert [b["answer"] for b in batch] == [a["answer"] for a in alone]
    assert any(b["answer"].strip() for b in batch)
    for row, b in zip(rows, batch):
        ids = tokenizer(b["answer"], add_special_tokens=False)["input_ids"]
        ids = ids + [tokenizer.eos_token_id] if b["finish_reason"] == "stop" else ids + [-1] * 32
        total = sum(fn(prompts=[None], completions=[b["answer"]], completion_ids=[ids], id=[row["id"]],
                       pipeline=[row["pipeline"]], verifier=[row["verifier"]])[0] or 0.0 for fn in fns)
        assert b["reward"] == pytest.approx(total, abs=1e-9)
    same = heldout_effect(rows, batch, batch, tmp)
    assert same["delta"] == 0 and same["p"] == 1
    # One more point on each of 12 prompts after: a rise no paired test misses (on 4
    # prompts the smallest two-sided permutation p is 2/16).
    many, answered = rows * 3, batch * 3
    better = heldout_effect(many, answered, [{**b, "reward": b["reward"] + 1} for b in answered], tmp)
    assert better["delta"] == pytest.approx(1) and better["p"] < 0.05 and better["better"] == len(many)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A folder the stages accept as a model (a config is enough for the checks that
    run before any weights load)."""
    from transformers import JambaConfig

    from pipeline.student import TINY_JAMBA

    folder = tmp_path_factory.mktemp("model")
    JambaConfig(**TINY_JAMBA).save_pretrained(folder)
    return folder


def bad_input_rows():
    R = str(RECIPE)
    on = ["--set", "grpo.enabled=true"]
    return [
        ("unknown-reward", [*on, "--set", "grpo.rewards=[tool_calls,lucky_guess]"], None,
         ["grpo.rewards", "lucky_guess", "known: tool_calls"]),
        ("missing-prompts", on, "nope/prompts.jsonl", ["--prompts", "prompts.jsonl", "no such file"]),
        ("empty-prompts", on, "empty.jsonl", ["--prompts", "empty.jsonl", "no prompts"]),
        ("num-generations", [*on, "--set", "grpo.num_generations=3"], None,
         ["grpo.num_generations 3", "does not divide", "per_device_train_batch_size 4"]),
        ("wrong-type", [*on, "--set", "grpo.beta=high"], None, ["grpo.beta"]),
    ], R


@pytest.mark.parametrize("row", bad_input_rows()[0], ids=lambda r: r[0])
def test_bad_grpo_input_is_one_clear_line(row, tmp_path, capsys, model_folder):
    _, overrides, prompts, words = row
    (tmp_path / "empty.jsonl").write_text("")
    good = tmp_path / "good.jsonl"
    from pipeline.contract import write_grpo_prompts

    write_grpo_prompts(good, step_one("table_qa", 2))
    path = tmp_path / prompts if prompts else good
    survivor = tmp_path / "out" / "grpo_metrics.json"
    survivor.parent.mkdir()
    survivor.write_text("previous\n")
    code = posttrain(["grpo", str(RECIPE), *overrides, "--model", str(model_folder), "--prompts", str(path),
                      "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("posttrain grpo: error: ")
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]}"
    assert survivor.read_text() == "previous\n"


# -------------------------------------------------------------- GRPO off
def test_grpo_off_leaves_a_pointer_the_later_stages_follow(tmp_path, model_folder):
    from pipeline.student import check_model_folder, resolve_model_folder
    from sft import dpo

    # dpo off points to the SFT folder; grpo off points through it to the same folder.
    dpo.write_pointer(model_folder, tmp_path / "dpo")
    assert posttrain(["grpo", str(RECIPE), "--model", str(tmp_path / "dpo" / "final"),
                      "--output-dir", str(tmp_path / "grpo")]) == 0
    final = tmp_path / "grpo" / "final"
    assert resolve_model_folder(final) == model_folder
    assert check_model_folder(final) == "model"
    assert read_json(tmp_path / "grpo" / "grpo_metrics.json")["enabled"] is False
    assert not (final / "config.json").exists()


# ------------------------------------------------------ generation on CPU
def test_cached_generation_keeps_the_mamba_state_of_a_padded_batch():
    # GRPO generates with transformers' generate, the cache on (grpo_config): the
    # hybrid cache must carry each Mamba layer's state so that answers equal the
    # uncached ones, and a left-padded prompt answers as it does alone.
    import torch

    from pipeline.recipe import ModelSection, load_recipe
    from pipeline.student import load_student, load_tokenizer
    from sft.grpo import grpo_config

    assert grpo_config(load_recipe(RECIPE), Path("unused")).generation_kwargs["use_cache"] is True
    section = ModelSection(tiny={}, tokenizer="teacher", chat_template="chatml")
    tokenizer = load_tokenizer(section)
    model = load_student(section, tokenizer).eval()
    tokenizer.padding_side = "left"
    texts = ["Write a short poem about the sea and the sky and the wind.", "Hi"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)

    def answer(inputs, cache):
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=cache,
                                 pad_token_id=tokenizer.pad_token_id)
        return ids[:, inputs["input_ids"].shape[1]:].tolist()

    cached = answer(batch, True)
    assert cached == answer(batch, False)
    assert [answer(tokenizer([t], return_tensors="pt"), True)[0] for t in texts] == cached


# ------------------------------------------------- the tiny Jamba, through DVC
GRPO = {"enabled": True, "prompts": {"tool_use": 2, "steerability": 2, "table_qa": 2}, "seed": 1000,
        "heldout": {"tool_use": 2, "table_qa": 2},
        "max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 12,
        "temperature": 1.0, "learning_rate": 1e-3, "beta": 0.04, "logging_steps": 1, "bf16": False,
        "use_cpu": True, "disable_tqdm": True, "output_dir": "outputs/grpo"}


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def sft_adapter(folder: Path, recipe) -> Path:
    """What the sft stage leaves for the tiny default: a LoRA adapter on the student
    over the recipe's target groups (experts included), with the last Mamba layer
    planted at 2e4 so the activation loss has something to hold in range."""
    from peft import get_peft_model

    from pipeline.student import load_student, load_tokenizer
    from planted_outlier import scale_residual_stream, site_peak
    from sft.lora import build_lora_config

    tokenizer = load_tokenizer(recipe.model)
    model = load_student(recipe.model, tokenizer)
    scale_residual_stream(model, 2e4 / site_peak(model, tokenizer))
    model.save_pretrained(folder / "planted")
    config, _ = build_lora_config(recipe.lora, model)
    get_peft_model(model, config).save_pretrained(folder / "final")
    tokenizer.save_pretrained(folder / "final")
    return folder / "final"


@pytest.mark.slow
def test_tiny_jamba_trains_grpo_in_the_dag_with_the_activation_loss(tmp_path):
    from pipeline.recipe import load_recipe

    repo = copy_repo(tmp_path / "repo")
    raw = yaml.safe_load((repo / "recipes" / "tiny-cpu.yaml").read_text())
    raw["grpo"] = GRPO
    raw["dedup"] = {"bfcl_heldout": False, "ifeval_heldout": False}
    raw["activation_loss"] = {"alpha": 1e-5, "sites": ["mamba"], "last_n_mamba": 1}
    raw["model"]["name_or_path"], raw["model"]["tiny"] = str(repo / "outputs" / "dpo" / "planted"), None
    (repo / "recipes" / "ci-grpo.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("tiny-cpu", "ci-grpo"))
    # outputs/dpo/final as the dpo stage leaves it: the SFT adapter (DPO continues it).
    raw["model"]["name_or_path"], raw["model"]["tiny"] = None, {}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(raw))
    sft_adapter(repo / "outputs" / "dpo", load_recipe(tmp_path / "build.yaml"))

    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path),
           "PYTHONPATH": str(repo)}
    for stage in ("grpo_prompts", "grpo"):
        done = subprocess.run([str(bin_dir / "dvc"), "repro", "--single-item", stage], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    metrics = read_json(repo / "outputs/grpo/grpo_metrics.json")
    curve = read_json(repo / "outputs/grpo/grpo_curve.json")
    print(json.dumps({k: metrics.get(k) for k in ("global_step", "reward_first", "reward_last", "seconds_per_step",
                                                   "activation_loss_share_mean", "mode")}))
    assert metrics["enabled"] and metrics["global_step"] == 2 and metrics["prompts"] >= 6
    assert metrics["mode"] == "lora (SFT adapter continued)"
    # The activation loss is in the loss, logged with its share, on the planted site.
    assert all(r["activation_loss"] > 0 and 0 < r["activation_loss_share"] < 1 for r in curve)
    assert metrics["activation_loss"]["max_abs"]["mamba"] > 1e3
    # Rewards per reward and per pipeline are logged each step.
    assert all("rewards/well_formed/mean" in r for r in curve)
    assert any(k.startswith("rewards/well_formed/") and k.count("/") == 2 and not k.endswith(("mean", "std"))
               for r in curve for k in r)
    final = repo / "outputs/grpo/final"
    assert (final / "adapter_config.json").is_file()
    # The held-out prompts: none is a training prompt; each answered before and after,
    # its reward the sum of what the rewards give that answer, paired in the metrics.
    stats = read_json(repo / "data/grpo/prompt_stats.json")
    heldout = read_grpo_prompts(repo / "data/grpo/heldout.jsonl")
    trained = read_grpo_prompts(repo / "data/grpo/prompts.jsonl")
    assert {k: v["kept"] for k, v in stats["heldout"].items()} == GRPO["heldout"]
    assert not {json.dumps(p.turns()) for p in heldout} & {json.dumps(p.turns()) for p in trained}
    answers = read_json(repo / "outputs/grpo/heldout_answers.json")
    assert [a["id"] for a in answers] == [p.id for p in heldout]
    [fn] = rewards.reward_functions(["tool_calls"], max_completion_length=GRPO["max_completion_length"],
                                    eos_ids=[0], partial_credit=False)
    for side in ("before", "after"):
        got = fn(prompts=[None] * len(heldout), completions=[a[side]["answer"] for a in answers],
                 completion_ids=[[0]] * len(heldout), id=[p.id for p in heldout],
                 pipeline=[p.pipeline for p in heldout],
                 verifier=[json.dumps({**p.verifier, "tools": p.tools}) for p in heldout])
        # well_formed adds at most 1; tool_calls is exact: the sum holds both
        assert all(v is None or v <= a[side]["reward"] <= v + 1 for v, a in zip(got, answers))
    effect = metrics["heldout_reward"]
    assert effect["prompts"] == len(heldout) == 4
    assert effect["before"] == pytest.approx(sum(a["before"]["reward"] for a in answers) / 4)
    assert effect["after"] == pytest.approx(sum(a["after"]["reward"] for a in answers) / 4)
    assert effect["low"] <= effect["delta"] <= effect["high"] and 0 <= effect["p"] <= 1
    coverage = read_json(repo / "outputs/grpo/lora_coverage.json")
    # The gradient check waits for a step whose answers scored differently (before
    # that the policy loss has no gradient); on the random student that may never come.
    assert coverage["no_gradient"] in ([], None)
    assert all(coverage["groups"][g]["layers_covered"] == coverage["groups"][g]["layers_present"] > 0
               for g in ("attention", "mamba", "mlp", "experts"))

    # A reward that raises on a sample at step 2 stops the run in one line naming it;
    # step 1 (4 answers: 2 prompts x 2 generations) is kept.
    calls = {"n": 0}
    original = rewards.score_well_formed

    def raising(text, finish_reason, pipeline):
        calls["n"] += 1
        if calls["n"] > 4:
            raise ValueError("planted")
        return original(text, finish_reason, pipeline)

    args = argparse.Namespace(recipe=str(repo / "recipes/ci-grpo.yaml"), overrides=[],
                              model=str(repo / "outputs/dpo/final"), prompts=str(repo / "data/grpo/prompts.jsonl"),
                              heldout=None, output_dir=str(tmp_path / "raising"), local_rank=-1)
    from sft import grpo

    monkey = pytest.MonkeyPatch()
    monkey.setattr(rewards, "score_well_formed", raising)
    monkey.chdir(repo)
    try:
        with pytest.raises(rewards.RewardError, match=r"reward well_formed raised on sample \S+ \(pipeline "
                                                      r"\w+\): ValueError: planted; the 1 finished step"):
            grpo.main(args)
    finally:
        monkey.undo()
    assert (tmp_path / "raising" / "interrupted" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_grpo_trains_under_deepspeed_zero2_with_2_cpu_processes(tmp_path):
    """Two CPU processes under DeepSpeed ZeRO-2: each rank generates and scores its own
    share of every generation batch, so an optimizer step covers twice the prompts one
    process covers, and the epoch after two steps shows it."""
    import os

    import torch
    from safetensors.torch import load_file

    from pipeline.contract import write_grpo_prompts
    from pipeline.ports import free_port
    from pipeline.recipe import load_recipe

    raw = yaml.safe_load(RECIPE.read_text())
    raw["grpo"] = {**GRPO, "per_device_train_batch_size": 2, "output_dir": str(tmp_path / "grpo")}
    raw["activation_loss"] = {"alpha": 1e-5, "sites": ["mamba"], "last_n_mamba": 1}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(raw))
    sft_adapter(tmp_path / "sft", load_recipe(tmp_path / "build.yaml"))
    raw["model"]["name_or_path"], raw["model"]["tiny"] = str(tmp_path / "sft" / "planted"), None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    prompts = step_one("table_qa", 4) + step_one("tool_use", 4)
    write_grpo_prompts(tmp_path / "prompts.jsonl", prompts)

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    out = tmp_path / "grpo"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "posttrain.cli", "grpo", str(recipe), "--model", str(tmp_path / "sft" / "final"),
           "--prompts", str(tmp_path / "prompts.jsonl"), "--output-dir", str(out),
           "--set", f"grpo.deepspeed={ROOT / 'recipes' / 'accelerate' / 'zero2.json'}"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = read_json(out / "grpo_metrics.json")
    curve = read_json(out / "grpo_curve.json")
    # A step is 2 completions per rank (per_device_train_batch_size 2), 2 per prompt:
    # one prompt per rank, two per step on two ranks. Two steps over the 8 prompts are
    # half an epoch; one process alone would be at a quarter.
    assert metrics["global_step"] == 2 and metrics["prompts"] == len(prompts) == 8
    assert metrics["epoch"] == pytest.approx(2 * 2 * 2 / (2 * len(prompts)))
    assert all(r["activation_loss"] > 0 and 0 < r["activation_loss_share"] < 1 for r in curve)
    trained = load_file(out / "final" / "adapter_model.safetensors")
    sft = load_file(tmp_path / "sft" / "final" / "adapter_model.safetensors")
    assert set(trained) == set(sft)
    assert read_json(out / "lora_coverage.json")["no_gradient"] in ([], None)
