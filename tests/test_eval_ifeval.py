"""The IFEval eval: Google's 541 prompts, answers judged strict and loose by lm-eval's
IFEval checkers, which agree with a second implementation (if-verifiable); and the
steerability data is decontaminated against these prompts."""

import json
import random
import subprocess
import sys

import copy
from pathlib import Path

import pytest
from stage_outputs import needle_records

from evals import ifeval
from pipeline.ifeval_data import ifeval_data_file, ifeval_items, ifeval_prompts
from pipeline.contract import make_record
from pipeline.records import read_jsonl, write_jsonl
from synth_data import steerability
from synth_data.dedup import Decontaminator


@pytest.fixture(scope="module")
def items():
    """All 541 items by IFEval key, read from Google's file as it ships, not through the
    eval's own item builder; each with the id the eval's per-item rows carry."""
    lines = ifeval_data_file().read_text(encoding="utf-8").splitlines()
    return {it["key"]: {**it, "id": f"ifeval/{it['key']}"} for it in (json.loads(line) for line in lines if line.strip())}


# --------------------------------------------------------------------------- items
def test_the_data_is_ifevals_541_prompts_and_834_instructions():
    assert len(ifeval_items()) == 541 == len({it["key"] for it in ifeval_items()})
    assert sum(len(it["instruction_id_list"]) for it in ifeval_items()) == 834
    assert all(len(it["instruction_id_list"]) == len(it["kwargs"]) for it in ifeval_items())


def test_items_are_a_seeded_sample_with_the_prompt_as_the_user_turn(items):
    cfg = ifeval.Config(count=16)
    first = ifeval.build_items(cfg, None, {})
    assert first == ifeval.build_items(cfg, None, {}) and len({it["key"] for it in first}) == 16
    assert first != ifeval.build_items(ifeval.Config(count=16, seed=1), None, {})
    for it in first:
        source = items[it["key"]]
        assert it["messages"] == [{"role": "user", "content": source["prompt"]}]
        assert (it["instruction_id_list"], it["kwargs"]) == (source["instruction_id_list"], source["kwargs"])
        assert it["id"] == f"ifeval/{it['key']}"
    assert len(items) == 541


# -------------------------------------------------------------------------- scorer
CASES = [
    # (key, answer, strict per instruction, loose per instruction)
    (1001, "Day one we sail to Tokyo. Day two we walk in Kyoto.", [True], [True]),  # no commas
    (1001, "Day one, Tokyo. Day two, Kyoto.", [False], [False]),
    (1051, "dear sam,\nplease go and vote on tuesday.", [True], [True]),  # all lowercase
    # a chatty first line breaks the rule as written; loose drops the first line
    (1051, "Sure! Here is the letter:\ndear sam,\nplease go and vote on tuesday.", [False], [True]),
    (1220, "two cups meet\nin the rain\nIs there anything else I can help with?", [True], [True]),  # end phrase
    (1220, "two cups meet\nIs there anything else I can help with?\n*a poem by me*", [False], [True]),
    # JSON: markdown asterisks around it fail strict; loose removes them
    (1075, '{"ad": "Soft diapers for happy babies"}', [True], [True]),
    (1075, '**{"ad": "Soft diapers for happy babies"}**', [False], [True]),
    # a title, and fewer than 5 sentences (NLTK's punkt_tab counts; "Dr." is no sentence end)
    (1262, "<<Axles and roads>>\nHeavier axles wear roads faster. Dr. Smith measured it. The damage grows.",
     [True, True], [True, True]),
    (1262, "<<Axles and roads>>\n" + "A road cracks. " * 6 + "\n" + "A truck passes. " * 6 + "\nThe end.",
     [True, False], [True, False]),
    (1262, "", [False, False], [False, False]),
]


@pytest.mark.parametrize("key, answer, strict, loose", CASES)
def test_strict_and_loose_on_hand_written_answers(items, key, answer, strict, loose):
    assert ifeval.check(items[key], answer) == (strict, loose)


def test_metrics_count_prompts_and_instructions_separately(items):
    chosen = [{**items[key], "id": f"ifeval/{key}"} for key in (1001, 1262, 1051)]  # as the eval passes them
    answers = ["Day one we sail to Tokyo.",  # its one instruction followed
               "<<Roads>>\n" + "A road cracks. " * 6 + "\n" + "A truck passes. " * 6 + "\nThe end.",
               # title yes, fewer than 5 sentences no (also without the first or last line)
               "Sure! Here is the letter:\ndear sam,\nplease go and vote on tuesday."]  # lowercase only when loose
    result = ifeval.score(chosen, answers, ifeval.Config())
    assert result["metrics"] == {
        "prompt_strict": 33.33, "prompt_loose": 66.67,  # of 3 prompts
        "instruction_strict": 50.0, "instruction_loose": 75.0,  # of 4 instructions
        "counts": {"prompts": 3, "instructions": 4},
        # prompt level: lm-eval's sample std / sqrt(n) over the prompts' 0/100 verdicts;
        # instruction level: the ratio estimator over prompts, strict 1/1, 1/2, 0/1
        # followed: R = 50, residuals 50, 0, -50 -> sqrt(3/2 * 5000) / 4 = 21.65
        "stderr": {"prompt_strict": 33.3333, "prompt_loose": 33.3333,
                   "instruction_strict": 21.6506, "instruction_loose": 18.75},
    }
    assert [(r["passed"], r["loose_passed"]) for r in result["items"]] == [(True, True), (False, False), (False, True)]
    assert result["items"][1]["reason"] == "not followed: length_constraints:number_sentences"
    assert json.loads(json.dumps(result)) == result


def test_the_budget_is_lm_evals_and_a_lower_one_is_noted(items):
    assert ifeval.Config().max_tokens == 1280 == ifeval.LM_EVAL_MAX_TOKENS
    chosen, answers = [items[1001]], ["Day one we sail to Tokyo."]
    assert "notes" not in ifeval.score(chosen, answers, ifeval.Config())["metrics"]
    short = ifeval.score(chosen, answers, ifeval.Config(max_tokens=64))["metrics"]
    assert short["notes"] == ["max_tokens: 64 (IFEval uses 1280): length instructions may be unreachable"]


def test_the_tiny_recipe_keeps_its_small_budget_and_says_so():
    from evals.evaluate import suite_configs
    from pipeline.recipe import load_recipe

    _, cfg = suite_configs(load_recipe(Path(__file__).parents[1] / "recipes/tiny-cpu.yaml"))["ifeval"]
    assert cfg.max_tokens == 64 and ifeval.notes(cfg) == [
        "max_tokens: 64 (IFEval uses 1280): length instructions may be unreachable"]


def test_stderr_is_lm_evals_closed_form(items):
    from lm_eval.api.metrics import mean_stderr

    keys = sorted(items)[:12]
    answers = ["Day one we sail to Tokyo." if i % 3 else "Sure, here it is." for i in range(len(keys))]
    result = ifeval.score([items[k] for k in keys], answers, ifeval.Config())
    verdicts = [100.0 * r["passed"] for r in result["items"]]
    assert 0 < sum(verdicts) < 100 * len(verdicts)  # some pass, some fail
    assert result["metrics"]["stderr"]["prompt_strict"] == pytest.approx(mean_stderr(verdicts), abs=1e-4)
    # one instruction per prompt: the instruction level's ratio is the same mean
    single = [items[k] for k in keys if len(items[k]["instruction_id_list"]) == 1]
    one = ifeval.score(single, answers[: len(single)], ifeval.Config())["metrics"]
    assert one["stderr"]["instruction_strict"] == pytest.approx(one["stderr"]["prompt_strict"], abs=1e-4)


def test_random_draws_inside_the_checkers_are_reproducible(items):
    # Key 1122 asks for a lowercase tweet with at least 4 "#": the lowercase check asks
    # langdetect (random unless seeded) and the letter-count check swaps the non-letter
    # for a random letter, so unseeded scores of a short answer change from run to run.
    answer = "a tweet #one #two #three #four " + "e" * 10
    results = {json.dumps(ifeval.check(items[1122], answer)) for _ in range(5)}
    assert len(results) == 1
    state = random.getstate()
    ifeval.check(items[1122], answer)
    assert random.getstate() == state


def test_lm_eval_and_if_verifiable_agree(items):
    """The same judgement from the second implementation, on prompts-as-answers and
    transformed versions of them that pass some instructions and fail others."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    def answers(prompt):
        return [prompt, prompt.lower(), prompt.upper(),
                "Sure, here you go:\n" + prompt.replace(",", "") + "\n*P.S. that is all*",
                json.dumps({"answer": prompt}),
                "<<A title>>\n\n" + prompt.replace(". ", ".\n\n") + "\n\nIs there anything else I can help with?"]

    keys = sorted(random.Random(0).sample(sorted(items), 60)) + [1122, 1129]  # + the two random draws
    judged = []
    for key in keys:
        it = items[key]
        sample = IFEvalSample(key, it["prompt"], it["instruction_id_list"], it["kwargs"])
        for answer in answers(it["prompt"]):
            ours = ifeval.check(it, answer)
            random.seed(key)  # the same draw as ours where a checker draws
            results, _ = evaluate_output_for_sample("ifeval", sample, answer)
            assert ours == ([r.strict_pass for r in results], [r.loose_pass for r in results]), (key, answer)
            judged.append(ours)
    strict = [x for s, _ in judged for x in s]
    loose = [x for _, lo in judged for x in lo]
    assert 0.1 < sum(strict) / len(strict) < 0.9 and sum(loose) > sum(strict)  # both outcomes exercised


# --------------------------------------------------------------- decontamination
def test_dedup_drops_records_that_copy_an_ifeval_prompt(tmp_path):
    # Records carry a real stage record's meta, with the texts this test needs.
    [real] = needle_records(tmp_path / "needle", 1)
    prompt = ifeval_prompts()[1]
    planted = make_record("steerability", [{"role": "user", "content": "Here is a task for you. " + prompt},
                                           {"role": "assistant", "content": "A fine itinerary."}],
                          copy.deepcopy(real["meta"])).dump()
    clean = make_record("steerability", [{"role": "user", "content": "Write a memo about a charity run."},
                                         {"role": "assistant", "content": "The run starts at nine."}],
                        copy.deepcopy(real["meta"])).dump()
    root = tmp_path / "synth"
    write_jsonl(root / "steerability" / "accepted.jsonl", [planted, clean])
    recipe = tmp_path / "r.yaml"

    def run(flag):
        recipe.write_text(f"dedup:\n  bfcl_heldout: false\n  ifeval_heldout: {flag}\n")
        out = tmp_path / f"dedup-{flag}"
        proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "dedup", str(recipe), "--input", str(root),
                               "--out", str(out)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        return out, json.loads((out / "dedup_stats.json").read_text())

    out, stats = run("true")
    assert stats["heldout_items"] == 541 and stats["removed"] == {"contaminated": 1}
    (removed,) = read_jsonl(out / "removed.jsonl")
    assert removed["id"] == planted["id"]
    assert removed["meta"]["dedup"]["matched_ngram"] == "i am planning a trip to japan and i would like thee to"
    assert [r["id"] for r in read_jsonl(out / "accepted" / "steerability.jsonl")] == [clean["id"]]

    _, stats = run("false")
    assert stats["heldout_items"] == 0 and stats["kept"] == 2


def test_steerability_prompts_never_copy_ifeval_so_sampling_needs_no_filter():
    # Steerability builds prompts from its own document types, topics and instruction
    # wordings; none of them shares a dedup n-gram with IFEval's prompts.
    cfg = steerability.Config(count=400, conversations=50, turns=3)
    prompts = steerability.sample_prompts(cfg, random.Random(0))
    texts = [steerability._user_turn(p["requests"][0], p["constraints"]) for p in prompts if p["variant"] == "single"]
    texts += [steerability._system_turn(p["constraints"][0]) + "\n" + "\n".join(p["requests"])
              for p in prompts if p["variant"] == "system"]
    decontaminator = Decontaminator(ifeval_prompts(), n=13)
    assert len(texts) == 450 and not [t for t in texts if decontaminator.match(t)]


def test_the_dev_split_never_holds_a_gated_prompt():
    """Learning rates and steps are chosen on the dev split: its prompts are the ones
    the gated sample left out, as many as asked."""
    cfg = ifeval.Config(count=150)
    test = {it["id"] for it in ifeval.build_items(cfg, None, {})}
    dev = {it["id"] for it in ifeval.build_items(cfg, None, {"split": "dev"})}
    assert len(test) == len(dev) == 150 and not test & dev
    with pytest.raises(ValueError, match="no dev split is left"):
        ifeval.build_items(ifeval.Config(count=541), None, {"split": "dev"})
