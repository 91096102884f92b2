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
