"""Preference training (`posttrain dpo`): on real pairs (the packaged teacher writes
steerability samples on the transformers engine, then the real dedup and prefs
stages), after a short LoRA SFT of a tiny Jamba with a planted activation outlier,
DPO with the activation loss raises the reward margin, logs the term, continues the
SFT adapter with every adapted module trained, and keeps the planted site in FP16's
range. With dpo.enabled false the stage trains nothing and leaves a pointer that
the audit and export stages follow; a wrong `dpo:` key is named."""

from __future__ import annotations

import pytest
import torch
import yaml

from posttrain.cli import main as posttrain
from pipeline.records import read_json, read_jsonl
from planted_outlier import PLANTED, scale_residual_stream, site_peak

FP16_MAX = 65504.0
# Where the plant puts the last Mamba layer: inside FP16's range with little room
# (a step that grows it 3x overflows), and large enough that the term matters.
PLANT_AT = 2e4
GENERATE = {
    "teacher": {"engine": "transformers", "model": "teacher", "threads": 1, "batch_size": 8},
    # One instruction per prompt, of kinds the 135M teacher sometimes follows and room
    # to finish: prompts with a passing and a failing sample (measured: 6 pairs of 8).
    "generate": {"steerability": {"count": 8, "n": 4, "conversations": 0, "max_tokens": 160,
                                  "max_constraints": 1,
                                  "kinds": ["english_only", "exclude_keywords", "max_words", "placeholders"]}},
    "dedup": {},
    "prefs": {"pipelines": ["steerability"]},
}
ACTIVATION_LOSS = {"alpha": 1e-5, "sites": ["mamba"], "last_n_mamba": 1}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["attention", "mamba", "mlp", "experts"]}
DPO = {"enabled": True, "max_steps": 12, "per_device_train_batch_size": 2, "learning_rate": 2e-3,
       "beta": 0.1, "max_length": 256, "logging_steps": 2, "bf16": False, "use_cpu": True,
       "disable_tqdm": True, "max_grad_norm": 0.0, "adam_beta2": 0.95}


def write_recipe(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return path


def planted_student(folder):
    """The tiny student with its residual stream scaled so PLANTED peaks at PLANT_AT."""
    from pipeline.recipe import ModelSection
    from pipeline.student import load_student, load_tokenizer

    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    model = load_student(section, tokenizer)
    scale_residual_stream(model, PLANT_AT / site_peak(model, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def merged_peaks(recipe_path, model_dir, pairs) -> tuple[float, float]:
    """max |activation| at PLANTED, the adapter merged as the audit merges it: over the
    preference pairs (chosen and rejected) and over other text (planted_outlier's)."""
    from activation_loss.fp16_audit import load_model, measure
    from pipeline.recipe import load_recipe

    model, tokenizer, _ = load_model(load_recipe(recipe_path), str(model_dir))
    texts = [tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=False)
             for p in pairs for side in ("chosen", "rejected")]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    peaks, _ = measure(model, [{k: batch[k] for k in ("input_ids", "attention_mask")}], kinds=[PLANTED.kind])
    return peaks[PLANTED], site_peak(model, tokenizer)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, teacher_dir):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("dpo")
    gen = write_recipe(root / "generate.yaml", **{**GENERATE, "teacher": {
        **GENERATE["teacher"], "cache_dir": str(root / "cache")}})
    assert posttrain(["generate", "steerability", str(gen), "--out", str(root / "synth" / "steerability")]) == 0
    assert posttrain(["dedup", str(gen), "--input", str(root / "synth"), "--out", str(root / "dedup")]) == 0
    assert posttrain(["prefs", str(gen), "--synth", str(root / "synth"), "--dedup", str(root / "dedup" / "accepted"),
                      "--out", str(root / "prefs")]) == 0

    student = planted_student(root / "planted")
    common = {"model": {"name_or_path": str(student), "seed": 0}, "lora": LORA,
              "activation_loss": ACTIVATION_LOSS}
    # A short SFT on the steerability records dedup kept: the adapter DPO continues.
    recipe = write_recipe(
        root / "recipe.yaml", **common,
        data={"train": [str(root / "dedup" / "accepted" / "steerability.jsonl")]},
        sft={"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 256,
             "logging_steps": 2, "bf16": False, "use_cpu": True, "disable_tqdm": True},
        dpo=DPO)
    assert posttrain(["train", str(recipe), "--output-dir", str(root / "sft")]) == 0
    assert posttrain(["dpo", str(recipe), "--sft", str(root / "sft" / "final"),
                      "--pairs", str(root / "prefs" / "pairs.jsonl"), "--output-dir", str(root / "dpo")]) == 0
    return root, recipe


@pytest.mark.slow
def test_dpo_raises_the_reward_margin_and_logs_the_activation_loss(dpo_run):
    root, _ = dpo_run
    curve = read_json(root / "dpo" / "dpo_curve.json")
    metrics = read_json(root / "dpo" / "dpo_metrics.json")
    pairs = read_jsonl(root / "prefs" / "pairs.jsonl")
    margins = [r["rewards/margins"] for r in curve]
    print("pairs", len(pairs), "margins", [round(m, 4) for m in margins],
          "accuracies", [r["rewards/accuracies"] for r in curve], "seconds", metrics["train_seconds"])
    assert metrics["pairs"] == len(pairs) > 0 and metrics["global_step"] == DPO["max_steps"]
    assert len(curve) == DPO["max_steps"] // DPO["logging_steps"]
    # The policy starts as the reference (margin 0 at step one; the first row averages
    # steps 1-2). Measured on the 6 pairs of 8 prompts: margins 0.11, -0.13, 0.24, 0.30,
    # 0.16, 0.38 (steps 2-12), accuracy 0.75 at the end; on a single pair the margin
    # climbs to 1.65 in the same 12 steps.
    assert margins[0] < 0.2
    last = margins[len(margins) // 2:]
    assert sum(last) / len(last) > margins[0] + 0.1, margins
    assert curve[-1]["rewards/accuracies"] > 0.5
    assert all(r["activation_loss"] > 0 and "activation_max_mamba" in r for r in curve)
    assert (root / "dpo" / "dpo_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_dpo_continues_the_sft_adapter_with_every_adapted_module_trained(dpo_run):
    from safetensors.torch import load_file

    root, _ = dpo_run
    coverage = read_json(root / "dpo" / "lora_coverage.json")
    assert coverage["no_gradient"] == []
    assert all(g["layers_covered"] == g["layers_present"] for g in coverage["groups"].values())
    final = root / "dpo" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "ref").exists()
    sft = load_file(str(root / "sft" / "final" / "adapter_model.safetensors"))
    dpo = load_file(str(final / "adapter_model.safetensors"))
    assert sft.keys() == dpo.keys()  # the same adapter, moved by DPO
    assert max(float((sft[k] - dpo[k]).abs().max()) for k in sft) > 0


@pytest.mark.slow
def test_dpo_keeps_the_planted_outlier_site_in_fp16_range(dpo_run):
    root, recipe = dpo_run
    pairs = read_jsonl(root / "prefs" / "pairs.jsonl")
    before, before_other = merged_peaks(recipe, root / "sft" / "final", pairs)
    after, after_other = merged_peaks(recipe, root / "dpo" / "final", pairs)
    print(f"planted site {PLANTED}: on the pairs SFT {before:.4g} -> DPO {after:.4g}; "
          f"on other text SFT {before_other:.4g} -> DPO {after_other:.4g}")
    # Measured: on the pairs 1.28e4 -> 4.6e3 (the term acts on what DPO trains on);
    # on other text 1.43e4 -> 1.52e4 (a shift well inside the range).
    assert before > PLANT_AT / 2
    assert after < before / 2
    assert max(after, after_other) < FP16_MAX / 2


@pytest.mark.slow
def test_dpo_skips_and_counts_the_pairs_max_length_cuts(dpo_run, tmp_path):
    """At a max_length some prompts fill alone, those pairs (which TRL would drop
    without a word) are skipped and named; the rest train, their truncation counted.
    Lengths come from the training template's render, not from the stage."""
    from pipeline.recipe import load_recipe
    from pipeline.student import load_tokenizer

    root, recipe = dpo_run
    pairs = read_jsonl(root / "prefs" / "pairs.jsonl")
    tokenizer = load_tokenizer(load_recipe(recipe).model)

    def tokens(pair, turns, **kwargs):
        text = tokenizer.apply_chat_template(turns, tools=pair.get("tools"), tokenize=False, **kwargs)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = {p["id"]: tokens(p, p["prompt"], add_generation_prompt=True) for p in pairs}
    limit = sorted(prompts.values())[len(pairs) // 2]
    answer_cut = {i for i, n in prompts.items() if n >= limit}
    truncated = {p["id"] for p in pairs
                 if max(tokens(p, p["prompt"] + p[k]) for k in ("chosen", "rejected")) > limit}
    assert 0 < len(answer_cut) < len(pairs)  # the test needs both kinds

    out = tmp_path / "dpo"
    assert posttrain(["dpo", str(recipe), "--sft", str(root / "sft" / "final"), "--pairs",
                      str(root / "prefs" / "pairs.jsonl"), "--output-dir", str(out),
                      "--set", f"dpo.max_length={limit}", "--set", "dpo.max_steps=1"]) == 0
    metrics = read_json(out / "dpo_metrics.json")
    cut = metrics["truncation"]
    assert (cut["max_length"], cut["truncated"], cut["answer_cut"]) == (limit, len(truncated), len(answer_cut))
    assert {e["id"] for e in cut["examples"]} == answer_cut and cut["skipped"] == len(answer_cut) <= 5
    assert metrics["pairs"] == len(pairs) - len(answer_cut)


def test_a_wrong_dpo_key_is_named(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model={"tiny": {}, "tokenizer": "teacher"},
                          dpo={"enabled": True, "beta": 0.1, "learning_rat": 1e-4})
    assert posttrain(["dpo", str(recipe), "--sft", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dpo.learning_rat: not a field of" in err and "DPOConfig" in err


def test_dpo_off_writes_a_pointer_that_audit_and_export_follow(tmp_path, teacher_dir):
    from activation_loss.fp16_audit import load_model
    from pipeline.recipe import load_recipe
    from pipeline.student import check_model_folder, resolve_model_folder

    student = planted_student(tmp_path / "sft")
    recipe = write_recipe(tmp_path / "r.yaml", model={"name_or_path": str(student)}, dpo={"enabled": False})
    assert posttrain(["dpo", str(recipe), "--sft", str(student), "--output-dir", str(tmp_path / "dpo")]) == 0
    final = tmp_path / "dpo" / "final"
    pointer = read_json(final / "posttrain_model.json")
    assert pointer["model"] == str(student) and pointer["why"] == "dpo.enabled is false"
    assert read_json(tmp_path / "dpo" / "dpo_metrics.json")["enabled"] is False
    assert check_model_folder(final) == "model" and resolve_model_folder(final) == student
    _, _, source = load_model(load_recipe(recipe), str(final))
    assert source == f"model {student}"


@pytest.mark.slow
def test_dpo_trains_under_deepspeed_zero2_with_2_cpu_processes(dpo_run, tmp_path):
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from pipeline.ports import free_port
    from test_deepspeed import ROOT

    root, recipe = dpo_run
    out = tmp_path / "dpo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "posttrain.cli", "dpo", str(recipe), "--sft", str(root / "sft" / "final"),
           "--pairs", str(root / "prefs" / "pairs.jsonl"), "--output-dir", str(out),
           "--set", f"dpo.deepspeed={ROOT / 'recipes' / 'accelerate' / 'zero2.json'}",
           "--set", "dpo.max_steps=4", "--set", "dpo.per_device_train_batch_size=1"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    curve = read_json(out / "dpo_curve.json")
    metrics = read_json(out / "dpo_metrics.json")
    # Four steps over different pairs on each rank: the margin need not rise yet (the
    # single-process test checks that); what must hold is that both ranks trained the
    # adapter, every adapted module got a gradient, and the adapter moved off SFT's.
    # Two ranks share the pairs: an epoch is ceil(pairs / 2) steps of one pair per rank
    # (one process alone would need `pairs` steps), so 4 steps are 4 / ceil(pairs / 2)
    # epochs.
    assert metrics["epoch"] == pytest.approx(4 / math.ceil(metrics["pairs"] / 2))
    assert [r["step"] for r in curve] == [2, 4]
    assert all(math.isfinite(r["rewards/margins"]) and r["activation_loss"] > 0 for r in curve)
    assert read_json(out / "lora_coverage.json")["no_gradient"] == []
    trained = load_file(out / "final" / "adapter_model.safetensors")
    sft = load_file(root / "sft" / "final" / "adapter_model.safetensors")
    assert set(trained) == set(sft) and any(not torch.equal(trained[k], sft[k]) for k in sft)
