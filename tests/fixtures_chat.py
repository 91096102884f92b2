"""Small chat data sets and recipes for tests that train or export the tiny student.

`chat_records()` gives a few dozen deterministic OpenAI-style records (plain turns,
multi-turn, system prompts, tool definitions with tool calls and tool results), built
with pipeline.contract.make_record, as the file holds them. `write_chat_data(folder)` writes train/eval JSONL;
`write_tiny_recipe(folder, ...)` writes a recipe that trains the tiny hybrid on them
in seconds. Import from tests: `from fixtures_chat import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.contract import make_record
from pipeline.records import write_jsonl

CITIES = [
    ("France", "Paris", 18), ("Japan", "Tokyo", 22), ("Italy", "Rome", 25),
    ("Kenya", "Nairobi", 24), ("Peru", "Lima", 19), ("Norway", "Oslo", 7),
    ("Egypt", "Cairo", 31), ("Chile", "Santiago", 16),
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current temperature of a city in Celsius.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def chat_records(n: int = 32) -> list[dict[str, Any]]:
    """`n` deterministic records cycling through four shapes; every third has tools."""
    records = []
    for i in range(n):
        country, city, temp = CITIES[i % len(CITIES)]
        a, b = 3 + i, 7 + 2 * i
        shape = i % 4
        if shape == 0:
            messages = [
                {"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "content": f"The capital of {country} is {city}."},
            ]
            tools = None
        elif shape == 1:
            messages = [
                {"role": "system", "content": "Answer with one short sentence."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            tools = None
        elif shape == 2:
            call = {"type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": city})}}
            messages = [
                {"role": "user", "content": f"How warm is it in {city} now?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": json.dumps({"city": city, "celsius": temp})},
                {"role": "assistant", "content": f"It is {temp} degrees Celsius in {city}."},
            ]
            tools = [WEATHER_TOOL]
        else:
            messages = [
                {"role": "user", "content": f"Name the capital of {country}."},
                {"role": "assistant", "content": f"{city}."},
                {"role": "user", "content": f"And what is {a} times 2?"},
                {"role": "assistant", "content": f"{a} times 2 is {2 * a}."},
            ]
            tools = None
        # Written by code, so the one check is that code's: it always passes.
        meta = {"index": i, "validators": {"by_code": {"passed": True, "score": None, "reason": None}}}
        records.append(make_record("fixture", messages, meta=meta, tools=tools).dump())
    return records


def write_chat_data(folder: str | Path, n_train: int = 32, n_eval: int = 8) -> tuple[Path, Path]:
    folder = Path(folder)
    records = chat_records(n_train + n_eval)
    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    write_jsonl(train, records[:n_train])
    write_jsonl(evals, records[n_train:])
    return train, evals


# Smaller than TINY_JAMBA's defaults where it does not change the layer pattern
# [m m A m m m A m] (attention at 2 and 6, MoE on odd layers): fast on 2 cores.
TEST_TINY = {"hidden_size": 64, "intermediate_size": 128, "mamba_dt_rank": 4}


def tiny_recipe(
    data_dir: str | Path,
    output_dir: str | Path,
    lora: dict[str, Any] | None = None,
    sft: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A recipe dict training the tiny hybrid on write_chat_data's files."""
    data_dir = Path(data_dir)
    recipe: dict[str, Any] = {
        "model": {"tiny": dict(TEST_TINY), "tokenizer": "teacher", "seed": 0},
        "data": {"train": [str(data_dir / "train.jsonl")]},
        "sft": {
            "output_dir": str(output_dir),
            "max_steps": 20,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "constant",
            "max_length": 256,
            "logging_steps": 1,
            "bf16": False,
            "save_strategy": "no",
            "dataloader_num_workers": 0,
            **(sft or {}),
        },
        "activation_loss": {"alpha": 0.0},
        **sections,
    }
    if lora is not None:
        recipe["lora"] = lora
    return recipe


def write_recipe(path: str | Path, recipe: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
