"""The Jamba-Mini recipes on a CUDA GPU (skipped without one; CI has none).

The hub is out of reach on the test machines, so the student has Jamba-Mini-1.6's
real layer shapes (hidden 4096, 16 experts of width 14336, Mamba d_inner 8192 with
dt_rank 256, 32 query / 8 KV heads) for one Jamba block of its 32 layers: attention
at layer 4, Mamba elsewhere, MoE on odd layers, random weights. Everything else comes
from recipes/jamba-mini-{lora,full}.yaml unchanged, except what one GPU without
DeepSpeed needs (no ZeRO config), the data (the chat fixtures) and a short schedule
(a few steps of 4 sequences, no warm-up, max_length 1024).

Run on a GPU machine:  pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fixtures_chat import write_chat_data
from pipeline.records import read_json

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[1]

# ai21labs/AI21-Jamba-Mini-1.6 config.json, one block of its 32 layers.
JAMBA_MINI_BLOCK = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
    num_attention_heads=32, num_key_value_heads=8,
    attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
    num_experts=16, num_experts_per_tok=2,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256,
    mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=1e-6, router_aux_loss_coef=1e-3,
)


def gpu_recipe(tmp_path: Path, name: str, steps: int, **tiny) -> Path:
    """recipes/{name}.yaml with the Jamba-Mini block as student, on one GPU."""
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    data = tmp_path / "data"
    write_chat_data(data)
    recipe["model"].pop("name_or_path")
    recipe["model"].update(tiny={**JAMBA_MINI_BLOCK, **tiny}, tokenizer="teacher",
                           mamba_fallback="reference")  # bf16 weights: mambapy refuses them
    recipe["data"] = {"train": [str(data / "train.jsonl")], "eval": [str(data / "eval.jsonl")]}
    sft = recipe["sft"]
    for key in ("deepspeed", "num_train_epochs", "eval_steps", "save_steps", "save_total_limit"):
        sft.pop(key, None)
    sft.update(max_steps=steps, warmup_steps=0, logging_steps=1, eval_strategy="no",
               save_strategy="no", gradient_accumulation_steps=1, per_device_train_batch_size=4,
               max_length=1024, output_dir=str(tmp_path / "out"), disable_tqdm=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(args: list[str]) -> int:
    """Each stage in its own process, as DVC runs them: the GPU starts empty."""
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=ROOT).returncode


def summary(out: Path) -> dict:
    metrics = read_json(out / "train_metrics.json")
    curve = read_json(out / "loss_curve.json")
    print(json.dumps({k: metrics.get(k) for k in (
        "mamba_path", "cuda_peak_memory_gib", "train_runtime", "first_loss", "final_loss",
        "global_step", "activation_loss")}, indent=1))
    print("losses", [round(r["loss"], 3) for r in curve])
    return metrics


def test_jamba_mini_lora_recipe_trains_exports_on_one_gpu(tmp_path):
    recipe = gpu_recipe(tmp_path, "jamba-mini-lora", steps=8)
    out = tmp_path / "out"
    assert cli(["train", str(recipe)]) == 0
    metrics = summary(out)
    assert metrics["global_step"] == 8 and metrics["mode"] == "lora"
    assert metrics["mamba_path"] in ("kernels", "reference")
    losses = [r["loss"] for r in read_json(out / "loss_curve.json")]
    assert all(loss == loss and abs(loss) != float("inf") for loss in losses)

    # Every group of the model card's targets adapts every layer it exists in, and
    # every adapted module got a gradient (checked after the first step).
    coverage = read_json(out / "lora_coverage.json")
    print(json.dumps({g: {k: v for k, v in info.items() if k != "modules"}
                      for g, info in coverage["groups"].items()}))
    expected = {"attention": 1, "mamba": 7, "mlp": 4, "experts": 4}
    for group, layers in expected.items():
        info = coverage["groups"][group]
        assert info["layers_covered"] == info["layers_present"] == layers, group
    assert coverage["no_gradient"] == []

    # The activation loss ran on every MoE and Mamba site under bf16 + checkpointing.
    stats = read_json(out / "activation_stats.json")
    assert len(stats["moe"]) == 4 and len(stats["mamba"]) == 7
    assert metrics["activation_loss"]["last_term"] > 0

    # Export: the adapter and the vLLM profile reload bit for bit; merged within the
    # bf16 merge allowance (2.0 x max |logit|).
    report = tmp_path / "export_report.json"
    assert cli(["export", str(recipe), "--model", str(out / "final"),
                "--out", str(tmp_path / "export"), "--report", str(report)]) == 0
    exported = read_json(report)
    print(json.dumps({p: {k: v for k, v in r.items() if k != "dropped_weights"}
                      for p, r in exported["profiles"].items()}, indent=1))
    print("adapter effect", exported["adapter_effect_max_abs_logit_diff"])
    profiles = exported["profiles"]
    assert all(profiles[p]["passed"] for p in ("adapter", "merged", "vllm")), profiles


def test_jamba_mini_full_recipe_trains_and_audits_on_one_gpu(tmp_path):
    """Full fine-tuning (4 experts per MoE layer so that weights, gradients and Adam
    state of the block fit one 80 GB GPU without ZeRO), then the FP16 audit on CUDA."""
    recipe = gpu_recipe(tmp_path, "jamba-mini-full", steps=6, num_experts=4)
    out = tmp_path / "out"
    assert cli(["train", str(recipe)]) == 0
    metrics = summary(out)
    assert metrics["global_step"] == 6 and metrics["mode"] == "full"
    losses = [r["loss"] for r in read_json(out / "loss_curve.json")]
    assert all(loss == loss and abs(loss) != float("inf") for loss in losses)
    assert losses[-1] < losses[0], losses

    audit = tmp_path / "audit"
    assert cli(["audit", str(recipe), "--model", str(out / "final"), "--out", str(audit)]) == 0
    report = read_json(audit / "fp16_audit.json")
    print(json.dumps({k: report[k] for k in ("fp16_safe", "max_abs", "max_abs_by_kind", "logits")}))
    assert report["logits"]["nonfinite_fp32"] == 0
    assert (audit / "fp16_audit.png").is_file()
