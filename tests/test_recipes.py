"""Every shipped recipe loads and validates (no model is built), and says how to run it."""

import json
from pathlib import Path

import pytest
import yaml

from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"smollm2-lora-cpu.yaml", "jamba-mini-lora.yaml", "jamba-mini-full.yaml"} <= names
    assert {p.name for p in ACCELERATE} >= {"ddp.yaml", "zero2.yaml", "zero3.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_opens_with_a_comment(path):
    recipe = load_recipe(path)
    assert path.read_text().startswith("#"), f"{path.name}: open with purpose, hardware, command"
    deepspeed = recipe.sft.get("deepspeed")
    if deepspeed:
        assert (ROOT / deepspeed).is_file(), f"{path.name}: sft.deepspeed {deepspeed} missing"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_name_existing_deepspeed_files(path):
    config = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("#")
    ds_file = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if config["distributed_type"] == "DEEPSPEED":
        stage = json.loads((ROOT / ds_file).read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in path.name


def test_jamba_recipes_use_gpu_settings():
    lora = load_recipe(ROOT / "recipes" / "jamba-mini-lora.yaml")
    full = load_recipe(ROOT / "recipes" / "jamba-mini-full.yaml")
    for recipe in (lora, full):
        assert recipe.model.name_or_path == "ai21labs/AI21-Jamba-Mini-1.6"
        assert recipe.sft["bf16"] and recipe.sft["gradient_checkpointing"]
    assert full.lora is None and full.sft["deepspeed"].endswith("zero3.json")
    assert {"attention", "mamba", "mlp", "experts"} <= set(lora.lora["target_modules"])


# ------------------------------------------------------------- whole-DAG recipes
# Recipes the DAG runs end to end (params.yaml `recipe:`): they name a teacher.
DAG_RECIPES = [p for p in RECIPES if "teacher" in (yaml.safe_load(p.read_text()) or {})]


def dvc_recipe_params() -> set[str]:
    """Every `${recipe}` parameter key of every stage, as DVC resolves dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    recipe_file = yaml.safe_load((ROOT / "params.yaml").read_text())["recipe"]
    with Repo(str(ROOT)) as repo:
        return {key for stage in repo.index.stages for dep in stage.deps
                if isinstance(dep, ParamsDependency) and dep.def_path == recipe_file
                for key in dep.params}


def test_the_dag_recipes_include_the_real_scale_ones():
    assert {"tiny-cpu.yaml", "smollm2-proof.yaml", "jamba-mini-lora.yaml",
            "jamba-mini-full.yaml"} <= {p.name for p in DAG_RECIPES}


@pytest.mark.parametrize("path", DAG_RECIPES, ids=lambda p: p.name)
def test_every_section_of_a_dag_recipe_validates(path):
    # The loader checks our sections and TRL/PEFT field names; each pipeline's and
    # each eval suite's own Config checks its subsection, as the stages do at start.
    from evals.evaluate import suite_configs
    from synth_data import four_steps

    recipe = load_recipe(path)
    for name, raw in (recipe.raw.get("generate") or {}).items():
        four_steps.validate_config(name, raw, path)
    assert suite_configs(recipe)
    for section in ("sft", "dpo"):
        deepspeed = getattr(recipe, section).get("deepspeed")
        assert not deepspeed or (ROOT / deepspeed).is_file(), f"{section}.deepspeed {deepspeed}"


@pytest.mark.parametrize("path", DAG_RECIPES, ids=lambda p: p.name)
def test_every_dvc_stage_parameter_resolves_in_a_dag_recipe(path):
    # DVC refuses to run a stage whose recipe lacks one of its params (a full
    # fine-tune says `lora: null`); each key must be present, even if null.
    raw = yaml.safe_load(path.read_text())
    missing = []
    for key in sorted(dvc_recipe_params()):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"{path.name} lacks dvc.yaml params {missing}"


def test_jamba_recipes_describe_the_run_at_real_scale():
    for name in ("jamba-mini-lora.yaml", "jamba-mini-full.yaml"):
        text = (ROOT / "recipes" / name).read_text()
        recipe = load_recipe(ROOT / "recipes" / name)
        assert "vllm serve" in text and "--tensor-parallel-size" in text and "--data-parallel-size" in text
        assert recipe.teacher.engine == "openai" and recipe.teacher.concurrency >= 128
        generate = recipe.raw["generate"]
        assert all(generate[p]["count"] >= 1000 for p in generate)
        for pipeline in ("doc_qa", "needle"):
            assert max(generate[pipeline]["length_buckets"]) == 262144
        assert recipe.sft["packing"] and recipe.sft["max_length"] >= 8192
        assert max(recipe.eval.length_buckets) == 262144
        assert recipe.raw["eval"]["ifeval"]["count"] == 541
        assert recipe.plan.train_tokens_per_s_per_gpu and "plan:" in text
