"""Chat templates for training: which template a student trains in, and which tokens of
a rendered conversation carry the loss.

A student trains in its own chat format, the chat template of its tokenizer: an
instruct model (AI21-Jamba-Mini-1.6, Qwen3, ...) has special tokens and a tool-call
format of its own, and fine-tuning it in another format works against its instruction
tuning. The project's ChatML template (CHATML_TOOLS_TEMPLATE: `<|im_start|>` /
`<|im_end|>`, tools in a `<tools>` system block, calls as
`<tool_call>{json}</tool_call>`) is used only where the student has no format of its
own: a tokenizer without a chat template (a base model), or a student built from
config (`model.tiny`), whose borrowed tokenizer's template is another model's. Then the
two markers are added as special tokens where the vocabulary lacks them, so each is one
token. `model.chat_template` chooses explicitly: "chatml", "tokenizer" (the tokenizer's
own, also for model.tiny) or a Jinja file.

The template is never rewritten for training. The loss mask comes from its own render:
an assistant turn starts where the render of the conversation before it, with the
generation prompt, ends (that prefix must be a prefix of the whole render), and ends
after the template's end-of-turn marker (found by rendering a probe turn). So the model
learns exactly what it is asked to produce after the generation prompt at inference,
including the marker that stops it. A record the template cannot render faithfully
(it drops the tools, tool calls or tool results, or refuses the roles) is a bad record
(`data.on_bad_record`), never silently trained without them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CHATML_TOOLS_TEMPLATE = r"""
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if sys -%}{{- sys + '\n\n' -}}{%- endif -%}
  {{- 'You can call functions. Their signatures:\n<tools>\n' -}}
  {%- for tool in tools -%}
    {{- (tool.function if tool.function is defined else tool) | tojson -}}{{- '\n' -}}
  {%- endfor -%}
  {{- '</tools>\nFor each call, answer with <tool_call>{"name": ..., "arguments": {...}' + '}</tool_call>.<|im_end|>\n' -}}
{%- elif sys is not none -%}
  {{- '<|im_start|>system\n' + sys + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == 'system' and loop.first -%}
  {%- elif message.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- generation -%}
      {{- message.content if message.content else '' -}}
      {%- for call in (message.tool_calls or []) -%}
        {%- set fn = call.function if call.function is defined else call -%}
        {%- set arguments = fn.arguments if fn.arguments is string else (fn.arguments | tojson) -%}
        {{- '<tool_call>{"name": ' + (fn.name | tojson) + ', "arguments": ' + arguments + '}' + '</tool_call>' -}}
      {%- endfor -%}
      {{- '<|im_end|>' -}}
    {%- endgeneration -%}
    {{- '\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + message.role + '\n' + (message.content if message.content else '') + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

END_OF_TURN = "<|im_end|>"
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
# Calls as ChatML and Qwen2.5/Qwen3 write them, one JSON object per tag (whitespace
# around the object allowed), and as Jamba 1.5/1.6 write them: one JSON list of calls in
# a <tool_calls> tag (vLLM's jamba tool parser reads the same).
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_CALLS_LIST_RE = re.compile(r"<tool_calls>\s*(.*?)\s*</tool_calls>", re.DOTALL)
_PROBE = "\x00ASSISTANT-TURN-PROBE\x00"


class TemplateError(ValueError):
    """A chat template the project cannot train with; the message names its source."""


class BadRecord(ValueError):
    """A record this template cannot render faithfully or mask (see data.on_bad_record)."""


def apply_training_template(tokenizer, choice: str | None = None, built_from_config: bool = False,
                            source: str = "the tokenizer"):
    """Give the tokenizer the template the student trains in (see the module docstring).

    choice: None (the tokenizer's own; ChatML for a student built from config or a
    tokenizer without one), "chatml", "tokenizer", or a path to a Jinja file.
    Returns the tokenizer; `tokenizer.chat_template_source` says where the template
    came from. A template whose assistant turns cannot be located is refused here.
    """
    own = tokenizer.chat_template
    if isinstance(own, dict):  # templates shipped as named variants: the default one trains
        own = own.get("default")
    if choice == "tokenizer" or (choice is None and own and not built_from_config):
        if not own:
            raise TemplateError(f"model.chat_template: tokenizer: {source} has no chat template")
        template, origin = own, f"the chat template of {source}"
    elif choice in (None, "chatml"):
        template, origin = CHATML_TOOLS_TEMPLATE, "the project's ChatML template (pipeline/chat_template.py)"
        # Each marker must be one token; new rows of the embeddings are added by
        # pipeline.student.load_student (resize to len(tokenizer)).
        vocab = tokenizer.get_vocab()
        missing = [m for m in CHATML_MARKERS if m not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                         replace_extra_special_tokens=False)
            # Turns end with <|im_end|>: generation must stop there.
            tokenizer.eos_token = END_OF_TURN
    else:
        path = Path(choice)
        if not path.is_file():
            raise TemplateError(f"model.chat_template: {choice}: no such file (or 'chatml', 'tokenizer')")
        template, origin = path.read_text(encoding="utf-8"), f"the template file {choice}"
    tokenizer.chat_template = template
    tokenizer.chat_template_source = origin
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    turn_end(tokenizer)  # refuse an unmaskable template now, not mid-way through the data
    return tokenizer


def template_source(tokenizer) -> str:
    return getattr(tokenizer, "chat_template_source", "the tokenizer's chat template")


def render(tokenizer, messages, tools=None, **kwargs) -> str:
    return tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False, **kwargs)


def continues_answer(messages) -> bool:
    """A conversation that ends with an assistant turn asks for that turn to be
    continued, not for a new one: the turn is an answer prefix (RULER's "The special
    magic number for ... is", lm-eval's `gen_prefix`) the model's answer follows."""
    return bool(messages) and messages[-1].get("role") == "assistant"


def prompt_text(tokenizer, messages, tools=None, chat_template: str | None = None) -> str:
    """The text a model continues for `messages`: the generation prompt after the last
    turn, or, when the last turn is an answer prefix (continues_answer), that assistant
    turn left open, as lm-eval renders a `gen_prefix` in chat mode
    (`apply_chat_template(..., add_generation_prompt=False, continue_final_message=True)`).
    chat_template None: the tokenizer's own."""
    open_turn = continues_answer(messages)
    return tokenizer.apply_chat_template(
        list(messages), tools=tools or None, chat_template=chat_template, tokenize=False,
        add_generation_prompt=not open_turn, continue_final_message=open_turn,
    )


def turn_end(tokenizer) -> str:
    """The marker the template closes an assistant turn with (`<|im_end|>`,
    `<end_of_turn>`, `<|eot_id|>`, ...): rendered after a probe turn's content."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render(tokenizer, probe)
    except Exception as exc:  # jinja2 errors, raise_exception(), type errors in templates
        raise TemplateError(f"{template_source(tokenizer)} cannot render a user and an "
                            f"assistant turn: {exc}") from None
    if _PROBE not in text:
        raise TemplateError(f"{template_source(tokenizer)} does not render assistant content")
    marker = text[text.rindex(_PROBE) + len(_PROBE):].strip()
    if not marker:
        raise TemplateError(
            f"{template_source(tokenizer)} closes no assistant turn with an end-of-turn marker: "
            "the student could not learn to stop, and the turn's end cannot be located for "
            "the loss mask. Name another template with model.chat_template")
    return marker


def teacher_template(tokenizer, tools=None) -> str | None:
    """The template a teacher's prompt is rendered with: None = the teacher's own, or
    the project's ChatML where it has none, or where tools must be shown and its own
    template drops them (SmolLM2's does): a tool-use prompt without its tools would
    ask for calls the teacher never saw, and ChatML's `<tool_call>` answers are what
    the tool-use pipeline parses."""
    if not tokenizer.chat_template:
        return CHATML_TOOLS_TEMPLATE
    if tools:
        probe = [{"role": "user", "content": "Hi"}]
        if render(tokenizer, probe, tools, add_generation_prompt=True) == render(
                tokenizer, probe, add_generation_prompt=True):
            return CHATML_TOOLS_TEMPLATE
    return None


def _names(message) -> list[str]:
    calls = message.get("tool_calls") or []
    return [(c.get("function") or c)["name"] for c in calls]


def assistant_spans(tokenizer, messages, tools=None, marker: str | None = None):
    """(text, [(start, end)]): the template's own render of the conversation and the
    character span of each assistant turn in it: from the end of the generation prompt
    to the end of the turn's end-of-turn marker. Raises BadRecord, saying why, when the
    template drops or refuses part of the record or the turns cannot be located."""
    marker = marker or turn_end(tokenizer)
    try:
        text = render(tokenizer, messages, tools)
        if tools and render(tokenizer, messages) == text:
            raise BadRecord("the template renders no tool definitions (`tools` would be dropped)")
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "tool" and (message.get("content") or "").strip() not in text:
                raise BadRecord(f"the template drops the tool result in message {i}")
            if message["role"] != "assistant":
                continue
            prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
            if not text.startswith(prompt) or (spans and len(prompt) < spans[-1][1]):
                raise BadRecord(f"message {i}: the conversation before this assistant turn renders "
                                "differently once later turns follow, so the turn cannot be located")
            stop = text.find(marker, len(prompt))
            if stop < 0:
                raise BadRecord(f"message {i}: no end-of-turn marker {marker!r} after the assistant turn")
            span = (len(prompt), stop + len(marker))
            turn = text[span[0]:span[1]]
            content = (message.get("content") or "").strip()
            if content and content not in turn:
                raise BadRecord(f"message {i}: the assistant content is not inside its turn")
            names = _names(message)
            if any(turn.count(n) < names.count(n) for n in names):
                raise BadRecord(f"message {i}: the template drops tool calls "
                                f"({', '.join(names)}): it cannot render tool calls")
            spans.append(span)
    except BadRecord:
        raise
    except Exception as exc:  # the template refused the conversation (roles, types)
        tool_parts = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        why = " (the record has tools, tool calls or tool results)" if tool_parts else ""
        raise BadRecord(f"the template refuses it{why}: {exc}") from None
    return text, spans


def encode_conversation(tokenizer, messages, tools=None, marker: str | None = None) -> dict[str, list[int]]:
    """input_ids of the template's own render (what apply_chat_template(tokenize=True)
    gives) and assistant_masks: 1 on every token that overlaps an assistant turn."""
    text, spans = assistant_spans(tokenizer, messages, tools, marker)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < b and e > a for a, b in spans)) for s, e in encoded["offset_mapping"]]
    return {"input_ids": list(encoded["input_ids"]), "assistant_masks": mask}


def parse_tool_calls(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Extract tool calls from model output: `<tool_call>{json}</tool_call>` blocks
    (ChatML, Qwen2.5/Qwen3) and `<tool_calls>[{json}, ...]</tool_calls>` lists (Jamba).

    Returns (calls, errors): each call as {"name", "arguments": dict}; errors hold the
    raw text of blocks that are not valid calls, so callers can reject with a reason.
    """
    calls, errors = [], []
    blocks = [(b, False) for b in TOOL_CALL_RE.findall(text)]
    blocks += [(b, True) for b in TOOL_CALLS_LIST_RE.findall(text)]
    for block, is_list in blocks:
        try:
            objects = json.loads(block)
            if not is_list:
                objects = [objects]
            elif not isinstance(objects, list):
                raise TypeError("<tool_calls> must hold a JSON list")
            found = []
            for obj in objects:
                name, arguments = obj["name"], obj.get("arguments", {})
                if isinstance(arguments, str):
                    arguments = json.loads(arguments)
                if not isinstance(name, str) or not isinstance(arguments, dict):
                    raise TypeError("name must be a string and arguments an object")
                found.append({"name": name, "arguments": arguments})
            calls += found
        except (ValueError, KeyError, TypeError, AttributeError):
            errors.append(block)
    return calls, errors
