"""Tool use: the call matcher keeps exactly the answers whose calls equal the sampled
ones (hand-written cases), sampling draws valid assignments from BFCL's catalogue
without its held-out slice, and the pipeline runs end to end on the real teacher."""

import json
import random

import pytest

from pipeline import bfcl
from synth_data import tool_use as tu
from synth_data.tool_use import match_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": {
        "type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "convert", "description": "Convert an amount.", "parameters": {
        "type": "object", "required": ["amount", "exact"], "properties": {
            "amount": {"type": "number"}, "exact": {"type": "boolean"},
            "path": {"type": "array", "items": {"type": "integer"}}}}}},
]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
ROME = {"name": "get_weather", "arguments": {"city": "Rome"}}
CONVERT = {"name": "convert", "arguments": {"amount": 2.5, "exact": True, "path": [1, 2]}}


def calls(*objs):
    return "".join(f"<tool_call>{json.dumps(o)}</tool_call>" for o in objs)


@pytest.mark.parametrize("text, expected, reason", [
    (calls(PARIS), [PARIS], None),
    # parallel calls in another order, values normalised by schema type
    (calls(ROME, CONVERT, PARIS), [PARIS, ROME, CONVERT], None),
    (calls({"name": "get_weather", "arguments": {"city": " paris ", "days": "3"}}), [PARIS], None),
    (calls({"name": "convert", "arguments": {"amount": "2.50", "exact": "true", "path": [1.0, 2]}}), [CONVERT], None),
    # an argument equal to the schema default is the same call as leaving it out
    (calls({"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}), [ROME], None),
    # arguments as a JSON string (OpenAI style)
    (calls({"name": "get_weather", "arguments": json.dumps(ROME["arguments"])}), [ROME], None),
    # wrong types
    (calls({"name": "get_weather", "arguments": {"city": "Paris", "days": "three"}}), [PARIS], "wrong_type"),
    (calls({"name": "get_weather", "arguments": {"city": "Paris", "days": 3.5}}), [PARIS], "wrong_type"),
    (calls({"name": "convert", "arguments": {"amount": 2.5, "exact": "yes", "path": [1, 2]}}), [CONVERT], "wrong_type"),
    # wrong values, extra / missing calls, wrong function
    (calls({"name": "get_weather", "arguments": {"city": "Paris", "days": 4}}), [PARIS], "wrong_arguments"),
    (calls(PARIS, {"name": "get_weather", "arguments": {"city": "Oslo"}}), [PARIS, ROME], "wrong_arguments"),
    (calls(PARIS, ROME), [PARIS], "extra_call"),
    (calls(PARIS, PARIS), [PARIS], "extra_call"),
    (calls(PARIS), [PARIS, ROME], "missing_call"),
    (calls(CONVERT), [PARIS], "wrong_function"),
    (calls({"name": "get_forecast", "arguments": {"city": "Paris"}}), [PARIS], "wrong_function"),
    # malformed output
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>', [PARIS], "malformed_call"),
    ('<tool_call>{"arguments": {"city": "Paris"}}</tool_call>', [PARIS], "malformed_call"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', [PARIS], "malformed_call"),
    ("The weather in Paris is sunny.", [PARIS], "no_call"),
    # irrelevance: no tool fits, so no call is the right answer
    ("I cannot help with that using these tools.", [], None),
    (calls(ROME), [], "call_when_irrelevant"),
])
def test_call_matcher(text, expected, reason):
    assert match_calls(text, expected, TOOLS) == reason


def test_catalogue_comes_from_bfcl_without_the_heldout_slice():
    cat = tu.catalogue(0.1)
    assert len(cat) > 500
    heldout_names = {fn["name"] for f in bfcl.CATALOGUE_FILES for item in bfcl.bfcl_items(f)
                     if bfcl.is_heldout(item["id"], 0.1) for fn in item["function"]}
    assert heldout_names and not heldout_names & set(cat)
    assert bfcl.heldout_questions(0.1)


def test_sampled_assignments_are_valid_for_their_schemas():
    cfg = tu.Config(count=60, seed=3)
    prompts = tu.sample_prompts(cfg, random.Random(3))
    assert {p["kind"] for p in prompts} == set(tu.KINDS)
    for p in prompts:
        by_name = {t["function"]["name"]: t["function"] for t in p["tools"]}
        for call in p["calls"]:
            params = by_name[call["name"]]["parameters"]
            assert set(params.get("required", [])) <= set(call["arguments"]) <= set(params["properties"])
            for key, value in call["arguments"].items():
                spec = params["properties"][key]
                if "enum" in spec:
                    assert value in spec["enum"]
                tu.normalise(value, spec)  # raises TypeMismatch on a wrongly typed value
        # the sampled calls match themselves (the matcher and the sampler agree)
        text = "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in p["calls"]) or "No tool fits."
        assert match_calls(text, p["calls"], p["tools"]) is None
        if p["kind"] == "parallel":
            assert len(p["calls"]) >= 2 and len({c["name"] for c in p["calls"]}) == 1
        if p["kind"] == "multiple":
            assert len({c["name"] for c in p["calls"]}) >= 2


def test_malformed_teacher_output_is_rejected_with_a_reason_never_a_crash():
    from pipeline.engines import Completion

    cfg = tu.Config()
    outs = [Completion("", 0, "stop"), Completion('<tool_call>{"name": "get_weather", "argu', 160, "length"),
            Completion("<tool_call>not json</tool_call>", 6, "stop"), Completion(calls(PARIS), 20, "stop")]
    cands = [{"messages": [{"role": "user", "content": "Weather in Paris for 3 days?"},
                           {"role": "assistant", "content": o.text}],
              "tools": TOOLS, "expected": [PARIS], "meta": {},
              "completion": {"finish_reason": o.finish_reason, "tokens": o.tokens}} for o in outs]
    cands.append({**cands[-1], "messages": [{"role": "user", "content": "Weather, please."}, cands[-1]["messages"][1]]})
    reasons = [c["reject_reason"] for c in tu.validate(cands, cfg)]
    assert reasons == ["empty", "truncated", "malformed_call", None, "request_missing_value"]


@pytest.mark.slow
def test_tool_use_end_to_end_on_the_real_teacher(tmp_path, teacher_dir):
    from synth_data import four_steps
    from pipeline.engines import CachedEngine, TransformersEngine
    from test_steerability import assert_pipeline_output  # tests/ is on sys.path (rootdir mode)

    engine = CachedEngine(TransformersEngine("teacher", batch_size=8, threads=1), tmp_path / "cache",
                          progress=False)
    cfg = tu.Config(count=4, n=1, max_tokens=64, request_max_tokens=40,
                    mix={"single": 0.5, "irrelevance": 0.5})
    stats = four_steps.run(tu, cfg, engine, tmp_path / "out")
    assert_pipeline_output(tmp_path / "out", stats, tu.REJECT_REASONS, teacher_dir)
    assert stats["generated"] == 4
