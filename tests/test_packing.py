"""Packed training is exact for Jamba: a row holding several sequences gives each the
logits and gradients it gets alone, on every Mamba path (transformers' reference scan,
mambapy's parallel scan, and the CUDA kernels' input transformation run through the
reference scan on CPU)."""

import math

import pytest
import torch

from pipeline import mamba_packing
from pipeline.student import TINY_JAMBA

# Two rows of 32: odd lengths, a length-1 sequence, and one that fills its row.
ROWS = [[7, 1, 13, 11], [32]]
# AI21-Jamba-Mini-1.6's layout (attention every 8th layer at offset 4, 16 experts top-2
# on odd layers, Mamba d_state 16, d_conv 4, expand 2) at reduced width.
JAMBA_MINI_SHAPED = {
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 2, "attn_layer_period": 8, "attn_layer_offset": 4,
    "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 16, "num_experts_per_tok": 2,
    "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 16,
}
VOCAB = 101


def build(shape: dict, use_mambapy: bool, seed: int = 0):
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(seed)
    config = JambaConfig(vocab_size=VOCAB, pad_token_id=0, use_mambapy=use_mambapy,
                         attn_implementation="sdpa", **{**shape, "max_position_embeddings": 4096})
    model = JambaForCausalLM(config).float()
    with torch.no_grad():
        for layer in model.model.layers:
            mixer = getattr(layer, "mamba", None)
            if mixer is not None:
                # Slow channels (|A| down to 1e-3) and varied steps: a state that is not
                # reset would carry far into the next sequence.
                mixer.A_log.uniform_(math.log(1e-3), math.log(16.0))
                mixer.dt_proj.bias.uniform_(-4.0, 1.0)
    assert mamba_packing.enable_packing(model) == "exact"
    return model.eval()


def packed_batch(rows, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sequences = [[torch.randint(1, VOCAB, (n,), generator=generator) for n in row] for row in rows]
    input_ids = torch.stack([torch.cat(row) for row in sequences])
    position_ids = torch.stack([torch.cat([torch.arange(len(s)) for s in row]) for row in sequences])
    return sequences, input_ids, position_ids


def split_logits(logits, rows):
    out = []
    for b, row in enumerate(rows):
        start = 0
        for n in row:
            out.append(logits[b, start:start + n])
            start += n
    return out


def max_packed_diff(model, rows=ROWS):
    sequences, input_ids, position_ids = packed_batch(rows)
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for row in sequences for s in row]
    return max((p - a).abs().max().item() for p, a in zip(split_logits(packed, rows), alone))


@pytest.fixture
def kernel_stand_ins(monkeypatch):
    """The CUDA path on CPU: stand-ins with the kernels' contracts (causal-conv1d takes
    int32 `seq_idx` with channel-last input; selective_scan_fn wants u, dt, B, C, z in
    one dtype and has no reset flag) wrapped exactly as the kernels are."""
    from transformers.models.jamba import modeling_jamba as mj

    mamba_packing._install_functions()
    reference_scan = mj.mamba_selective_scan._posttrain_original
    calls = {"conv": 0, "scan": 0}

    def causal_conv1d_kernel(x, weight, bias=None, seq_idx=None, activation=None):
        if seq_idx is None:  # one sequence per row
            seq_idx = torch.zeros(x.shape[0], x.shape[2], dtype=torch.int32)
        else:
            assert x.stride(1) == 1, "causal-conv1d's seq_idx needs channel-last input"
            assert seq_idx.dtype == torch.int32 and seq_idx.shape == (x.shape[0], x.shape[2])
            calls["conv"] += 1
        return mamba_packing.masked_causal_conv1d(x, weight, bias, activation, seq_idx.long())

    def selective_scan_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, return_last_state=False, **dropped):
        # transformers drops the keywords a kernel does not take (use_mambapy, ...)
        assert len({u.dtype, delta.dtype, B.dtype, C.dtype, z.dtype}) == 1
        calls["scan"] += 1
        return reference_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, return_last_state=return_last_state,
                              use_mambapy=False)

    monkeypatch.setattr(mj, "causal_conv1d_fn", mamba_packing._make_conv(causal_conv1d_kernel))
    monkeypatch.setattr(mj, "mamba_selective_scan", mamba_packing._make_scan(selective_scan_kernel))
    monkeypatch.setattr(mamba_packing, "_on_kernel", lambda x, package: True)
    return calls


@pytest.mark.parametrize("shape", [TINY_JAMBA, JAMBA_MINI_SHAPED], ids=["tiny", "jamba-mini-shaped"])
@pytest.mark.parametrize("path", ["reference", "mambapy", "kernel"])
def test_packed_forward_equals_one_by_one(shape, path, request):
    calls = request.getfixturevalue("kernel_stand_ins") if path == "kernel" else None
    model = build(shape, use_mambapy=path == "mambapy")
    diff = max_packed_diff(model)
    print(f"{path} {shape['hidden_size']}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-5
    if calls is not None:
        assert calls["conv"] > 0 and calls["scan"] > 0


def test_without_the_boundaries_packing_leaks():
    """The check has teeth: the same packed batch through the plain mixer differs."""
    model = build(TINY_JAMBA, use_mambapy=True)
    for layer in model.model.layers:
        layer._forward_pre_hooks.clear()
    assert max_packed_diff(model) > 1e-3


def packed_and_single_grads(model, rows):
    sequences, input_ids, position_ids = packed_batch(rows)
    labels = input_ids.clone()
    labels[position_ids == 0] = -100  # no target across a boundary, as TRL's collator does
    tokens = sum(len(s) - 1 for row in sequences for s in row)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    packed = grads(shifted / tokens)
    total = 0
    for row in sequences:
        for s in row:
            if len(s) > 1:
                out = model(input_ids=s[None], use_cache=False).logits[0]
                total = total + torch.nn.functional.cross_entropy(out[:-1], s[1:], reduction="sum")
    single = grads(total / tokens)
    return packed, single


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("path", ["reference", "mambapy"])
def test_packed_gradients_equal_one_by_one(path, checkpointing):
    model = build(TINY_JAMBA, use_mambapy=path == "mambapy").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed, single = packed_and_single_grads(model, ROWS)
    assert packed.keys() == single.keys()
    num = math.sqrt(sum((packed[n] - single[n]).square().sum().item() for n in single))
    den = math.sqrt(sum(single[n].square().sum().item() for n in single))
    worst = max(((packed[n] - single[n]).norm() / single[n].norm()).item()
                for n in single if single[n].norm() > 0)
    print(f"{path} checkpointing={checkpointing}: relative error {num / den:.2e}, worst tensor {worst:.2e}")
    assert num / den <= 1e-5


def test_collator_boundaries_agree_with_position_ids():
    """TRL's padding-free collator sends seq_idx and cu_seq_lens with the position ids;
    each source gives the same boundaries."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": list(range(1, n + 1))} for n in (3, 1, 5)])
    by_position = mamba_packing.sequence_index(position_ids=batch["position_ids"])
    assert torch.equal(by_position, mamba_packing.sequence_index(seq_idx=batch["seq_idx"]))
    assert torch.equal(by_position, mamba_packing.sequence_index(cu_seq_lens=batch["cu_seq_lens_q"]))
    assert by_position.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 2]]
    # One sequence per row: nothing to reset, the original functions run.
    assert mamba_packing.sequence_index(position_ids=torch.arange(6)[None].repeat(2, 1)) is None


def test_loaded_student_honours_boundaries_and_generation_is_unchanged():
    """Any trainer benefits: a plain forward with packed position ids on the student
    the project's loader builds is exact; generation with a cache is untouched."""
    from pipeline.recipe import ModelSection
    from pipeline.student import load_student, load_tokenizer

    section = ModelSection(tiny={}, tokenizer="teacher")
    tokenizer = load_tokenizer(section)
    model = load_student(section, tokenizer).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9]
    sequences = [torch.randint(10, 1000, (n,), generator=generator) for n in lengths]
    input_ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in sequences])
        assert (packed - alone).abs().max().item() <= 1e-5

        prompt = sequences[2][None]
        with_wrappers = model.generate(prompt, max_new_tokens=6, do_sample=False)
        from transformers.models.jamba import modeling_jamba as mj

        conv, scan = mj.causal_conv1d_fn, mj.mamba_selective_scan
        try:
            mj.causal_conv1d_fn, mj.mamba_selective_scan = conv._posttrain_original, scan._posttrain_original
            without = model.generate(prompt, max_new_tokens=6, do_sample=False)
        finally:
            mj.causal_conv1d_fn, mj.mamba_selective_scan = conv, scan
    assert torch.equal(with_wrappers, without)


def test_unsupported_transformers_refuses_packed_input(monkeypatch):
    """On a transformers version the wrappers were not checked against, a packed forward
    fails with an error naming the version instead of leaking; unpacked input runs."""
    from transformers import JambaConfig, JambaForCausalLM

    monkeypatch.setattr(mamba_packing, "_transformers_version", lambda: "9.0.0")
    model = JambaForCausalLM(JambaConfig(vocab_size=VOCAB, **TINY_JAMBA)).eval()
    assert mamba_packing.enable_packing(model) == "refused"
    _, input_ids, position_ids = packed_batch([[3, 5]])
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
        with pytest.raises(mamba_packing.PackingUnsupported, match="9.0.0"):
            model(input_ids=input_ids, position_ids=position_ids, use_cache=False)


def test_packing_is_refused_for_mamba_models_it_does_not_handle(tmp_path):
    """Jamba packs; another Mamba-type model still gets one clear error naming why."""
    import yaml
    from transformers import Mamba2Config

    from pipeline.recipe import RecipeError, load_recipe
    from sft.train import check_recipe

    from pipeline.records import write_jsonl
    from stage_outputs import needle_records

    Mamba2Config(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=64).save_pretrained(tmp_path / "m2")
    write_jsonl(tmp_path / "train.jsonl", needle_records(tmp_path / "needle", 1, (512,)))
    for name, model in (("jamba", {"tiny": {}, "tokenizer": "teacher"}),
                        ("mamba2", {"name_or_path": str(tmp_path / "m2")})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": model, "data": {"train": [str(tmp_path / "train.jsonl")]},
                                        "sft": {"packing": True}}))
        if name == "jamba":
            check_recipe(load_recipe(path))
        else:
            with pytest.raises(RecipeError, match="sft.packing: refused: model type 'mamba2'"):
                check_recipe(load_recipe(path))


@pytest.mark.slow
def test_padding_free_sft_matches_padded_sft_step_by_step(tmp_path):
    """The same examples per step, padded vs packed into one row (TRL padding_free), with
    LoRA on every group, assistant-only loss and the activation loss on MoE, expert and
    Mamba outputs: the logged loss agrees step by step, so the token-level mean, the
    assistant mask and the activation term (over real tokens only) are the same."""
    from fixtures_chat import tiny_recipe, write_chat_data, write_recipe

    from posttrain.cli import main as cli
    from pipeline.records import read_json

    write_chat_data(tmp_path)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["attention", "mamba", "mlp", "experts"]}
    curves = {}
    for name, extra in (("padded", {}), ("packed", {"padding_free": True})):
        recipe = tiny_recipe(tmp_path, tmp_path / name, lora=lora,
                             sft={"max_steps": 4, "learning_rate": 1e-2, "max_length": None, **extra},
                             activation_loss={"alpha": 1e-2, "sites": ["moe", "experts", "mamba"]})
        assert cli(["train", str(write_recipe(tmp_path / f"{name}.yaml", recipe))]) == 0
        curves[name] = read_json(tmp_path / name / "loss_curve.json")
        # sft/lora.py's check: every adapted module got a gradient, packed too.
        assert read_json(tmp_path / name / "lora_coverage.json")["no_gradient"] == []
    padded, packed = curves["padded"], curves["packed"]
    assert [r["step"] for r in padded] == [r["step"] for r in packed] == list(range(1, 5))
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["activation_loss"] == pytest.approx(a["activation_loss"], rel=1e-4), (a, b)
