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


def lm_eval_chat_prompt(tokenizer, item):
    """The prompt lm-eval's chat mode builds for a RULER doc, by lm-eval's own code: the
    doc's input as the user turn and its gen_prefix as an assistant turn
    (ConfigurableTask.build_qa_turn, multiturn_to_singleturn), rendered by HFLM's
    apply_chat_template with add_generation_prompt=False (api/task.py fewshot_context)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.api.utils import multiturn_to_singleturn
    from lm_eval.models.huggingface import HFLM

    turns = ConfigurableTask.build_qa_turn(None, q=item["messages"][0]["content"], gen_prefix=item["gen_prefix"],
                                           tgt_delim=" ", few_delim="")
    hflm = SimpleNamespace(tokenizer=tokenizer, chat_template_args={})
    return HFLM.apply_chat_template(hflm, multiturn_to_singleturn(turns), add_generation_prompt=False)


def rendered_tokens(tokenizer, item):
    text = lm_eval_chat_prompt(tokenizer, item)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fake_item(references, task="niah_single_1", length=1024, i=0):
    return {"id": f"{task}/{length}/{i}", "task": task, "length": length, "references": references,
            "retention_threshold": 85.6}


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


def test_rows_name_their_cell_and_metrics_carry_lm_evals_standard_errors(quick_items):
    from lm_eval.api.metrics import mean_stderr

    answers = [" ".join(item["references"][: i % 3]) for i, item in enumerate(quick_items)]
    result = rt.score(quick_items, answers, rt.Config())
    rows, err = result["items"], result["metrics"]["stderr"]
    assert [(r["id"], r["task"], r["length"]) for r in rows] == [(i["id"], i["task"], i["length"]) for i in quick_items]
    assert all(isinstance(r["passed"], bool) and 0 <= r["score"] <= 100 for r in rows)
    for task in QUICK:
        for length in (1024, 2048):
            scores = [r["score"] for r in rows if (r["task"], r["length"]) == (task, length)]
            assert err[task][str(length)] == pytest.approx(mean_stderr(scores), abs=1e-4)
    # the average over tasks combines them: sqrt(sum se^2) / tasks
    for length in ("1024", "2048"):
        expected = sum(err[t][length] ** 2 for t in QUICK) ** 0.5 / len(QUICK)
        assert err["average"][length] == pytest.approx(expected, abs=1e-3)
    assert any(err[t][n] > 0 for t in QUICK for n in ("1024", "2048"))
    # one item per cell: lm-eval's N/A
    single = rt.score([fake_item(["7"])], ["7"], rt.Config())["metrics"]["stderr"]
    assert single == {"niah_single_1": {"1024": None}, "average": {"1024": None}}


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
        assert [m["role"] for m in item["messages"]] == ["user", "assistant"]
        prompt = item["messages"][0]["content"]
        assert item["references"] and all(r in prompt for r in item["references"]), item["id"]
    budgets = {i["task"]: i["max_tokens"] for i in quick_items}
    assert budgets == {"vt": 30, "cwe": 120, "fwe": 50}  # lm-eval's generation lengths


# ---------------------------------------------------------------- the answer prefix
def test_items_carry_lm_evals_answer_prefix_as_an_open_assistant_turn(tokenizer, quick_items):
    from lm_eval.tasks.ruler import cwe_utils, fwe_utils, vt_utils

    for item in quick_items:
        assert item["messages"][1] == {"role": "assistant", "content": item["gen_prefix"]}
        # cut off the prompt's end, as lm-eval does (vt's and cwe's one-shot example keeps its own)
        assert not item["messages"][0]["content"].rstrip().endswith(item["gen_prefix"])
    prefixes = {i["task"]: i["gen_prefix"] for i in quick_items}
    assert prefixes["cwe"] == cwe_utils.CONFIG["answer_prefix"].strip() == (
        "Answer: The top 10 words that appear most often in the list are:")
    assert prefixes["fwe"] == fwe_utils.CONFIG["answer_prefix"].strip()
    vt = [i for i in quick_items if i["task"] == "vt"]
    for item in vt:  # vt's prefix names the value the chain carries
        value = item["messages"][0]["content"].rsplit("assigned the value ", 1)[1].split(" ")[0].rstrip(".")
        assert item["gen_prefix"] == vt_utils.CONFIG["variable_tracking"]["answer_prefix"].strip().format(
            num_v=5, query=value)

    # The student's prompt is lm-eval's chat-mode prompt, character for character: the
    # assistant turn is left open at the prefix (no end-of-turn, no new turn after it).
    from pipeline.engines import _render_prompts

    ours = _render_prompts(tokenizer, [i["messages"] for i in quick_items], [None] * len(quick_items), None)
    for item, text in zip(quick_items, ours):
        assert text == lm_eval_chat_prompt(tokenizer, item)
        assert text.endswith("<|im_start|>assistant\n" + item["gen_prefix"]), text[-200:]


def test_the_prefix_is_derived_from_text_as_lm_eval_cuts_it():
    from lm_eval.tasks.ruler import cwe_utils

    one = ("A special magic number is hidden within the following text. ...\n"
           "What is the special magic number for gentle-pear mentioned in the provided text?")
    assert rt.split_answer_prefix(one) == (
        one, "The special magic number for gentle-pear mentioned in the provided text is")
    many = ("Some special magic uuids are hidden ...\nWhat are all the special magic uuids for a-b, c-d, and e-f "
            "mentioned in the provided text?")
    assert rt.split_answer_prefix(many)[1] == (
        "The special magic uuids for a-b, c-d, and e-f mentioned in the provided text are")
    cwe = "Below is a numbered list of words. 1. x 2. y\nQuestion: What are the 10 most common words in the above list?"
    assert rt.split_answer_prefix(cwe + cwe_utils.CONFIG["answer_prefix"]) == (
        cwe, cwe_utils.CONFIG["answer_prefix"].strip())
    assert rt.split_answer_prefix("no question here") == ("no question here", None)


@pytest.mark.slow
def test_the_engine_continues_the_prefix_and_the_cache_key_follows_it(tokenizer, quick_items, teacher_dir, tmp_path):
    """The transformers engine on the packaged SmolLM2 answers each item with the
    greedy continuation of lm-eval's chat-mode prompt (computed here by HF generate on
    that prompt), the score is lm-eval's on that continuation alone, and an item
    without its prefix is another cache key."""
    import torch
    from lm_eval.tasks.ruler import common_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.engines import CachedEngine, Sampling, TransformersEngine

    items = [i for i in quick_items if i["task"] == "vt" and i["length"] == 1024]
    engine = CachedEngine(TransformersEngine("teacher", batch_size=2, threads=1, chat_template=None),
                          tmp_path, progress=False)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=items[0]["max_tokens"], n=1, seed=0)
    answers = [c[0].text for c in engine.chat([i["messages"] for i in items], sampling)]

    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    for item, answer in zip(items, answers):
        ids = teacher(lm_eval_chat_prompt(teacher, item), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=item["max_tokens"],
                                 eos_token_id=teacher.convert_tokens_to_ids("<|im_end|>"))
        expected = teacher.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer == expected
        assert not answer.lstrip().startswith(item["gen_prefix"][:20])  # the prefix is not repeated
        lm_eval = common_utils.process_results({"max_length": 1024, "outputs": item["references"]}, [answer])
        assert rt.item_score(answer, item["references"]) == pytest.approx(100 * lm_eval["1024"])

    bare = [[i["messages"][0]] for i in items]
    keys = {engine.key(m, None, sampling) for m in [i["messages"] for i in items]}
    assert not keys & {engine.key(m, None, sampling) for m in bare}
    again = CachedEngine(engine.inner, tmp_path, progress=False)
    assert [c[0].text for c in again.chat([i["messages"] for i in items], sampling)] == answers
    assert again.misses == 0


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
    # lm-eval's NIAH gen_prefix: singular for one value of one key, plural otherwise
    prefix = {i["task"]: i["gen_prefix"] for i in items}
    assert prefix["niah_single_1"].startswith("The special magic number for ")
    assert prefix["niah_single_1"].endswith(" mentioned in the provided text is")
    for task in ("niah_multivalue", "niah_multiquery"):
        assert prefix[task].startswith("The special magic numbers for ")
        assert prefix[task].endswith(" mentioned in the provided text are")
    assert prefix["niah_multiquery"].count(", ") >= 2 and ", and " in prefix["niah_multiquery"]  # four keys
