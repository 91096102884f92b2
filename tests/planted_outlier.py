"""A tiny student with a planted activation outlier, trained by sft.train with and
without the activation loss. Shared by test_activation_loss.py and test_fp16_audit.py;
the planting and the two runs happen once per test process."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from activation_loss.sites import Site
from pipeline.recipe import ModelSection, load_recipe
from pipeline.records import write_jsonl

PLANTED = Site("mamba", 7)  # the last Mamba layer (the paper penalises the last ones)

# The planted outlier is the output projection of that mixer scaled by ~1e8: the tiny
# student's mixer outputs are ~2e-3, so that is what it takes to reach 2e5. Adam moves
# each weight by ~lr per step, so the term cannot shrink those huge weights; it shrinks
# the small upstream ones feeding them, whose every step is amplified 1e8 times. A small
# lr keeps that descent from overshooting. alpha is the paper's 1e-5.
ALPHA, STEPS, LR = 1e-5, 40, 3e-4

_RUNS: dict[str, dict] = {}


def conversations(n: int = 24) -> list[dict]:
    return [
        {"messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]}
        for a, b in ((i % 7 + 1, i // 7 + 2) for i in range(n))
    ]


def batch_of(tokenizer, records) -> dict[str, torch.Tensor]:
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def site_peak(model, tokenizer, site: Site = PLANTED) -> float:
    """max |activation| at the site over the fixture conversations (fp32, eval mode)."""
    from activation_loss.fp16_audit import measure

    records = conversations()
    batches = [batch_of(tokenizer, records[i:i + 8]) for i in range(0, len(records), 8)]
    peaks, _ = measure(model.eval(), batches, kinds=[site.kind])
    return peaks[site]


@torch.no_grad()
def cross_entropy(model, tokenizer) -> float:
    """Mean next-token cross-entropy over the fixture conversations (no penalty term)."""
    batch = batch_of(tokenizer, conversations())
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model.eval()(**batch, labels=labels).loss.item()


def trained(run: dict):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run["dir"] / "final", dtype=torch.float32)


def planted_model(root: Path) -> tuple[Path, float]:
    """Save the planted student under root/planted; returns (folder, its peak)."""
    from sft.model import load_student, load_tokenizer

    torch.set_num_threads(2)
    root.mkdir(parents=True, exist_ok=True)
    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    model = load_student(section, tokenizer)
    scale = 2e5 / site_peak(model, tokenizer)
    with torch.no_grad():
        model.model.layers[PLANTED.layer].mamba.out_proj.weight.mul_(scale)
    planted_dir = root / "planted"
    model.save_pretrained(planted_dir)
    tokenizer.save_pretrained(planted_dir)
    write_jsonl(root / "train.jsonl", conversations())
    return planted_dir, site_peak(model, tokenizer)


def planted_runs(root: Path) -> dict:
    """{"planted": folder, "planted_peak": float, "with_term"/"without_term": run}."""
    if _RUNS:
        return _RUNS
    from sft.train import train

    planted_dir, peak = planted_model(root)
    runs = {"planted": planted_dir, "planted_peak": peak}
    for name, alpha in (("with_term", ALPHA), ("without_term", 0.0)):
        recipe_file = root / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(planted_dir), "seed": 0},
            "data": {"train": [str(root / "train.jsonl")]},
            "sft": {"max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": LR,
                    "lr_scheduler_type": "linear", "max_length": 64, "logging_steps": 5,
                    "bf16": False, "use_cpu": True, "save_strategy": "no", "report_to": "none",
                    "disable_tqdm": True},
            "activation_loss": {"alpha": alpha, "sites": ["mamba"]},
            "audit": {"num_batches": 2, "batch_size": 4, "data": [str(root / "train.jsonl")]},
        }))
        recipe = load_recipe(recipe_file)
        metrics = train(recipe, root / name)
        runs[name] = {"dir": root / name, "recipe": recipe_file, "metrics": metrics}
    _RUNS.update(runs)
    return _RUNS
