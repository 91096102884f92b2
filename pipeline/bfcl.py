"""BFCL's function-calling data (PyPI `bfcl-eval`, read as data, never imported) and
the held-out slice: shared by tool_use generation (which never samples it), dedup
(which decontaminates against it) and the tool-use eval (which scores on it), plus
the one way both show a BFCL function to a model (`openai_tool`).
"""

from __future__ import annotations

import functools
import importlib.util
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
    """The recipe's held-out share of BFCL items (the slice generation never samples)."""
    raw = recipe.raw if recipe is not None else {}
    return float(((raw.get("generate") or {}).get("tool_use") or {}).get("heldout_fraction", HELDOUT_FRACTION))


def is_heldout(item_id: str, fraction: float) -> bool:
    return int(stable_hash("bfcl-heldout", item_id, length=8), 16) % 10_000 < fraction * 10_000


def heldout_questions(fraction: float) -> list[str]:
    """User turns of the held-out BFCL items (the decontamination reference)."""
    out = []
    for category in (*CATALOGUE_FILES, *IRRELEVANCE_FILES):
        for item in bfcl_items(category):
            if is_heldout(item["id"], fraction):
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


def _json_schema(spec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in ("type", "properties", "items")}
    if spec.get("type") not in (None, "any"):
        out["type"] = TYPE_MAP.get(spec["type"], spec["type"])
    if "properties" in spec:
        out["properties"] = {k: _json_schema(v) for k, v in spec["properties"].items()}
    if isinstance(spec.get("items"), dict):
        out["items"] = _json_schema(spec["items"])
    return out
