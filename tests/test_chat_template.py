"""The student's ChatML template renders tools and tool calls, and marks exactly the
assistant turns (content, calls and the closing <|im_end|>) for the loss."""

import json

import pytest

from pipeline.chat_template import CHATML_TOOLS_TEMPLATE, parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18C, sunny"},
    {"role": "assistant", "content": "It is 18C and sunny."},
]


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    return tok


def test_tools_and_calls_render_in_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call functions.")
    assert '"name": "get_weather"' in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\n18C, sunny<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\nIt is 18C and sunny.<|im_end|>\n")
    assert text.count("<|im_start|>system") == 1


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
                       "<|im_end|>It is 18C and sunny.<|im_end|>")


def test_parse_tool_calls_separates_valid_and_malformed_blocks():
    text = ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>'
            "<tool_call>{not json}</tool_call><tool_call>" + json.dumps({"arguments": {}}) + "</tool_call>")
    calls, errors = parse_tool_calls(text)
    assert calls == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": 2}}]
    assert len(errors) == 2


def test_masks_from_the_render_equal_the_generation_marker_masks(tokenizer):
    """The mask computed from the template's own render (any template) marks exactly
    the tokens transformers' {% generation %} machinery marks on ChatML."""
    from pipeline.chat_template import encode_conversation

    ours = encode_conversation(tokenizer, CONVERSATION, TOOLS)
    theirs = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["assistant_masks"] == theirs["assistant_masks"]


def test_parse_tool_calls_reads_qwen3_blocks_and_jamba_lists():
    qwen3 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    jamba = '<tool_calls>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_calls>'
    assert parse_tool_calls(qwen3) == ([{"name": "get_weather", "arguments": {"city": "Paris"}}], [])
    assert parse_tool_calls(jamba) == ([{"name": "a", "arguments": {"x": 1}},
                                        {"name": "b", "arguments": {}}], [])
    assert parse_tool_calls('<tool_calls>{"name": "a"}</tool_calls>')[1] == ['{"name": "a"}']


def test_the_teacher_prompts_in_its_own_template_and_in_chatml_only_for_tools_it_would_drop(teacher_dir):
    from transformers import AutoTokenizer

    from pipeline.chat_template import teacher_template

    smollm2 = AutoTokenizer.from_pretrained(teacher_dir)  # its own ChatML renders no tools
    assert teacher_template(smollm2) is None
    assert teacher_template(smollm2, TOOLS) == CHATML_TOOLS_TEMPLATE
    smollm2.chat_template = CHATML_TOOLS_TEMPLATE  # a template that renders tools keeps them
    assert teacher_template(smollm2, TOOLS) is None
