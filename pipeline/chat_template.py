"""The student's chat template: ChatML (the teacher's format, `<|im_start|>` /
`<|im_end|>`), with tools in the system turn, tool calls as `<tool_call>{json}</tool_call>`
and tool results as `tool` turns. Assistant content, tool calls and the closing
`<|im_end|>` sit inside `{% generation %}` markers, which TRL's
`assistant_only_loss=True` needs to mask everything else.
"""

from __future__ import annotations

import json
import re
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
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def apply_training_template(tokenizer) -> Any:
    """Give a ChatML tokenizer the training template (with generation markers)."""
    tokenizer.chat_template = CHATML_TOOLS_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def parse_tool_calls(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Extract `<tool_call>` JSON objects from model output.

    Returns (calls, errors): each call as {"name", "arguments": dict}; errors hold the
    raw text of blocks that are not valid calls, so callers can reject with a reason.
    """
    calls, errors = [], []
    for block in TOOL_CALL_RE.findall(text):
        try:
            obj = json.loads(block)
            name, arguments = obj["name"], obj.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise TypeError("name must be a string and arguments an object")
            calls.append({"name": name, "arguments": arguments})
        except (ValueError, KeyError, TypeError):
            errors.append(block)
    return calls, errors
