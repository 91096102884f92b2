"""Tool use: BFCL's held-out slice, scored with BFCL's own AST checker.

Items are the BFCL v4 items that tool_use generation held out (`is_heldout` at the
recipe's `generate.tool_use.heldout_fraction`): generation never samples them nor any
function they use, so the model meets these functions for the first time here. Five
non-live categories, `count` items each: simple (BFCL_v4_simple_python), multiple (one
call, several functions offered), parallel (several calls of one function),
parallel_multiple (several calls across functions) and irrelevance (no function fits).

The model sees the question with the functions as OpenAI-style tools, rendered by the
student's chat template exactly as in training (`pipeline.bfcl.openai_tool`), and
answers with `<tool_call>{json}</tool_call>` blocks. Scoring follows BFCL's own
evaluation of function-calling models (bfcl_eval.eval_checker.eval_runner):

- the answer is decoded into BFCL's form `[{name: {arg: value}}]`; a block that is not
  a valid call makes the whole answer undecodable
- simple, multiple, parallel, parallel_multiple: undecodable = wrong; otherwise BFCL's
  `ast_checker` decides (right function(s), required arguments present, every value
  among the possible answers, strings compared BFCL's way, optional arguments may be
  left out where the possible answers allow "", parallel calls in any order)
- irrelevance: right iff the answer does not decode to at least one call
- a category's score is the percentage of its items that are right; `non_live_ast` is
  BFCL's Non-Live AST summary (unweighted mean of the four call categories) and
  `overall` the unweighted mean of every category scored, irrelevance included
  (BFCL's summaries average categories, not items)
"""

from __future__ import annotations

import functools
import random
import sys
import types
from typing import Any, Literal

from pydantic import Field

from pipeline.bfcl import (
    bfcl_answers,
    bfcl_items,
    heldout_fraction,
    is_heldout,
    openai_tool,
)
from pipeline.chat_template import parse_tool_calls
from pipeline.recipe import Section

NAME = "tool_calls"

# Our category name -> BFCL's data file / test category.
CATEGORIES = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "irrelevance": "irrelevance",
}
AST_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
Category = Literal["simple", "multiple", "parallel", "parallel_multiple", "irrelevance"]

# Our entry in the checker's model table. Tool names lose their dots (openai_tool), so
# the checker compares against expected names with "." replaced by "_", as BFCL does
# for its OpenAI-style function-calling models.
MODEL_NAME = "posttrain-student"


class Config(Section):
    enabled: bool = True
    # Items per category, drawn (seeded) from the held-out slice and capped at its size
    # (at the default heldout_fraction 0.1: simple 43, multiple 10, parallel 21,
    # parallel_multiple 26, irrelevance 25).
    count: int = Field(4, ge=0)
    categories: list[Category] = Field(default_factory=lambda: list(CATEGORIES))
    # Room for up to four calls with their arguments.
    max_tokens: int = Field(192, gt=0)
    seed: int = 0


# ---------------------------------------------------------------------------- items
def build_items(cfg: Config, tokenizer, context: dict) -> list[dict[str, Any]]:
    fraction = heldout_fraction(context.get("recipe"))
    items = []
    for name in cfg.categories:
        category = CATEGORIES[name]
        pool = [it for it in bfcl_items(category) if is_heldout(it["id"], fraction)]
        picks = random.Random(f"{cfg.seed}-{name}").sample(range(len(pool)), min(cfg.count, len(pool)))
        answers = bfcl_answers(category)
        for i in sorted(picks):
            it = pool[i]
            items.append({
                "id": f"bfcl/{it['id']}",
                "category": name,
                "messages": [dict(turn) for turn in it["question"][0]],
                "tools": [openai_tool(fn) for fn in it["function"]],
                "functions": it["function"],  # BFCL's own descriptions, for the checker
                "possible_answer": answers.get(it["id"], []),
            })
    return items


# ---------------------------------------------------------------------------- score
@functools.cache
def _checker():
    """BFCL's `ast_checker` and its Language enum.

    The checker module imports `bfcl_eval.constants.model_config` only to read
    `MODEL_CONFIG_MAPPING[model].underscore_to_dot`, but that module imports every
    provider SDK BFCL supports. A stand-in holding our one entry is put in its place
    for the import and removed afterwards, so the checker loads with the standard
    library alone and nothing else in the process sees the stand-in."""
    name = "bfcl_eval.constants.model_config"
    stand_in = types.ModuleType(name)
    stand_in.MODEL_CONFIG_MAPPING = {MODEL_NAME: types.SimpleNamespace(underscore_to_dot=True)}
    saved = sys.modules.get(name)
    sys.modules[name] = stand_in
    try:
        from bfcl_eval.constants.enums import Language
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved
    return ast_checker, Language


def decode(text: str) -> list[dict[str, dict[str, Any]]] | None:
    """The answer's calls in BFCL's form, or None when a block is not a valid call."""
    calls, errors = parse_tool_calls(text)
    if errors:
        return None
    return [{c["name"]: c["arguments"]} for c in calls]


def check(item: dict[str, Any], text: str) -> tuple[bool, str]:
    """(right, short reason) for one answer under BFCL's rules."""
    decoded = decode(text)
    if item["category"] == "irrelevance":
        if decoded:
            return False, "irrelevance: called " + ", ".join(next(iter(c)) for c in decoded)
        return True, "no call" if decoded is not None else "no call (undecodable block counts as none)"
    if decoded is None:
        return False, "ast_decoder:decoder_failed"
    ast_checker, language = _checker()
    try:
        result = ast_checker(item["functions"], decoded, item["possible_answer"], language.PYTHON,
                             CATEGORIES[item["category"]], MODEL_NAME)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # An answer shape the checker cannot handle is a wrong answer, not a crashed run.
        return False, f"checker_error: {type(exc).__name__}: {exc}"[:200]
    if result["valid"]:
        return True, "ok"
    first = result["error"][0] if result.get("error") else ""
    return False, f"{result.get('error_type', 'invalid')}: {first}"[:200]


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def score(items: list[dict[str, Any]], answers: list[str], cfg: Config) -> dict[str, Any]:
    if len(items) != len(answers):
        raise ValueError(f"tool_calls: {len(items)} items but {len(answers)} answers")
    rows, right = [], {}
    for item, text in zip(items, answers):
        ok, reason = check(item, text)
        right.setdefault(item["category"], []).append(ok)
        rows.append({"id": item["id"], "category": item["category"], "passed": ok,
                     "score": 100.0 if ok else 0.0, "reason": reason})
    per = {name: _mean([100.0 * ok for ok in right[name]]) for name in CATEGORIES if name in right}
    metrics: dict[str, Any] = dict(per)
    ast = [per[name] for name in AST_CATEGORIES if name in per]
    if ast:
        metrics["non_live_ast"] = _mean(ast)
    if per:
        metrics["overall"] = _mean(list(per.values()))
    metrics["counts"] = {name: len(right[name]) for name in per}
    return {"metrics": metrics, "items": rows}
