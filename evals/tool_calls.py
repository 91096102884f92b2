"""Tool use: BFCL's held-out slice, scored with BFCL's own AST checker.

Items are the BFCL v4 items that tool_use generation held out (`is_heldout` at the
recipe's `generate.tool_use.heldout_fraction`): generation never samples them nor any
function they use, so the model meets these functions for the first time here. Five
non-live categories, `count` items each: simple, multiple (one call, several functions
offered), parallel (several calls of one function), parallel_multiple (several calls
across functions) and irrelevance (no function fits). Simple is BFCL's three languages,
`count` items of each: simple_python, simple_java and simple_javascript. The dev split
(`--split dev`) draws the same categories from BFCL's dev slice (`is_dev`: as large,
as unseen by generation), which the gate never scores.

The model sees the question with the functions as OpenAI-style tools, rendered by the
student's chat template as in training (`pipeline.bfcl.openai_tool`), each function doc
first given BFCL's language-specific form (`pipeline.bfcl.language_function_doc`: the
language's note in the description; Java and JavaScript parameters as strings), and
answers with `<tool_call>{json}</tool_call>` blocks. Scoring follows BFCL's own
evaluation of function-calling models (bfcl_eval.eval_checker.eval_runner):

- the answer is decoded into BFCL's form `[{name: {arg: value}}]`; a block that is not
  a valid call makes the whole answer undecodable
- simple, multiple, parallel, parallel_multiple: undecodable = wrong; otherwise BFCL's
  `ast_checker` decides (right function(s), required arguments present, every value
  among the possible answers, strings compared BFCL's way, optional arguments may be
  left out where the possible answers allow "", parallel calls in any order)
- irrelevance: right iff the answer does not decode to at least one call
- the checker gets the item's language (Java and JavaScript values are parsed from
  their string form by BFCL's type converters) and BFCL's own function docs
- a category's score is the percentage of its items that are right; `simple` is BFCL's
  Non-Live Simple AST, the unweighted mean of `simple_python`, `simple_java` and
  `simple_javascript` (each reported too); `non_live_ast` is BFCL's Non-Live AST
  summary (unweighted mean of the four call categories) and `overall` the unweighted
  mean of every category scored, irrelevance included (BFCL's summaries average
  categories, not items)
- rows: `id`, `category`, `language` (simple only), `score` (0 or 100), `passed`;
  `stderr` holds lm-eval's standard error of each mean (evals/standard_error.py)
"""

from __future__ import annotations

import functools
import random
import sys
import types
from typing import Any, Literal

from pydantic import Field

from evals import standard_error
from pipeline.bfcl import (
    bfcl_answers,
    bfcl_items,
    heldout_fraction,
    is_dev,
    is_heldout,
    language,
    language_function_doc,
    openai_tool,
)
from pipeline.chat_template import parse_tool_calls
from pipeline.recipe import Section

NAME = "tool_calls"

# Our category name -> BFCL's data files / test categories.
CATEGORIES = {
    "simple": ("simple_python", "simple_java", "simple_javascript"),
    "multiple": ("multiple",),
    "parallel": ("parallel",),
    "parallel_multiple": ("parallel_multiple",),
    "irrelevance": ("irrelevance",),
}
AST_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
Category = Literal["simple", "multiple", "parallel", "parallel_multiple", "irrelevance"]

# Our entry in the checker's model table. Tool names lose their dots (openai_tool), so
# the checker compares against expected names with "." replaced by "_", as BFCL does
# for its OpenAI-style function-calling models.
MODEL_NAME = "posttrain-student"


class Config(Section):
    enabled: bool = True
    # Items per category (simple: per language), drawn (seeded) from the held-out slice
    # and capped at its size (at the default heldout_fraction 0.1: simple python 43,
    # java 10, javascript 7; multiple 10, parallel 21, parallel_multiple 26,
    # irrelevance 25; the dev slice: 36, 9, 7; 18, 28, 26, 24).
    count: int = Field(4, ge=0)
    categories: list[Category] = Field(default_factory=lambda: list(CATEGORIES))
    # Room for up to four calls with their arguments.
    max_tokens: int = Field(192, gt=0)
    seed: int = 0


# ---------------------------------------------------------------------------- items
def build_items(cfg: Config, tokenizer, context: dict) -> list[dict[str, Any]]:
    fraction = heldout_fraction(context.get("recipe"))
    in_split = is_dev if context.get("split", "test") == "dev" else is_heldout
    items = []
    for name in cfg.categories:
        for category in CATEGORIES[name]:
            pool = [it for it in bfcl_items(category) if in_split(it["id"], fraction)]
            # simple_python keeps the draw it had when it was all of simple
            draw = "simple" if category == "simple_python" else category
            picks = random.Random(f"{cfg.seed}-{draw}").sample(range(len(pool)), min(cfg.count, len(pool)))
            answers = bfcl_answers(category)
            for i in sorted(picks):
                it = pool[i]
                items.append({
                    "id": f"bfcl/{it['id']}",
                    "category": name,
                    **({"language": language(category)} if name == "simple" else {}),
                    "test_category": category,
                    "messages": [dict(turn) for turn in it["question"][0]],
                    "tools": [openai_tool(language_function_doc(fn, category)) for fn in it["function"]],
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
    ast_checker, languages = _checker()
    lang = {"python": languages.PYTHON, "java": languages.JAVA, "javascript": languages.JAVASCRIPT}
    try:
        result = ast_checker(item["functions"], decoded, item["possible_answer"],
                             lang[language(item["test_category"])], item["test_category"], MODEL_NAME)
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
    rows, right = [], {}  # right: BFCL test category -> [0/100 per item]
    for item, text in zip(items, answers):
        ok, reason = check(item, text)
        right.setdefault(item["test_category"], []).append(100.0 if ok else 0.0)
        row = {"id": item["id"], "category": item["category"]}
        if "language" in item:
            row["language"] = item["language"]
        rows.append({**row, "passed": ok, "score": 100.0 if ok else 0.0, "reason": reason})
    # Each BFCL test category is a mean over its items; a category of several (simple)
    # is the unweighted mean of its languages, as are BFCL's summaries of categories.
    cell = {c: _mean(v) for c, v in right.items()}
    cell_err = {c: standard_error.of_mean(v) for c, v in right.items()}
    per, per_err, languages = {}, {}, {}
    for name, files in CATEGORIES.items():
        scored = [c for c in files if c in cell]
        if scored:
            per[name] = _mean([cell[c] for c in scored])
            per_err[name] = cell_err[scored[0]] if len(files) == 1 else standard_error.of_mean_of_means(
                [cell_err[c] for c in scored])
            if len(files) > 1:
                languages.update({c: cell[c] for c in scored})
                per_err.update({c: cell_err[c] for c in scored})
    metrics: dict[str, Any] = {**per, **languages}
    stderr: dict[str, Any] = dict(per_err)
    ast = [name for name in AST_CATEGORIES if name in per]
    if ast:
        metrics["non_live_ast"] = _mean([per[name] for name in ast])
        stderr["non_live_ast"] = standard_error.of_mean_of_means([per_err[name] for name in ast])
    if per:
        metrics["overall"] = _mean(list(per.values()))
        stderr["overall"] = standard_error.of_mean_of_means(list(per_err.values()))
    metrics["counts"] = {name: sum(len(right[c]) for c in CATEGORIES[name] if c in right)
                         for name in per} | {
        c: len(right[c]) for c in languages}
    metrics["stderr"] = stderr
    return {"metrics": metrics, "items": rows}
