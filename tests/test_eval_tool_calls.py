"""The tool-use eval scores BFCL items that generation never saw, with BFCL's own AST
checker: hand-written answers pass or fail as BFCL's rules say (parallel calls in any
order, optional parameters, irrelevance = no call), and the per-category and overall
numbers aggregate the way BFCL's summaries do."""

import json
import subprocess
import sys

import pytest

from pathlib import Path

from evals import tool_calls
from pipeline.bfcl import (HELDOUT_FRACTION, LANGUAGE_FILES, bfcl_items, is_dev, is_heldout, reserved_questions,
                           tool_name)
from pipeline.chat_template import apply_training_template
from pipeline.recipe import load_recipe
from synth_data import tool_use

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def items():
    """Every held-out item of the five categories, by id."""
    return {it["id"]: it for it in tool_calls.build_items(tool_calls.Config(count=10_000), None, {})}


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


# --------------------------------------------------------------------------- items
def test_items_are_the_heldout_slice_that_generation_never_samples(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("generate:\n  tool_use:\n    heldout_fraction: 0.2\n")
    context = {"recipe": load_recipe(recipe)}
    items = tool_calls.build_items(tool_calls.Config(count=10_000), None, context)
    sources = {it["id"].removeprefix("bfcl/") for it in items}
    assert all(is_heldout(s, 0.2) for s in sources)
    for name, files in tool_calls.CATEGORIES.items():
        heldout = [it for f in files for it in bfcl_items(f) if is_heldout(it["id"], 0.2)]
        assert sum(it["category"] == name for it in items) == len(heldout) > 0

    # No function of a call item, gated or dev, is in generation's catalogue, and
    # generation's irrelevance requests never come from an eval item of either split.
    dev = tool_calls.build_items(tool_calls.Config(count=10_000), None, {**context, "split": "dev"})
    assert dev and all(is_dev(it["id"].removeprefix("bfcl/"), 0.2) for it in dev)
    catalogue = set(tool_use.catalogue(0.2))
    for split in (items, dev):
        offered = {fn["name"] for it in split if it["category"] != "irrelevance" for fn in it["functions"]}
        assert catalogue and offered and not catalogue & offered
    prompts = tool_use.sample_prompts(
        tool_use.Config(count=300, heldout_fraction=0.2, mix={"irrelevance": 1.0}), __import__("random").Random(0))
    dev_sources = {it["id"].removeprefix("bfcl/") for it in dev}
    assert prompts and not {p["source"] for p in prompts} & (sources | dev_sources)


def test_items_are_deterministic_and_the_default_fraction_is_generations():
    assert tool_use.Config().heldout_fraction == HELDOUT_FRACTION
    cfg = tool_calls.Config(count=3)
    first, again = tool_calls.build_items(cfg, None, {}), tool_calls.build_items(cfg, None, {})
    assert first == again and len(first) == 3 * (len(tool_calls.CATEGORIES) + 2)  # simple: 3 languages
    other = tool_calls.build_items(tool_calls.Config(count=3, seed=1), None, {})
    assert [it["id"] for it in other] != [it["id"] for it in first]
    only = tool_calls.build_items(tool_calls.Config(count=2, categories=["parallel"]), None, {})
    assert [it["category"] for it in only] == ["parallel", "parallel"]


def test_simple_covers_bfcls_three_languages_from_the_heldout_slice(items):
    """BFCL ships simple_java and simple_javascript (items and possible answers); the
    eval draws their held-out slice as it draws python's, and no function of theirs
    is in generation's catalogue, held out or not."""
    simple = [it for it in items.values() if it["category"] == "simple"]
    counts = {lang: sum(it["language"] == lang for it in simple) for lang in ("python", "java", "javascript")}
    assert counts == {"python": 43, "java": 10, "javascript": 7}  # the held-out slice at 0.1
    assert all(it["possible_answer"] for it in simple)
    assert all("language" not in it for it in items.values() if it["category"] != "simple")

    catalogue = {tool_name(n) for n in tool_use.catalogue(HELDOUT_FRACTION)}
    for category in LANGUAGE_FILES:
        names = {tool_name(fn["name"]) for it in bfcl_items(category) for fn in it["function"]}
        assert names and not names & catalogue
    questions = set(reserved_questions(HELDOUT_FRACTION))  # dedup's references
    assert {it["messages"][0]["content"] for it in simple if it["language"] != "python"} <= questions


def test_function_docs_are_shown_in_bfcls_language_specific_form(tmp_path, items):
    """Our copy of BFCL's doc preprocessing gives what BFCL's own function gives, on
    every simple item of the three languages (BFCL's module runs in a subprocess whose
    BFCL_PROJECT_ROOT is a temporary folder: importing it creates folders there)."""
    from pipeline.bfcl import language_function_doc

    code = ("import json, sys; from bfcl_eval.utils import _func_doc_language_specific_pre_processing as f; "
            "cases = json.load(sys.stdin); "
            "print(json.dumps([f(c['function'], c['category']) for c in cases]))")
    cases = [{"function": it["function"], "category": c}
             for c in ("simple_python", *LANGUAGE_FILES) for it in bfcl_items(c)]
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases), capture_output=True, text=True,
                          env={**__import__("os").environ, "BFCL_PROJECT_ROOT": str(tmp_path)}, check=False)
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout)
    ours = [[language_function_doc(fn, c["category"]) for fn in c["function"]] for c in cases]
    assert ours == theirs and len(ours) == 400 + 100 + 50
    java = items["bfcl/simple_java_23"]["tools"][0]["function"]
    assert java["description"].endswith("Note that the provided function is in Java 8 SDK syntax.")
    assert {p["type"] for p in java["parameters"]["properties"].values()} == {"string"}
    assert items[TRIANGLE]["tools"][0]["function"]["description"].endswith("in Python 3 syntax.")


def test_items_render_with_the_training_template(teacher_dir, items):
    from transformers import AutoTokenizer

    # The default student (model.tiny) trains in the project's ChatML template.
    tokenizer = apply_training_template(AutoTokenizer.from_pretrained(teacher_dir), built_from_config=True)
    item = items["bfcl/simple_python_104"]
    text = tokenizer.apply_chat_template(item["messages"], tools=item["tools"], add_generation_prompt=True,
                                         tokenize=False)
    assert '"name": "geometry_area_triangle"' in text and item["messages"][0]["content"] in text
    assert text.endswith("<|im_start|>assistant\n")


# -------------------------------------------------------------------------- scorer
TRIANGLE = "bfcl/simple_python_104"  # geometry.area_triangle(base=6, height=10, unit optional)
CASES = [
    # (item, answer, right?, reason contains)
    (TRIANGLE, call("geometry_area_triangle", base=6, height=10), True, "ok"),
    (TRIANGLE, call("geometry_area_triangle", base=6, height=10, unit="square meters"), True, "ok"),
    (TRIANGLE, "Sure! " + call("geometry_area_triangle", height=10, base=6), True, "ok"),
    (TRIANGLE, call("geometry_area_triangle", base=7, height=10), False, "value_error"),
    (TRIANGLE, call("geometry_area_triangle", base=6.5, height=10), False, "type_error"),
    (TRIANGLE, call("geometry_area_triangle", base=6), False, "missing_required"),
    (TRIANGLE, call("geometry_area_triangle", base=6, height=10, colour="red"), False, "unexpected_param"),
    (TRIANGLE, call("geometry.area_triangle", base=6, height=10), False, "wrong_func_name"),
    (TRIANGLE, call("geometry_area_triangle", base=6, height=10) * 2, False, "wrong_count"),
    (TRIANGLE, '<tool_call>{"name": "geometry_area_triangle", "arguments": {"base": 6,</tool_call>', False,
     "decoder_failed"),
    (TRIANGLE, "The area is 30 square units.", False, "wrong_count"),
    # strings compare BFCL's way (case and punctuation ignored)
    ("bfcl/simple_python_63", call("genetics_calculate_similarity", species1="HUMAN", species2="chimp"), True, "ok"),
    # an optional parameter may be left out only where the possible answers allow ""
    ("bfcl/simple_python_228", call("get_personality_traits", hobby="jogging", trait_count=3), True, "ok"),
    ("bfcl/simple_python_228", call("get_personality_traits", hobby="jogging"), False, "missing_optional"),
    # multiple: the right one of several offered functions
    ("bfcl/multiple_142", call("weather_humidity_forecast", location="Miami", days=7), True, "ok"),
    ("bfcl/multiple_142", call("get_team_score", team_name="Miami", league="NBA"), False, "wrong_func_name"),
    # parallel: every call, in any order, none twice
    ("bfcl/parallel_50", call("game_save_progress", stage=7, mode="easy") + call("game_save_progress", stage=3,
                                                                                  mode="hard"), True, "ok"),
    ("bfcl/parallel_50", call("game_save_progress", stage=3, mode="hard") + call("game_save_progress", stage=7,
                                                                                  mode="easy"), True, "ok"),
    ("bfcl/parallel_50", call("game_save_progress", stage=7, mode="easy"), False, "wrong_count"),
    ("bfcl/parallel_50", call("game_save_progress", stage=7, mode="easy") * 2, False, "cannot_find_match"),
    ("bfcl/parallel_multiple_2", call("circle_calculate_circumference", diameter=10)
     + call("circle_calculate_area", radius=5), True, "ok"),
    ("bfcl/parallel_multiple_2", call("circle_calculate_area", radius=5)
     + call("circle_calculate_area", radius=10), False, "cannot_find_match"),
    # irrelevance: right iff no call decodes (an undecodable block counts as none, BFCL's rule)
    ("bfcl/irrelevance_30", "None of the functions can answer that: multinucleate cells.", True, "no call"),
    ("bfcl/irrelevance_30", call("bloodcell_classification", cell_shape="round", cell_size="large"), False,
     "called bloodcell_classification"),
    ("bfcl/irrelevance_30", "<tool_call>{not json}</tool_call>", True, "undecodable"),
    # Java and JavaScript: values come as strings (BFCL's "string representation") and
    # its type converters parse them for the language
    ("bfcl/simple_java_23", call("SmsHomeNewProductServiceImpl_list", productName="LED TV", recommendStatus="1",
                                 pageSize="20", pageNum="3"), True, "ok"),
    ("bfcl/simple_java_23", call("SmsHomeNewProductServiceImpl_list", productName="LED TV", recommendStatus=1,
                                 pageSize=20, pageNum=3), False, "type_error:java"),
    ("bfcl/simple_java_8", call("EFSNIOFile_setContents", source="fileStream", force="true", keepHistory="false",
                                monitor="progressMonitor"), True, "ok"),
    ("bfcl/simple_java_8", call("EFSNIOFile_setContents", source="fileStream", force="false", keepHistory="false",
                                monitor="progressMonitor"), False, "value_error"),
    ("bfcl/simple_javascript_24", call("getUniqueSorted", array="[3, 1, 2, 1, 4, 3]"), True, "ok"),
    ("bfcl/simple_javascript_24", call("getUniqueSorted", array=[3, 1, 2, 1, 4, 3]), False, "type_error:js"),
    ("bfcl/simple_javascript_14", call("chartDataAccessorFactory", chart='{"nm": "BarChart", "mn": "chartModule"}',
                                       library="visualizationLibrary", configObject="config"), True, "ok"),
    ("bfcl/simple_javascript_14", call("chartDataAccessorFactory", chart='{"nm": "PieChart", "mn": "chartModule"}',
                                       library="visualizationLibrary", configObject="config"), False, "value_error"),
]


@pytest.mark.parametrize("item_id, answer, right, reason", CASES)
def test_bfcl_rules_on_hand_written_answers(items, item_id, answer, right, reason):
    ok, why = tool_calls.check(items[item_id], answer)
    assert (ok, reason in why) == (right, True), why


def test_metrics_are_per_category_percentages_and_unweighted_means(items):
    chosen = [items[i] for i in (TRIANGLE, "bfcl/simple_python_228", "bfcl/parallel_50", "bfcl/irrelevance_30")]
    answers = [call("geometry_area_triangle", base=6, height=10), "no idea",
               call("game_save_progress", stage=7, mode="easy"), "I cannot help with that."]
    result = tool_calls.score(chosen, answers, tool_calls.Config())
    assert result["metrics"] == {
        "simple": 50.0, "parallel": 0.0, "irrelevance": 100.0,
        "simple_python": 50.0,  # the only language scored here
        "non_live_ast": 25.0,  # mean of simple and parallel (the call categories scored)
        "overall": 50.0,  # mean of the three categories, not of the four items (62.5)
        "counts": {"simple": 2, "parallel": 1, "irrelevance": 1, "simple_python": 2},
        # lm-eval's sample std / sqrt(n): simple 0 and 100 -> 70.71 / sqrt(2) = 50;
        # one item: N/A (None); a mean of means is N/A when a part is
        "stderr": {"simple": 50.0, "simple_python": 50.0, "parallel": None, "irrelevance": None,
                   "non_live_ast": None, "overall": None},
    }
    assert [r["passed"] for r in result["items"]] == [True, False, False, True]
    assert [(r["category"], r.get("language")) for r in result["items"]] == [
        ("simple", "python"), ("simple", "python"), ("parallel", None), ("irrelevance", None)]
    assert json.loads(json.dumps(result)) == result


def test_simple_is_the_unweighted_mean_of_its_languages(items):
    """BFCL's Non-Live Simple AST: python, java and javascript averaged as categories
    (not items), each language reported; the standard errors combine likewise."""
    chosen = [items[TRIANGLE], items["bfcl/simple_python_228"], items["bfcl/simple_python_63"],
              items["bfcl/simple_java_23"], items["bfcl/simple_java_8"],
              items["bfcl/simple_javascript_24"], items["bfcl/simple_javascript_8"]]
    answers = [call("geometry_area_triangle", base=6, height=10), "no", "no",
               call("SmsHomeNewProductServiceImpl_list", productName="LED TV", recommendStatus="1", pageSize="20",
                    pageNum="3"), "no",
               call("getUniqueSorted", array="[3, 1, 2, 1, 4, 3]"),
               call("doesEmailInputExist", formElem="emailForm", inputName="emailAddress")]
    metrics = tool_calls.score(chosen, answers, tool_calls.Config())["metrics"]
    assert (metrics["simple_python"], metrics["simple_java"], metrics["simple_javascript"]) == (33.33, 50.0, 100.0)
    assert metrics["simple"] == round((100 / 3 + 50 + 100) / 3, 2) == 61.11  # items would give 57.14
    assert metrics["counts"] == {"simple": 7, "simple_python": 3, "simple_java": 2, "simple_javascript": 2}
    err = metrics["stderr"]
    assert err["simple_python"] == 33.3333 and err["simple_java"] == 50.0 and err["simple_javascript"] == 0.0
    assert err["simple"] == pytest.approx((33.3333 ** 2 + 50 ** 2 + 0) ** 0.5 / 3, abs=1e-3)


def test_the_checker_loads_without_provider_sdks():
    code = ("import sys; from evals import tool_calls; tool_calls._checker(); "
            "print(sorted(m for m in ('openai', 'anthropic', 'bfcl_eval.constants.model_config') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_dev_split_is_bfcls_dev_slice_of_the_gated_categories_and_never_a_gated_item():
    """Choices are made on the dev slice: the gated categories (non-live: the live ones
    did not track them), items the gate never scores and generation never samples."""
    recipe = load_recipe(ROOT / "recipes/tiny-cpu.yaml")
    cfg = tool_calls.Config(count=25)
    test = tool_calls.build_items(cfg, None, {"recipe": recipe})
    dev = tool_calls.build_items(cfg, None, {"recipe": recipe, "split": "dev"})
    assert {it["test_category"] for it in dev} == {it["test_category"] for it in test}
    assert all(is_dev(it["id"].removeprefix("bfcl/"), HELDOUT_FRACTION) for it in dev)
    assert not any(is_heldout(it["id"].removeprefix("bfcl/"), HELDOUT_FRACTION) for it in dev)
    assert not {it["id"] for it in test} & {it["id"] for it in dev}
    counts = tool_calls.score(dev, [""] * len(dev), cfg)["metrics"]["counts"]
    assert counts == {"simple": 25 + 9 + 7, "multiple": 18, "parallel": 25, "parallel_multiple": 25, "irrelevance": 24,
                      "simple_python": 25, "simple_java": 9, "simple_javascript": 7}
    scored = tool_calls.score(dev, [""] * len(dev), cfg)["metrics"]
    assert scored["irrelevance"] == 100.0 and scored["simple"] == 0.0  # dev items score like test items