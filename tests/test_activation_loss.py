"""The activation loss: it brings a planted 1e5 activation under 6,550 in a real SFT run
without costing cross-entropy, counts each site once per step under gradient
checkpointing, captures each routed expert, and costs nothing when alpha = 0."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from activation_loss.sites import Site, SiteRecorder, find_sites
from activation_loss.term import ActivationLoss
from pipeline.recipe import ActivationLossSection, ModelSection, load_recipe
from pipeline.records import write_jsonl

torch.set_num_threads(2)

PLANTED = Site("mamba", 7)  # the last Mamba layer (the paper penalises the last ones)


def conversations(n: int = 24) -> list[dict]:
    return [
        {"messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]}
        for a, b in ((i % 7 + 1, i // 7 + 2) for i in range(n))
    ]


@pytest.fixture(scope="module")
def tiny(teacher_dir):
    from sft.model import load_student, load_tokenizer

    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    return load_student(section, tokenizer), tokenizer


def batch_of(tokenizer, records) -> dict[str, torch.Tensor]:
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def site_peak(model, tokenizer, site: Site) -> float:
    from activation_loss.fp16_audit import measure

    records = conversations()
    batches = [batch_of(tokenizer, records[i:i + 8]) for i in range(0, len(records), 8)]
    peaks, _ = measure(model.eval(), batches, kinds=[site.kind])
    return peaks[site]


@torch.no_grad()
def cross_entropy(model, tokenizer) -> float:
    batch = batch_of(tokenizer, conversations())
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model.eval()(**batch, labels=labels).loss.item()


# ------------------------------------------------------------- a planted outlier
@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory, teacher_dir):
    """A tiny student whose last Mamba mixer outputs > 1e5, trained twice by sft.train
    (same data, seed, steps) with and without the activation loss."""
    from sft.model import load_student, load_tokenizer
    from sft.train import train

    root = tmp_path_factory.mktemp("planted")
    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    model = load_student(section, tokenizer)
    # Scale the weights feeding the site (its output projection) so its max |activation|
    # sits at 2e5: far outside FP16, like the 4e6 maxima the paper reports.
    scale = 2e5 / site_peak(model, tokenizer, PLANTED)
    with torch.no_grad():
        model.model.layers[PLANTED.layer].mamba.out_proj.weight.mul_(scale)
    planted_dir = root / "planted"
    model.save_pretrained(planted_dir)
    tokenizer.save_pretrained(planted_dir)
    write_jsonl(root / "train.jsonl", conversations())

    runs = {"planted": planted_dir, "planted_peak": site_peak(model, tokenizer, PLANTED)}
    for name, alpha in (("with_term", ALPHA), ("without_term", 0.0)):
        recipe_file = root / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(planted_dir), "seed": 0},
            "data": {"train": [str(root / "train.jsonl")]},
            "sft": {"max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": LR,
                    "lr_scheduler_type": "constant", "max_length": 64, "logging_steps": 5,
                    "bf16": False, "use_cpu": True, "save_strategy": "no", "report_to": "none"},
            "activation_loss": {"alpha": alpha, "sites": ["mamba"]},
            "audit": {"num_batches": 2, "batch_size": 4, "data": [str(root / "train.jsonl")]},
        }))
        recipe = load_recipe(recipe_file)
        metrics = train(recipe, root / name)
        runs[name] = {"dir": root / name, "recipe": recipe_file, "metrics": metrics}
    return runs


# The paper's alpha is 1e-5 on a 52B-parameter model whose activations sit in the
# thousands; the tiny student's ordinary activations are ~1e-3..1e-1, so the term only
# matters while the outlier is large and fades once it is gone. 1e-5 with Adam at lr 3e-3
# brings the planted 2e5 under 6,550 within 40 steps of batch 8 here.
ALPHA, STEPS, LR = 1e-5, 40, 3e-3


def trained(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run["dir"] / "final", dtype=torch.float32)


@pytest.mark.slow
def test_activation_loss_brings_a_planted_1e5_activation_under_6550(planted_runs, tiny):
    _, tokenizer = tiny
    assert planted_runs["planted_peak"] > 1e5

    with_term, without_term = trained(planted_runs["with_term"]), trained(planted_runs["without_term"])
    peak_with = site_peak(with_term, tokenizer, PLANTED)
    peak_without = site_peak(without_term, tokenizer, PLANTED)
    ce_with, ce_without = cross_entropy(with_term, tokenizer), cross_entropy(without_term, tokenizer)
    print(f"planted {planted_runs['planted_peak']:.4g}; after training: with term {peak_with:.4g}, "
          f"without {peak_without:.4g}; CE with {ce_with:.4f}, without {ce_without:.4f}, "
          f"ratio {ce_with / ce_without:.4f}")

    assert peak_with < 6550
    assert peak_without > 65504
    assert ce_with <= 1.05 * ce_without

    # The run's reports: term and maxima in the log history and files.
    out = planted_runs["with_term"]["dir"]
    curve = json.loads((out / "loss_curve.json").read_text())
    assert all("activation_loss" in row and "activation_max_mamba" in row for row in curve)
    assert curve[0]["activation_max_mamba"] > 65504 > curve[-1]["activation_max_mamba"]
    stats = json.loads((out / "activation_stats.json").read_text())
    assert set(stats) == {"mamba"} and stats["mamba"][str(PLANTED.layer)] > 1e5  # max seen
    summary = json.loads((out / "train_metrics.json").read_text())["activation_loss"]
    assert summary["alpha"] == ALPHA and summary["last_term"] > 0


# ----------------------------------------------------------------- mechanics
def test_alpha_zero_attaches_nothing(tiny):
    model, _ = tiny
    implementation = model.config._experts_implementation
    penalty = ActivationLoss(model, ActivationLossSection(alpha=0.0, sites=["moe", "experts", "mamba", "layers"]))
    penalty.attach(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.config._experts_implementation == implementation
    model.train()
    model(torch.randint(0, 500, (1, 8)))
    assert penalty.term(0) is None
    penalty.detach()


def test_term_counts_each_site_once_per_step_under_checkpointing_and_has_a_gradient(tiny):
    model, tokenizer = tiny
    batch = batch_of(tokenizer, conversations(2))
    cfg = ActivationLossSection(alpha=1e-2, sites=["moe", "mamba", "layers"])
    penalty = ActivationLoss(model, cfg)
    sites = find_sites(model, cfg.sites)

    # Reference: the same forward without checkpointing.
    model.train()
    penalty.attach(model)
    model(**batch)
    expected = penalty.term(0).item()
    penalty.detach()

    calls = []
    counter = model.model.layers[3].mamba.register_forward_hook(lambda *a: calls.append(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        penalty.attach(model)
        model.zero_grad()
        model(**batch)
        term = penalty.term(1)
        assert penalty.last_site_count == len(sites)
        term.backward()  # the term alone: any gradient below comes from it
        assert len(calls) == 2, "checkpointing should recompute the layer in backward"
        assert penalty.recorder.outputs == {}, "the recompute must not store outputs for the next step"
        assert term.item() == pytest.approx(expected, rel=1e-5)
        grad = model.model.layers[3].mamba.in_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    finally:
        penalty.detach()
        counter.remove()
        model.gradient_checkpointing_disable()
        model.zero_grad()


def test_experts_site_captures_each_routed_expert_with_identical_logits(tiny):
    model, tokenizer = tiny
    model.eval()
    batch = batch_of(tokenizer, conversations(2))
    implementation = model.config._experts_implementation  # grouped_mm here
    with torch.no_grad():
        default = model(**batch).logits
        model.set_experts_implementation("eager")
        eager = model(**batch).logits
        model.set_experts_implementation(implementation)

    recorder = SiteRecorder(["experts"])
    recorder.attach(model)
    try:
        recorder.recording = True
        with torch.no_grad():
            logits = model(**batch).logits
        outputs = recorder.take()
    finally:
        recorder.detach()
    assert model.config._experts_implementation == implementation
    # Bit for bit the eager loop it copies; the default (grouped matmul) only reorders sums.
    assert torch.equal(logits, eager)
    torch.testing.assert_close(logits, default, rtol=0, atol=1e-5)

    # Every (layer, expert) that routing hit, with one row per token routed to it.
    tokens = int(batch["input_ids"].numel())
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.feed_forward, "experts")]
    for layer in moe_layers:
        rows = [outputs[Site("experts", layer, e)].shape[0] for e in range(num_experts)
                if Site("experts", layer, e) in outputs]
        assert sum(rows) == tokens * top_k
        assert all(o.shape[-1] == model.config.hidden_size for s, o in outputs.items() if s.layer == layer)


def test_sites_are_found_through_a_peft_wrapper(tiny):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    plain = [s for s, _ in find_sites(model, ["moe", "experts", "mamba", "layers"], last_n_mamba=2)]
    wrapped = get_peft_model(
        __import__("copy").deepcopy(model),
        LoraConfig(r=4, target_modules=["in_proj", "out_proj"],
                   target_parameters=["feed_forward.experts.gate_up_proj"]),
    )
    found = [s for s, _ in find_sites(wrapped, ["moe", "experts", "mamba", "layers"], last_n_mamba=2)]
    assert found == plain
    assert [s.layer for s in plain if s.kind == "mamba"] == [5, 7]
