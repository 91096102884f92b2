"""The activation loss: it brings a planted 1e5 activation under 6,550 in a real SFT run
without costing cross-entropy, counts each site once per step under gradient
checkpointing, captures each routed expert, and costs nothing when alpha = 0."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from activation_loss.sites import Site, SiteRecorder, find_sites
from activation_loss.term import ActivationLoss
from pipeline.recipe import ActivationLossSection, ModelSection
from planted_outlier import (
    ALPHA, PLANTED, batch_of, conversations, cross_entropy, planted_runs, site_peak, trained,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny(teacher_dir):
    from pipeline.student import load_student, load_tokenizer

    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    return load_student(section, tokenizer), tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    return planted_runs(tmp_path_factory.getbasetemp() / "planted_outlier")


@pytest.mark.slow
def test_activation_loss_brings_a_planted_1e5_activation_under_6550(runs, tiny):
    _, tokenizer = tiny
    assert runs["planted_peak"] > 1e5

    with_term, without_term = trained(runs["with_term"]), trained(runs["without_term"])
    peak_with, peak_without = site_peak(with_term, tokenizer), site_peak(without_term, tokenizer)
    print(f"planted {runs['planted_peak']:.4g}; after training: with term {peak_with:.4g}, "
          f"without {peak_without:.4g}")
    assert peak_with < 6550
    assert peak_without > 65504

    # The run's reports: term and maxima in the log history and files.
    out = runs["with_term"]["dir"]
    curve = json.loads((out / "loss_curve.json").read_text())
    assert all("activation_loss" in row and "activation_max_mamba" in row for row in curve)
    assert curve[0]["activation_max_mamba"] > 65504 > curve[-1]["activation_max_mamba"]
    stats = json.loads((out / "activation_stats.json").read_text())
    assert set(stats) == {"mamba"} and stats["mamba"][str(PLANTED.layer)] > 1e5  # max seen
    summary = json.loads((out / "train_metrics.json").read_text())["activation_loss"]
    assert summary["alpha"] == ALPHA and summary["last_term"] > 0


@pytest.mark.slow
def test_activation_loss_costs_at_most_5_percent_cross_entropy(runs, tiny):
    _, tokenizer = tiny
    ce_with = cross_entropy(trained(runs["with_term"]), tokenizer)
    ce_without = cross_entropy(trained(runs["without_term"]), tokenizer)
    print(f"CE with {ce_with:.4f}, without {ce_without:.4f}, ratio {ce_with / ce_without:.4f}")
    assert ce_with <= 1.05 * ce_without
    # The plant itself changed nothing the model computes: the residual stream is
    # scaled as a whole and read through RMSNorms.
    from transformers import AutoModelForCausalLM

    unplanted, _ = tiny
    planted = AutoModelForCausalLM.from_pretrained(runs["planted"], dtype=torch.float32)
    assert cross_entropy(planted, tokenizer) == pytest.approx(cross_entropy(unplanted, tokenizer), rel=1e-3)


def test_a_no_grad_forward_does_not_replace_the_stored_activations(tiny):
    """TRL recomputes logits in a no-grad forward for its metrics; if that forward
    replaced the stored outputs, the term would be added to the loss with no gradient."""
    model, tokenizer = tiny
    penalty = ActivationLoss(model, ActivationLossSection(alpha=1.0, sites=["moe"]))
    penalty.attach(model)
    try:
        model.train()
        batch = batch_of(tokenizer, conversations(2))
        model(**batch)
        with torch.no_grad():
            model(**batch)
        term = penalty.term(0)
        assert term is not None and term.requires_grad
    finally:
        penalty.detach()
        model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------- mechanics
def test_alpha_zero_attaches_nothing(tiny):
    model, _ = tiny
    implementation = model.config._experts_implementation
    penalty = ActivationLoss(model, ActivationLossSection(alpha=0.0, sites=["moe", "experts", "mamba", "layers"]))

    def hooks():  # the loader's own (packing boundaries) are there before and after
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    before = hooks()
    penalty.attach(model)
    assert hooks() == before
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
        copy.deepcopy(model),
        LoraConfig(r=4, target_modules=["in_proj", "out_proj"],
                   target_parameters=["feed_forward.experts.gate_up_proj"]),
    )
    found = [s for s, _ in find_sites(wrapped, ["moe", "experts", "mamba", "layers"], last_n_mamba=2)]
    assert found == plain
    assert [s.layer for s in plain if s.kind == "mamba"] == [5, 7]


def test_a_term_that_dwarfs_the_loss_under_clipping_is_warned_about_once(caplog):
    from types import SimpleNamespace

    from activation_loss.term import ActivationLossCallback

    class Penalty:
        def log_values(self):
            return {"activation_loss": 400.0}

    state = SimpleNamespace(log_history=[], global_step=5)
    for clip, warnings in ((1.0, 1), (0.0, 0)):
        caplog.clear()
        callback = ActivationLossCallback(Penalty())
        with caplog.at_level("WARNING", logger="activation_loss.term"):
            for _ in range(3):
                callback.on_log(SimpleNamespace(max_grad_norm=clip), state, None, logs={"loss": 410.0})
        assert sum("sft.max_grad_norm" in r.getMessage() for r in caplog.records) == warnings
