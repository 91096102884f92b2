"""SFT of the tiny hybrid through `posttrain train`: loss goes down (full and LoRA),
only assistant tokens are trained, a run resumes to the state of an uninterrupted one,
no record trains silently cut by max_length, and bad recipes fail at once, naming the
key and the file, writing nothing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fixtures_chat import tiny_recipe, write_chat_data, write_recipe
from posttrain.cli import main as cli
from pipeline.records import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ALL_GROUPS = {"r": 8, "lora_alpha": 16, "target_modules": ["attention", "mamba", "mlp", "experts"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    write_chat_data(folder)
    return folder


def train(tmp_path, data_dir, name, *extra, lora=None, sft=None):
    out = tmp_path / name
    path = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(data_dir, out, lora=lora, sft=sft))
    assert cli(["train", str(path), *extra]) == 0
    return out


def went_down(out, k=5):
    losses = [r["loss"] for r in read_json(out / "loss_curve.json")]
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return first, last


def test_full_fine_tuning_loss_goes_down(tmp_path, data_dir):
    out = train(tmp_path, data_dir, "full")
    first, last = went_down(out)
    assert last < first - 0.3, (first, last)
    assert read_json(out / "train_metrics.json")["mode"] == "full"
    assert (out / "final" / "model.safetensors").is_file()


def test_lora_on_every_group_trains_and_reports_coverage(tmp_path, data_dir):
    out = train(tmp_path, data_dir, "lora", lora=ALL_GROUPS, sft={"learning_rate": 1e-2})
    first, last = went_down(out)
    assert last < first - 0.2, (first, last)
    coverage = read_json(out / "lora_coverage.json")
    for group in ("attention", "mamba", "mlp", "experts"):
        info = coverage["groups"][group]
        assert info["layers_covered"] == info["layers_present"] > 0
        assert info["trainable_params"] > 0
    assert coverage["no_gradient"] == []
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_only_assistant_turns_are_trained(tmp_path, data_dir):
    """Labels are -100 exactly outside the assistant turns of the rendered template;
    every assistant token, its tool calls and its closing <|im_end|> are trained."""
    from trl import SFTTrainer

    from pipeline.recipe import load_recipe
    from pipeline.student import load_student, load_tokenizer
    from sft.train import load_conversations, sft_config, tokenize_conversations
    from sft.trainer import with_activation_loss

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(data_dir, tmp_path / "out"))
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(recipe.model)
    train_set, skipped = tokenize_conversations(
        load_conversations(recipe.data.train)[0], tokenizer, recipe)
    assert skipped == []
    trainer = with_activation_loss(SFTTrainer)(
        model=load_student(recipe.model, tokenizer), args=sft_config(recipe, tmp_path / "out"),
        train_dataset=train_set, processing_class=tokenizer,
    )
    dataset = trainer.train_dataset
    records = read_jsonl(data_dir / "train.jsonl")
    assert len(dataset) == len(records)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    tool_call_trained = 0
    for i, record in enumerate(records):
        text = tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"),
                                             tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = dataset[i]["input_ids"]
        assert encoded["input_ids"] == ids  # the rendered text is what TRL tokenised
        spans = [m.span(1) for m in re.finditer(
            r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.DOTALL)]
        labels = batch["labels"][i].tolist()
        for (start, end), label, token in zip(encoded["offset_mapping"], labels, ids):
            inside = any(a <= start and end <= b for a, b in spans)
            assert (label != -100) == inside, (i, text[start:end], label)
            if inside:
                assert label == token
        assert all(label == -100 for label in labels[len(ids):])  # padding
        trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
        assert trained.count("<|im_end|>") == sum(m["role"] == "assistant" for m in record["messages"])
        tool_call_trained += trained.count("<tool_call>")
    assert tool_call_trained == sum(1 for r in records if r.get("tools"))


def final_weights(out):
    folder = out / "final"
    file = folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").is_file()
                     else "model.safetensors")
    return load_file(str(file))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, data_dir, mode):
    lora = ALL_GROUPS if mode == "lora" else None
    steps = {"per_device_train_batch_size": 2, "max_length": 64, "save_strategy": "steps",
             "save_steps": 3}
    straight = train(tmp_path, data_dir, "straight", lora=lora, sft={**steps, "max_steps": 6})
    # "Interrupted" after step 3 (its checkpoint), then resumed to step 6.
    resumed = train(tmp_path, data_dir, "resumed", lora=lora, sft={**steps, "max_steps": 3})
    assert (resumed / "checkpoint-3").is_dir()
    path = write_recipe(tmp_path / "resume.yaml", tiny_recipe(
        data_dir, resumed, lora=lora, sft={**steps, "max_steps": 6}))
    assert cli(["train", str(path), "--resume"]) == 0
    assert read_json(resumed / "train_metrics.json")["global_step"] == 6
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    loss_a = read_json(straight / "loss_curve.json")[-1]["loss"]
    loss_b = read_json(resumed / "loss_curve.json")[-1]["loss"]
    assert loss_a == pytest.approx(loss_b, abs=1e-4)


BAD = {
    "unknown key": ({"sft": {"learning_rat": 1e-3}}, "sft.learning_rat: not a field"),
    "unknown section key": ({"model": {"tiny": {}, "tokenizer": "teacher", "layers": 4}},
                            "model.layers"),
    "wrong type": ({"sft": {"max_steps": "many"}}, "sft.max_steps"),
    "missing model path": ({"model": {"name_or_path": "/nonexistent/model"}},
                           "model.name_or_path: /nonexistent/model"),
    "missing data": ({"data": {"train": ["/nonexistent/train.jsonl"]}}, "data.train"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_recipe_fails_at_once_naming_key_and_file(tmp_path, data_dir, case):
    change, message = BAD[case]
    out = tmp_path / "out"
    recipe = tiny_recipe(data_dir, out)
    for section, values in change.items():
        recipe[section] = values if section == "model" else {**recipe[section], **values}
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    before = set(tmp_path.iterdir())
    run = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    error = [line for line in run.stderr.splitlines() if "error" in line]
    assert error and str(path) in run.stderr and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert set(tmp_path.iterdir()) == before and not out.exists()


def test_a_record_that_cannot_train_is_named_then_left_out_or_stops_the_run(tmp_path):
    """A record without an answer in data.train: load_conversations names it by file,
    line and id and keeps the rest (data.on_bad_record: skip); with the default
    (error) `posttrain train` stops before any model is built, naming it."""
    from fixtures_chat import chat_records

    from pipeline.records import write_jsonl
    from sft.train import load_conversations

    records = chat_records(3)
    broken = {**records[1], "messages": records[1]["messages"][:1]}  # the user's turn alone
    write_jsonl(tmp_path / "data" / "train.jsonl", [records[0], broken, records[2]])
    good, bad = load_conversations([str(tmp_path / "data" / "train.jsonl")])
    assert [c.id for c in good] == [records[0]["id"], records[2]["id"]]
    assert bad == [(f"{tmp_path / 'data' / 'train.jsonl'}:2: record {broken['id']!r}",
                    "messages: does not end with an assistant turn (nothing to learn)")]
    assert [c.id for c in load_conversations([str(tmp_path / "data" / "train.jsonl")], 1)[0]] == [records[0]["id"]]
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "data", tmp_path / "out"))
    run = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and not (tmp_path / "out").exists(), run.stderr[-2000:]
    assert f"data.train: 1 record(s) cannot train: {tmp_path / 'data' / 'train.jsonl'}:2: record {broken['id']!r}" \
        in run.stderr and "on_bad_record: skip" in run.stderr


# ------------------------------------------------------------------ max_length
TURN_RE = r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)"


def length_and_answer_start(tokenizer, record):
    """(tokens, index of the first answer token) of a record in the training template,
    found from the rendered text's assistant turns, not from the trainer's masks."""
    text = tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=False)
    spans = [m.span(1) for m in re.finditer(TURN_RE, text, re.DOTALL)]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (start, end) in enumerate(encoded["offset_mapping"])
              if any(a <= start and end <= b for a, b in spans)]
    return len(encoded["input_ids"]), inside[0]


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Real needle records (the needle stage's output) at 512 and 1,024 tokens among the
    short chat records, and a max_length that truncates every needle record: the 512
    ones keep part of their answer, the 1,024 ones keep none of it."""
    from stage_outputs import needle_records

    from fixtures_chat import chat_records
    from pipeline.recipe import ModelSection
    from pipeline.records import write_jsonl
    from pipeline.student import load_tokenizer

    folder = tmp_path_factory.mktemp("long")
    short = needle_records(folder / "n512", 3, length_buckets=(512,))
    long = needle_records(folder / "n1024", 2, length_buckets=(1024,), seed=1)
    chat = chat_records(8)
    write_jsonl(folder / "train.jsonl", short + chat + long)
    tokenizer = load_tokenizer(ModelSection(**tiny_recipe(folder, folder / "out")["model"]))
    sizes = {r["id"]: length_and_answer_start(tokenizer, r) for r in short + chat + long}
    limit = max(sizes[r["id"]][1] for r in short) + 1
    truncated = {i for i, (n, _) in sizes.items() if n > limit}
    answer_cut = {i for i, (_, start) in sizes.items() if start >= limit}
    # What the test needs of the data: every needle record cut, the long ones wholly.
    assert truncated == {r["id"] for r in short + long} and answer_cut == {r["id"] for r in long}
    return folder, limit, truncated, answer_cut, len(sizes)


@pytest.mark.slow
def test_records_max_length_cuts_are_counted_and_none_trains_empty(tmp_path, long_data, capsys):
    """Packed, as the default recipe trains (where TRL itself keeps a record cut to no
    answer as an empty sequence): records whose answer lies past max_length are
    skipped and named, truncated ones train on what fits (data.on_truncated: keep),
    or are skipped (skip), or stop the run naming them (error)."""
    folder, limit, truncated, answer_cut, total = long_data
    sft = {"max_length": limit, "max_steps": 2, "packing": True, "per_device_train_batch_size": 1}

    kept = read_json(train(tmp_path, folder, "keep", sft=sft) / "train_metrics.json")
    cut = kept["truncation"]
    assert (cut["max_length"], cut["on_truncated"]) == (limit, "keep")
    assert cut["train"] == {"truncated": len(truncated), "answer_cut": len(answer_cut), "skipped": len(answer_cut)}
    assert {e["id"] for e in cut["examples"]} == answer_cut
    assert all(e["reason"].startswith("answer_cut") for e in cut["examples"])
    assert kept["train_samples"] == total - len(answer_cut)

    skipping = tiny_recipe(folder, tmp_path / "skip", sft=sft)
    skipping["data"]["on_truncated"] = "skip"
    assert cli(["train", str(write_recipe(tmp_path / "skip.yaml", skipping))]) == 0
    skipped = read_json(tmp_path / "skip" / "train_metrics.json")
    assert skipped["truncation"]["train"]["skipped"] == len(truncated)
    assert skipped["train_samples"] == total - len(truncated)

    capsys.readouterr()
    skipping["data"]["on_truncated"] = "error"
    assert cli(["train", str(write_recipe(tmp_path / "error.yaml", skipping))]) == 2
    err = capsys.readouterr().err
    partly = truncated - answer_cut  # answer_cut records are skipped whatever the setting
    assert f"{len(partly)} record(s) longer than max_length {limit}" in err
    assert "data.on_truncated" in err and all(i in err for i in partly)


@pytest.mark.slow
def test_an_eval_split_cut_away_entirely_is_counted_not_a_crash(tmp_path, long_data, capsys):
    """An eval split whose every record max_length cuts to no answer (a reduced DAG's
    one tool-use eval record, say) leaves nothing to evaluate on: without evaluation
    the run trains and counts them; with evaluation it stops with one line."""
    folder, limit, _, answer_cut, _ = long_data
    from pipeline.records import write_jsonl

    write_jsonl(tmp_path / "eval.jsonl", [r for r in read_jsonl(folder / "train.jsonl") if r["id"] in answer_cut])
    sft = {"max_length": limit, "max_steps": 1, "packing": True, "per_device_train_batch_size": 1}
    recipe = tiny_recipe(folder, tmp_path / "out", sft=sft)
    recipe["data"]["eval"] = [str(tmp_path / "eval.jsonl")]
    assert cli(["train", str(write_recipe(tmp_path / "no-eval.yaml", recipe))]) == 0
    cut = read_json(tmp_path / "out" / "train_metrics.json")["truncation"]["eval"]
    assert cut == {"truncated": len(answer_cut), "answer_cut": len(answer_cut), "skipped": len(answer_cut)}

    capsys.readouterr()
    recipe["sft"].update(eval_strategy="steps", eval_steps=1, output_dir=str(tmp_path / "evaluating"))
    assert cli(["train", str(write_recipe(tmp_path / "eval.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert f"data.eval: every record is longer than sft.max_length {limit}" in err and "Traceback" not in err
