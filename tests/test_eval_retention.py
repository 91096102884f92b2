"""Long-context retention (RULER): items fit their length bucket in the student's
rendered tokens, carry their references, repeat with their seed and never share a key,
value or passage with the needle pipeline's training records; the scorer is lm-eval's
string_match_all in percent, and the effective length follows RULER."""

import random
from types import SimpleNamespace

import pytest

from evals import retention as rt
from pipeline.recipe import ModelSection
from pipeline.records import iter_jsonl
from pipeline.student import load_tokenizer
from synth_data import four_steps
from synth_data import needle as nd

# needle.generate makes no teacher call; four_steps.run only reads the engine's name.
NO_TEACHER = SimpleNamespace(name="none", model="none")
# vt, cwe and fwe build quickly; the NIAH generator's import alone takes tens of seconds.
QUICK = ["vt", "cwe", "fwe"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSection(tokenizer="teacher"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The needle pipeline's real outputs, laid out as the DAG lays them out."""
    root = tmp_path_factory.mktemp("data")
    stats = four_steps.run(nd, nd.Config(count=6, length_buckets=[512, 1024]), NO_TEACHER, root / "synth" / "needle")
    assert stats["accepted"] > 0
    return root


@pytest.fixture(scope="module")
def quick_items(tokenizer, data_root):
    context = {"length_buckets": [1024, 2048], "data_root": data_root, "retention_threshold": 85.6}
    return rt.build_items(rt.Config(tasks=QUICK, count=2), tokenizer, context)


def rendered_tokens(tokenizer, item):
    text = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fake_item(references, task="niah_single_1", length=1024):
    return {"id": "x", "task": task, "length": length, "references": references, "retention_threshold": 85.6}


# ----------------------------------------------------------------------------- scorer
@pytest.mark.parametrize("answer, references, expected", [
    ("The special magic number for fluffy-cat is: 4821937.", ["4821937"], 100.0),
    ("  Numbers: 1111111, 2222222\n3333333 and 4444444", ["1111111", "2222222", "3333333", "4444444"], 100.0),
    ("they are: ABCDE, fghij, KLMNO", ["ABCDE", "FGHIJ", "KLMNO"], 100.0),  # case-insensitive
    ("1111111 and 3333333", ["1111111", "2222222", "3333333", "4444444"], 50.0),
    ("The number is 4821936.", ["4821937"], 0.0),
    ("", ["4821937"], 0.0),
    ("I cannot find it.", ["apple", "pear"], 0.0),
])
def test_scorer_counts_the_fraction_of_references_found(answer, references, expected):
    result = rt.score([fake_item(references)], [answer], rt.Config())
    assert result["items"][0]["score"] == expected
    assert result["items"][0]["passed"] is (expected == 100.0)
    assert result["metrics"]["niah_single_1"] == {"1024": expected}


def test_score_agrees_with_lm_eval_scorer(quick_items):
    from lm_eval.tasks.ruler import common_utils

    rng = random.Random(0)
    answers = []
    for item in quick_items:  # all, some or none of the references, with noise around
        refs = item["references"]
        answers.append(" ".join(rng.sample(refs, rng.randint(0, len(refs))) + ["\x07 filler"]).upper())
    ours = rt.score(quick_items, answers, rt.Config())["metrics"]
    for task in QUICK:
        for length in (1024, 2048):
            per_doc = [
                common_utils.process_results({"max_length": length, "outputs": item["references"]}, [answer])[str(length)]
                for item, answer in zip(quick_items, answers)
                if item["task"] == task and item["length"] == length
            ]
            assert ours[task][str(length)] == pytest.approx(100 * common_utils.aggregate_metrics(per_doc), abs=0.01)
    assert 0 < ours["average"]["1024"] < 100  # the mixed answers are neither all right nor all wrong


def test_effective_length_is_the_longest_passing_length_from_the_shortest_up():
    assert rt.effective_length({1024: 95.0, 2048: 85.6, 4096: 70.0}, 85.6) == 2048
    assert rt.effective_length({1024: 80.0, 2048: 90.0}, 85.6) == 0  # the shortest fails
    assert rt.effective_length({1024: 90.0, 2048: 50.0, 4096: 90.0}, 85.6) == 1024
    items = [fake_item(["7"], length=n) | {"retention_threshold": 50.0} for n in (1024, 2048)]
    metrics = rt.score(items, ["7", "no"], rt.Config())["metrics"]
    assert metrics["average"] == {"1024": 100.0, "2048": 0.0}
    assert metrics["effective_length"] == 1024 and metrics["threshold"] == 50.0


# ------------------------------------------------------------------------------ items
def test_items_fit_their_bucket_in_the_student_rendering(tokenizer, quick_items):
    assert {(i["task"], i["length"]) for i in quick_items} == {(t, n) for t in QUICK for n in (1024, 2048)}
    for item in quick_items:
        tokens = rendered_tokens(tokenizer, item)
        assert tokens == item["tokens"]
        assert item["length"] // 2 < tokens + item["max_tokens"] <= item["length"], item["id"]
        assert item["messages"][-1]["role"] == "user"
        prompt = item["messages"][0]["content"]
        assert item["references"] and all(r in prompt for r in item["references"]), item["id"]
    budgets = {i["task"]: i["max_tokens"] for i in quick_items}
    assert budgets == {"vt": 30, "cwe": 120, "fwe": 50}  # lm-eval's generation lengths


def test_same_seed_same_items(tokenizer, quick_items, data_root):
    context = {"length_buckets": [1024, 2048], "data_root": data_root, "retention_threshold": 85.6}
    state = random.getstate()
    again = rt.build_items(rt.Config(tasks=QUICK, count=2), tokenizer, context)
    assert random.getstate() == state  # lm-eval's global draws are put back
    assert again == quick_items
    other = rt.build_items(rt.Config(tasks=["vt"], count=2, seed=1), tokenizer, context)
    assert [i["references"] for i in other] != [i["references"] for i in quick_items if i["task"] == "vt"]


def test_planted_needle_training_strings_fail_loudly(quick_items, data_root):
    needle = rt.needle_strings(data_root)
    records = needle.records
    assert records > 0 and needle.keys and needle.values and needle.passages
    assert all(i["needle_check"] == f"disjoint from {records} needle records" for i in quick_items)
    rt.check_disjoint(quick_items, needle)  # the real items pass

    record = next(iter(iter_jsonl(data_root / rt.NEEDLE_RECORDS[0])))
    planted = record["meta"]["needles"][0]
    passage = record["messages"][0]["content"].split("\n\n")[1]
    for plant, shows in [
        (f"One of the special magic numbers for {planted['key']} is: 1234567.", planted["key"]),
        (f"VAR ABCDE = {planted['value']}", planted["value"]),
        (passage, " ".join(passage.split())[:60]),
    ]:
        items = [dict(i) for i in quick_items]
        content = items[3]["messages"][0]["content"]
        items[3]["messages"] = [{"role": "user", "content": content[:200] + "\n" + plant + "\n" + content[200:]}]
        with pytest.raises(rt.ContaminationError, match=items[3]["id"]) as error:
            rt.check_disjoint(items, needle)
        assert shows in str(error.value)


def test_essay_filler_leaves_out_the_needle_pipelines_passages(data_root):
    needle = rt.needle_strings(data_root)
    full = " ".join(rt.filler_haystack("auto", rt.NeedleStrings(), seed=0))
    kept = " ".join(rt.filler_haystack("auto", needle, seed=0))
    used = [p for p in needle.passages if p in full]
    assert used  # the needle records' haystacks come from the same filler...
    assert not [p for p in used if p in kept]  # ...and none of those passages is kept
    assert len(kept) > 0.9 * len(full)


def test_missing_needle_records_are_noted_not_fatal(tokenizer, tmp_path):
    items = rt.build_items(rt.Config(tasks=["cwe"], count=1), tokenizer, {"length_buckets": [1024], "data_root": tmp_path})
    note = items[0]["needle_check"]
    assert note.startswith("not checked:") and "synth/needle/accepted.jsonl" in note and note.endswith("missing")


def test_lengths_below_rulers_minimum_are_refused(tokenizer):
    with pytest.raises(ValueError, match="at least 1024"):
        rt.build_items(rt.Config(tasks=["vt"]), tokenizer, {"length_buckets": [512, 1024]})


@pytest.mark.slow
def test_default_tasks_at_recipe_lengths(tokenizer, data_root):
    """Every default task, NIAH included (its essay haystack is our filler without the
    needle pipeline's passages), fits 1,024 and 2,048 rendered tokens."""
    cfg = rt.Config(count=1)
    items = rt.build_items(cfg, tokenizer, {"length_buckets": [1024, 2048], "data_root": data_root})
    assert [i["task"] for i in items] == [t for t in cfg.tasks for _ in (1024, 2048)]
    needle = rt.needle_strings(data_root)
    for item in items:
        tokens = rendered_tokens(tokenizer, item)
        assert tokens + item["max_tokens"] <= item["length"], item["id"]
        prompt = item["messages"][0]["content"]
        assert all(r in prompt for r in item["references"]), item["id"]
        assert not needle.found_in(prompt)
    essay = next(i for i in items if i["task"] == "niah_multivalue" and i["length"] == 2048)
    assert len(essay["references"]) == 4 and essay["tokens"] > 1024
