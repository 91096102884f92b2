"""A wrong key or type fails at once with one error naming the file and every key."""

import pytest

from pipeline.recipe import RecipeError, load_recipe


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_every_problem_is_named_in_one_error(tmp_path):
    path = write(tmp_path, """
model: {tiny: {}, tokenizer: teacher, dtyp: float32}
sft: {learning_rate: fast, max_stepz: 3}
lora: {r: sixteen}
activation_loss: {alpha: 1e-5, sites: [moe, attention]}
bogus: {}
""")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message
    for key in ("model.dtyp", "sft.learning_rate", "sft.max_stepz", "lora.r",
                "activation_loss.sites", "bogus: unknown section"):
        assert key in message, key


def test_values_are_coerced_to_the_library_types(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; TRL would choke on it later.
    path = write(tmp_path, "sft: {learning_rate: 1e-4, max_steps: 7}\nlora: {r: 4, target_modules: [attention]}\n")
    recipe = load_recipe(path)
    assert recipe.sft == {"learning_rate": 1e-4, "max_steps": 7}
    assert recipe.lora["r"] == 4


def test_overrides_set_nested_keys_and_are_validated(tmp_path):
    path = write(tmp_path, "sft: {max_steps: 7}\n")
    recipe = load_recipe(path, ["sft.max_steps=3", "activation_loss.alpha=0.5", "model.tiny.num_experts=2"])
    assert recipe.sft["max_steps"] == 3
    assert recipe.activation_loss.alpha == 0.5
    assert recipe.model.tiny == {"num_experts": 2}
    with pytest.raises(RecipeError, match="activation_loss.alpha"):
        load_recipe(path, ["activation_loss.alpha=lots"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(path, ["sft.max_steps"])


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "sft: [unclosed\n"))


def test_defaults_apply_to_absent_sections(tmp_path):
    recipe = load_recipe(write(tmp_path, "{}\n"))
    assert recipe.activation_loss.alpha == 0.0
    assert recipe.lora is None and recipe.sft == {}
