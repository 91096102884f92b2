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

# The plant. Each Jamba layer adds its mixer's and its feed-forward's outputs to the
# residual stream, and everything downstream reads that stream through an RMSNorm.
# Scaling only the planted mixer's out_proj makes its output drown the rest of the
# stream: the model becomes that one mixer, and its loss then moves for reasons of its
# own (measured: CE 1.12x with vs without the term, whatever the training settings).
# So the whole stream is scaled by one factor s: the embedding and every writer (Mamba
# out_proj, attention o_proj, MLP and expert down_proj). The RMSNorms make the model
# compute the same function (same CE), while every write into the stream, the planted
# site's included, is s times larger: the "massive activations" the paper removes.
# s takes the planted site to 2e5. Only that site is penalised (last_n_mamba: 1).
#
# Training: alpha is the paper's 1e-5. Two settings matter for a model that starts 30x
# past the target: at 2e5 the term (~4e3 at step 5) dwarfs the CE (~10), so global-norm
# clipping (TRL's default max_grad_norm 1.0) shrinks the CE's share of every
# parameter's gradient by the same large factor while the term is big, and Adam's
# beta2 = 0.999 keeps the early spikes in its second moment long after. Measured CE
# with / without the term: 1.14x after 80 steps with clipping; without clipping and
# with beta2 = 0.95 (a common LLM setting) 1.044x after 80 steps, 1.030x after 120.
ALPHA, STEPS, LR = 1e-5, 120, 3e-4
SCALE_TO = 2e5

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


@torch.no_grad()
def scale_residual_stream(model, scale: float) -> None:
    """Multiply the embedding and every write into the residual stream by `scale`."""
    model.model.embed_tokens.weight.mul_(scale)
    for layer in model.model.layers:
        mixer = layer.mamba.out_proj.weight if hasattr(layer, "mamba") else layer.self_attn.o_proj.weight
        mixer.mul_(scale)
        ff = layer.feed_forward
        (ff.experts.down_proj if hasattr(ff, "experts") else ff.down_proj.weight).mul_(scale)


def planted_model(root: Path) -> tuple[Path, float]:
    """Save the planted student under root/planted; returns (folder, its peak)."""
    from pipeline.student import load_student, load_tokenizer

    torch.set_num_threads(2)
    root.mkdir(parents=True, exist_ok=True)
    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    model = load_student(section, tokenizer)
    scale_residual_stream(model, SCALE_TO / site_peak(model, tokenizer))
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
                    "disable_tqdm": True, "max_grad_norm": 0.0, "adam_beta2": 0.95},
            "activation_loss": {"alpha": alpha, "sites": ["mamba"], "last_n_mamba": 1},
            "audit": {"num_batches": 2, "batch_size": 4, "data": [str(root / "train.jsonl")]},
        }))
        recipe = load_recipe(recipe_file)
        metrics = train(recipe, root / name)
        runs[name] = {"dir": root / name, "recipe": recipe_file, "metrics": metrics}
    _RUNS.update(runs)
    return _RUNS
