"""LoRA on hybrids: each target group adapts exactly the modules the model has, a group
the model lacks is refused, and a module that gets no gradient stops training."""

import pytest
import torch

from fixtures_chat import TEST_TINY
from pipeline.recipe import ModelSection, RecipeError
from sft.lora import GradientCoverageCallback, adapted_modules, build_lora_config, measure_coverage


@pytest.fixture(scope="module")
def tiny():
    from pipeline.student import load_student, load_tokenizer

    section = ModelSection(tiny=TEST_TINY, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    return lambda: load_student(section, tokenizer)


def wrap(model, **fields):
    from peft import get_peft_model

    config, coverage = build_lora_config({"r": 4, "lora_alpha": 8, **fields}, model)
    peft_model = get_peft_model(model, config)
    measure_coverage(peft_model, coverage)
    return peft_model, coverage


# The tiny hybrid's layers: [m m A m m m A m], MoE on odd layers, dense MLP on even.
EXPECTED = {
    "attention": {f"model.layers.{i}.self_attn.{p}" for i in (2, 6)
                  for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "mamba": {f"model.layers.{i}.mamba.{p}" for i in (0, 1, 3, 4, 5, 7)
              for p in ("in_proj", "x_proj", "out_proj")},
    "mlp": {f"model.layers.{i}.feed_forward.{p}" for i in (0, 2, 4, 6)
            for p in ("gate_proj", "up_proj", "down_proj")},
    "experts": {f"model.layers.{i}.feed_forward.experts.{p}" for i in (1, 3, 5, 7)
                for p in ("gate_up_proj", "down_proj")},
}
LAYERS = {"attention": 2, "mamba": 6, "mlp": 4, "experts": 4}


@pytest.mark.parametrize("group", list(EXPECTED))
def test_each_group_adapts_exactly_the_modules_that_exist(tiny, group):
    model, coverage = wrap(tiny(), target_modules=[group])
    assert set(adapted_modules(model)) == EXPECTED[group]
    info = coverage["groups"][group]
    assert info["layers_covered"] == info["layers_present"] == LAYERS[group]
    assert info["trainable_params"] == coverage["trainable_params"] > 0


def test_groups_combine_with_raw_module_names(tiny):
    model, coverage = wrap(tiny(), target_modules=["attention", "mamba", "mlp", "experts", "lm_head"])
    expected = set().union(*EXPECTED.values()) | {"lm_head"}
    assert set(adapted_modules(model)) == expected
    assert sum(g["trainable_params"] for g in coverage["groups"].values()) == coverage["trainable_params"]
    assert coverage["target_parameters"] == ["feed_forward.experts.gate_up_proj",
                                             "feed_forward.experts.down_proj"]


@pytest.mark.parametrize("group", ["mamba", "experts"])
def test_a_group_the_model_lacks_is_a_clear_error(teacher_dir, group):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(teacher_dir)  # SmolLM2: attention + MLP only
    with pytest.raises(RecipeError, match=rf"lora.target_modules: LlamaForCausalLM has no {group}"):
        build_lora_config({"target_modules": ["attention", group]}, llama)
    config, _ = build_lora_config({"target_modules": ["attention", "mlp"]}, llama)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj"}


def test_unknown_names_and_dropout_on_experts_are_refused(tiny):
    model = tiny()
    with pytest.raises(RecipeError, match="lora.target_modules: 'qkv' is neither a group"):
        build_lora_config({"target_modules": ["qkv"]}, model)
    with pytest.raises(RecipeError, match="lora.lora_dropout"):
        build_lora_config({"target_modules": ["experts"], "lora_dropout": 0.1}, model)


def first_step(model, callback):
    callback.on_train_begin(None, None, None, model=model)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    callback.on_pre_optimizer_step(None, None, None, model=model)


def test_every_adapted_module_gets_a_gradient_in_the_first_step(tiny):
    # The Jamba model card's targets include embed_tokens (an embedding adapter).
    model, coverage = wrap(tiny(), target_modules=["attention", "mamba", "mlp", "experts",
                                                   "embed_tokens"])
    assert coverage["groups"]["embed_tokens"]["adapted"] == 1
    assert coverage["groups"]["embed_tokens"]["trainable_params"] > 0
    first_step(model, GradientCoverageCallback(coverage))
    assert coverage["no_gradient"] == []


def test_a_module_the_forward_bypasses_stops_training(tiny):
    # Jamba's mixer multiplies by dt_proj.weight directly: a LoRA there does nothing.
    model, coverage = wrap(tiny(), target_modules=["attention", "dt_proj"])
    with pytest.raises(RecipeError, match=r"received no gradient.*dt_proj: 6 of 6"):
        first_step(model, GradientCoverageCallback(coverage))
