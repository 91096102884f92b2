"""The tool-use eval scores BFCL items that generation never saw, with BFCL's own AST
checker: hand-written answers pass or fail as BFCL's rules say (parallel calls in any
order, optional parameters, irrelevance = no call), and the per-category and overall
numbers aggregate the way BFCL's summaries do."""

import json
import subprocess
import sys

import pytest

from evals import tool_calls
from pipeline.bfcl import HELDOUT_FRACTION, bfcl_items, is_heldout
from pipeline.chat_template import apply_training_template
from pipeline.recipe import load_recipe
from synth_data import tool_use


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
    for name, category in tool_calls.CATEGORIES.items():
        heldout = [it for it in bfcl_items(category) if is_heldout(it["id"], 0.2)]
        assert sum(it["category"] == name for it in items) == len(heldout) > 0

    # No function of a call item is in generation's catalogue, and generation's
    # irrelevance requests never come from an eval item.
    catalogue = set(tool_use.catalogue(0.2))
    offered = {fn["name"] for it in items if it["category"] != "irrelevance" for fn in it["functions"]}
    assert catalogue and not catalogue & offered
    prompts = tool_use.sample_prompts(
        tool_use.Config(count=300, heldout_fraction=0.2, mix={"irrelevance": 1.0}), __import__("random").Random(0))
    assert prompts and not {p["source"] for p in prompts} & sources


def test_items_are_deterministic_and_the_default_fraction_is_generations():
    assert tool_use.Config().heldout_fraction == HELDOUT_FRACTION
    cfg = tool_calls.Config(count=3)
    first, again = tool_calls.build_items(cfg, None, {}), tool_calls.build_items(cfg, None, {})
    assert first == again and len(first) == 3 * len(tool_calls.CATEGORIES)
    other = tool_calls.build_items(tool_calls.Config(count=3, seed=1), None, {})
    assert [it["id"] for it in other] != [it["id"] for it in first]
    only = tool_calls.build_items(tool_calls.Config(count=2, categories=["parallel"]), None, {})
    assert [it["category"] for it in only] == ["parallel", "parallel"]


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
        "non_live_ast": 25.0,  # mean of simple and parallel (the call categories scored)
        "overall": 50.0,  # mean of the three categories, not of the four items (62.5)
        "counts": {"simple": 2, "parallel": 1, "irrelevance": 1},
    }
    assert [r["passed"] for r in result["items"]] == [True, False, False, True]
    assert json.loads(json.dumps(result)) == result


def test_the_checker_loads_without_provider_sdks():
    code = ("import sys; from evals import tool_calls; tool_calls._checker(); "
            "print(sorted(m for m in ('openai', 'anthropic', 'bfcl_eval.constants.model_config') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
