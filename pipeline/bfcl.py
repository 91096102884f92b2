"""BFCL's function-calling data (PyPI `bfcl-eval`, read as data, never imported) and
its held-out and dev slices: shared by tool_use generation (which samples neither),
dedup (which decontaminates against both) and the tool-use eval (which gates on the
held-out slice and scores the dev split on the other), plus
the one way both show a BFCL function to a model (`openai_tool`) and BFCL's own
language-specific form of a function doc the eval shows (`language_function_doc`).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from pipeline.records import read_jsonl, stable_hash

# The python-style categories generation samples from, and the irrelevance items
# (right answer: no call).
CATALOGUE_FILES = (
    "simple_python", "multiple", "parallel", "parallel_multiple",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
)
IRRELEVANCE_FILES = ("irrelevance",)
# BFCL's simple category in its other languages: only ever evaluated (their held-out
# slice). Generation's catalogue is built from CATALOGUE_FILES alone, so it never holds
# one of their functions; dedup decontaminates against their held-out questions too.
LANGUAGE_FILES = ("simple_java", "simple_javascript")


def bfcl_data_dir() -> Path:
    # find_spec locates the data without importing bfcl_eval (it pulls heavy deps).
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "tool_use needs the PyPI package bfcl-eval: pip install --no-deps bfcl-eval==2026.3.23"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.cache
def bfcl_items(category: str) -> tuple[dict[str, Any], ...]:
    return tuple(read_jsonl(bfcl_data_dir() / f"BFCL_v4_{category}.json"))


@functools.cache
def bfcl_answers(category: str) -> dict[str, list[dict[str, Any]]]:
    path = bfcl_data_dir() / "possible_answer" / f"BFCL_v4_{category}.json"
    return {row["id"]: row["ground_truth"] for row in read_jsonl(path)} if path.is_file() else {}


# generate.tool_use.heldout_fraction when the recipe leaves it out.
HELDOUT_FRACTION = 0.1


def heldout_fraction(recipe) -> float:
    """The recipe's held-out share of BFCL items (the gated slice; the dev slice is as large)."""
    raw = recipe.raw if recipe is not None else {}
    return float(((raw.get("generate") or {}).get("tool_use") or {}).get("heldout_fraction", HELDOUT_FRACTION))


# Two slices of BFCL, by a stable hash of the item id: the held-out slice (`fraction` of
# the items), which the gate scores, and the dev slice (the next `fraction`), on which
# steps and mixes are chosen. The dev slice is of the same categories as the gated one:
# BFCL's live categories, the dev split before, did not track the gated items (the base
# SmolLM2 separates call from no-call items on them far worse: AUC 0.62 against 0.82 on
# the dev slice and 0.84 on the gated one), so choices made there did not carry over. Generation samples neither slice.
def _slot(item_id: str) -> int:
    return int(stable_hash("bfcl-heldout", item_id, length=8), 16) % 10_000


def is_heldout(item_id: str, fraction: float) -> bool:
    """In the held-out slice: the gated items."""
    return _slot(item_id) < fraction * 10_000


def is_dev(item_id: str, fraction: float) -> bool:
    """In the dev slice: never gated, never sampled by generation."""
    return fraction * 10_000 <= _slot(item_id) < 2 * fraction * 10_000


def is_reserved(item_id: str, fraction: float) -> bool:
    """In either slice: generation never samples the item nor any function it offers."""
    return _slot(item_id) < 2 * fraction * 10_000


def reserved_questions(fraction: float) -> list[str]:
    """User turns of the held-out and dev BFCL items (the decontamination reference)."""
    out = []
    for category in (*CATALOGUE_FILES, *LANGUAGE_FILES, *IRRELEVANCE_FILES):
        for item in bfcl_items(category):
            if is_reserved(item["id"], fraction):
                out += [t["content"] for turn in item["question"] for t in turn if t["role"] == "user"]
    return out


# Generation and the eval show BFCL functions to the model in one way: as OpenAI-style
# tools whose names lose their dots (BFCL's own rule for models that reject dotted names).
def openai_tool(fn: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function as an OpenAI-style tool (JSON-schema types, API-safe name)."""
    return {"type": "function", "function": {
        "name": tool_name(fn["name"]), "description": fn.get("description", ""),
        "parameters": _json_schema(fn.get("parameters", {"type": "dict", "properties": {}})),
    }}


def tool_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array"}


def language(test_category: str) -> str:
    """The language of a BFCL test category, by BFCL's rule (bfcl_eval.utils.is_java/is_js)."""
    if "javascript" in test_category:
        return "javascript"
    return "java" if "java" in test_category else "python"


LANGUAGE_HINTS = {
    "python": " Note that the provided function is in Python 3 syntax.",
    "java": " Note that the provided function is in Java 8 SDK syntax.",
    "javascript": " Note that the provided function is in JavaScript syntax.",
}


def language_function_doc(fn: dict[str, Any], test_category: str) -> dict[str, Any]:
    """A BFCL function doc as BFCL shows it to the model it evaluates
    (bfcl_eval.utils._func_doc_language_specific_pre_processing, Apache-2.0, applied by
    its load_dataset_entry to every category): the description gains the language's
    note; Java and JavaScript parameters become strings ("in string representation",
    the type named in the description, a list's element type and a dict's schema with
    it), which is what BFCL's checker then parses per language. The input is not
    changed. (BFCL's module is not imported: importing it creates folders inside the
    installed package.)"""
    lang = language(test_category)
    fn = copy.deepcopy(fn)
    fn["description"] = fn["description"] + LANGUAGE_HINTS[lang]
    if lang == "python":
        return fn
    name = "Java" if lang == "java" else "JavaScript"
    for value in fn["parameters"]["properties"].values():
        if value["type"] == "any":
            value["description"] += f" This parameter can be of any type of {name} object in string representation."
        else:
            value["description"] += f" This is {name} {value['type']} type parameter in string representation."
        if value["type"] in (("ArrayList", "Array") if lang == "java" else ("array",)):
            value["description"] += (f" The list elements are of type {value['items']['type']};"
                                     " they are not in string representation.")
            del value["items"]
        if lang == "javascript" and value["type"] == "dict" and "properties" in value:
            value["description"] += (" The dictionary entries have the following schema; they are not in string"
                                     f" representation. {json.dumps(value['properties'])}")
            del value["properties"]
        value["type"] = "string"
    return fn


def _json_schema(spec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in ("type", "properties", "items")}
    if spec.get("type") not in (None, "any"):
        out["type"] = TYPE_MAP.get(spec["type"], spec["type"])
    if "properties" in spec:
        out["properties"] = {k: _json_schema(v) for k, v in spec["properties"].items()}
    if isinstance(spec.get("items"), dict):
        out["items"] = _json_schema(spec["items"])
    return out
