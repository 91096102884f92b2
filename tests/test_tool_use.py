"""Tool use: the call matcher keeps exactly the answers whose calls equal the sampled
ones (hand-written cases), sampling draws valid assignments from BFCL's catalogue
without its held-out slice, and the pipeline runs end to end on the real teacher."""

import json
import random
from collections import Counter

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


def test_catalogue_comes_from_bfcl_without_the_heldout_and_dev_slices():
    cat = tu.catalogue(0.1)
    assert len(cat) > 500
    reserved_names = {fn["name"] for f in bfcl.CATALOGUE_FILES for item in bfcl.bfcl_items(f)
                     if bfcl.is_reserved(item["id"], 0.1) for fn in item["function"]}
    assert reserved_names and not reserved_names & set(cat)
    assert bfcl.reserved_questions(0.1)


def test_sampled_assignments_are_valid_for_their_schemas():
    cfg = tu.Config(count=60, seed=3)
    prompts = tu.sample_prompts(cfg, random.Random(3))
    assert {p["kind"] for p in prompts} == set(cfg.mix)
    for p in prompts:
        by_name = {t["function"]["name"]: t["function"] for t in p["tools"]}
        for call in p["calls"]:
            params = by_name[call["name"]]["parameters"]
            assert set(params.get("required", [])) <= set(call["arguments"]) <= set(params["properties"])
            for key, value in call["arguments"].items():
                spec = params["properties"][key]
                if "enum" in spec:  # an array's item choices sit on the array (BFCL's form)
                    assert set(value) <= set(spec["enum"]) if spec.get("type") == "array" else value in spec["enum"]
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


# ------------------------------------------------- requests and answers not the teacher's
def test_a_request_stated_by_code_states_every_value():
    """What the teacher paraphrases (requests: paraphrase) passes the request check itself."""
    for p in tu.sample_prompts(tu.Config(count=80, seed=4, requests="paraphrase"), random.Random(4)):
        if p["calls"]:
            assert tu._request_mentions(tu.stated_request(p["calls"], p["tools"]), p["calls"]), p["calls"]


def test_bfcl_requests_are_items_outside_the_heldout_slice_with_their_ground_truth():
    truth = {item["id"]: bfcl.bfcl_answers(category)[item["id"]]
             for category in bfcl.CATALOGUE_FILES for item in bfcl.bfcl_items(category)
             if item["id"] in bfcl.bfcl_answers(category)}
    prompts = tu.sample_prompts(tu.Config(count=120, seed=2, requests="bfcl"), random.Random(2))
    assert {p["kind"] for p in prompts} == set(tu.Config().mix)
    calls = [p for p in prompts if p["calls"]]
    assert len({p["source"] for p in calls}) == len(calls)  # no item twice before all are used
    for p in calls:
        assert not bfcl.is_reserved(p["source"], 0.1)
        gold = truth[p["source"]]
        assert len(gold) == len(p["calls"])
        for call, options in zip(p["calls"], gold):
            (name, args), = options.items()
            assert call["name"] == bfcl.tool_name(name)
            # every argument is one of BFCL's own options (a left-out one may be left out)
            for param, value in call["arguments"].items():
                assert value in [tu.plain(o) for o in args[param]]
            assert all("" in args[param] for param in set(args) - set(call["arguments"]))
        assert tu.match_calls(tu.code_answer(p["calls"]), p["calls"], p["tools"]) is None


def test_call_sets_whose_record_would_exceed_max_record_tokens_are_not_sampled():
    from pipeline.sources import conversation_tokens

    cfg = tu.Config(count=60, seed=5, requests="bfcl", max_record_tokens=600, mix={"multiple": 1.0})
    prompts = tu.sample_prompts(cfg, random.Random(5))
    assert 0 < len(prompts) < 60  # multiple-call items are long: some are left out
    for p in prompts:
        record = [{"role": "user", "content": p["request"]},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                      for c in p["calls"]]}]
        assert conversation_tokens(record, p["tools"]) <= 600


def test_mismatch_near_miss_and_irrelevance_answered_by_code_are_one_refusal_with_no_called_function_offered(tmp_path):
    """`mismatch`: a BFCL call set's own request with only other items' functions;
    `near_miss`: with only its own item's functions that its calls leave unused; and
    with `irrelevance_answers: code` every no-call answer is REFUSAL: the teacher is
    asked nothing, each record is accepted and says how it was made."""
    from synth_data import four_steps
    from stage_outputs import records_as_written

    items = {item["id"]: item for category in bfcl.CATALOGUE_FILES for item in bfcl.bfcl_items(category)}
    cfg = tu.Config(count=60, seed=3, requests="bfcl", answers="code", irrelevance_answers="code",
                    mix={"single": 0.3, "irrelevance": 0.2, "mismatch": 0.3, "near_miss": 0.2})
    stats = four_steps.run(tu, cfg, ScriptedTeacher([]), tmp_path)
    records = records_as_written(tmp_path / "accepted.jsonl")
    by_kind = Counter(r["meta"]["kind"] for r in records)
    assert by_kind["mismatch"] >= 10 and by_kind["near_miss"] >= 5 and by_kind["irrelevance"] >= 5
    assert by_kind["single"] >= 10
    # only a request that does not state its values is rejected; no refusal is
    assert set(stats["reject_reasons"]) <= {"request_missing_value"}
    sources = {r["meta"]["source"] for r in records if r["meta"]["kind"] == "single"}
    for r in records:
        meta = r["meta"]
        if meta["kind"] == "single":
            assert _calls_of(r)
            continue
        assert r["messages"][-1] == {"role": "assistant", "content": tu.REFUSAL}
        assert meta["answer_source"] == "code" and meta["request_source"] == "bfcl"
        if meta["kind"] == "mismatch":
            item = items[meta["source"]]
            assert not bfcl.is_reserved(meta["source"], 0.1) and meta["source"] not in sources
            assert meta["tools_source"] == "other_items"
            assert r["messages"][0]["content"] == item["question"][0][-1]["content"]
            offered = {t["function"]["name"] for t in r["tools"]}
            assert offered and not offered & {bfcl.tool_name(fn["name"]) for fn in item["function"]}
        if meta["kind"] == "near_miss":
            item = items[meta["source"]]
            assert not bfcl.is_reserved(meta["source"], 0.1) and meta["tools_source"] == "own_distractors"
            assert r["messages"][0]["content"] == item["question"][0][-1]["content"]
            # BFCL's ground truth names the functions that serve the request: none is offered
            called = {bfcl.tool_name(name) for truth in bfcl.bfcl_answers(_category(item["id"]))[item["id"]]
                      for name in truth}
            offered = {t["function"]["name"] for t in r["tools"]}
            assert offered and offered <= {bfcl.tool_name(fn["name"]) for fn in item["function"]} - called


@pytest.mark.parametrize("kind", ["mismatch", "near_miss"])
def test_kinds_that_take_bfcl_requests_without_them_are_refused_naming_the_key(kind):
    cfg = tu.Config(count=4, requests="paraphrase", mix={"single": 0.5, kind: 0.5})
    with pytest.raises(ValueError, match=f"mix: {kind} .* generate.tool_use.requests: bfcl"):
        tu.sample_prompts(cfg, random.Random(0))


def _category(item_id: str) -> str:
    """The BFCL category file an item id comes from (ids are '<category>_<n>')."""
    return next(c for c in bfcl.CATALOGUE_FILES if item_id.rsplit("_", 1)[0] == c)


class ScriptedTeacher:
    """A stand-in engine that writes the given request texts, in turn, and answers
    every request with plain text (no call)."""

    name, model = "scripted", "scripted-teacher"

    def __init__(self, requests):
        self.requests = list(requests)

    def chat(self, conversations, sampling, tools=None):
        from pipeline.engines import Completion

        if tools is None:  # the request step
            return [[Completion(self.requests.pop(0), 12, "stop") for _ in range(sampling.n)]
                    for _ in conversations]
        return [[Completion("No function fits.", 4, "stop")] * sampling.n for _ in conversations]


def _one_call_set(**cfg):
    """One single call with a string value: the first seed from 2 whose draw has one."""
    for seed in range(2, 40):
        config = tu.Config(count=1, mix={"single": 1.0}, seed=seed, **cfg)
        prompts = tu.sample_prompts(config, random.Random(seed))
        if prompts and any(isinstance(v, str) for v in prompts[0]["calls"][0]["arguments"].values()):
            return config, prompts[0]
    raise AssertionError("no seed in 2..39 draws a single call with a string value")


def test_a_request_missing_a_value_is_still_rejected_when_code_answers(tmp_path):
    from synth_data import four_steps

    cfg, prompt = _one_call_set(requests="paraphrase", answers="code", request_n=1)
    stats = four_steps.run(tu, cfg, ScriptedTeacher(["Can you help me with this?"]), tmp_path)
    assert stats["accepted"] == 0 and stats["reject_reasons"] == {"request_missing_value": 1}
    (record,) = [json.loads(line) for line in (tmp_path / "rejected.jsonl").open()]
    assert record["meta"]["answer_source"] == "code" and record["meta"]["request_source"] == "paraphrase"


def test_best_of_n_requests_use_the_first_that_states_every_value(tmp_path):
    from synth_data import four_steps

    cfg, prompt = _one_call_set(requests="paraphrase", answers="code", request_n=3)
    full = tu.stated_request(prompt["calls"], prompt["tools"])
    engine = ScriptedTeacher(["Can you help me?", f"Please: {full}", f"Again: {full}"])
    stats = four_steps.run(tu, cfg, engine, tmp_path)
    assert stats["accepted"] == 1
    (record,) = [json.loads(line) for line in (tmp_path / "accepted.jsonl").open()]
    assert record["messages"][0]["content"] == f"Please: {full}"
    assert record["meta"]["request_sample"] == 1 and record["meta"]["request_seed"] == full


def _calls_of(record):
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in record["messages"][-1].get("tool_calls") or []]


@pytest.mark.slow
def test_code_answers_on_bfcl_requests_are_the_sampled_calls_on_the_real_teacher(tmp_path):
    """answers: auto on BFCL's own requests: the teacher answers, every call set also
    gets its code-built answer, and the records say which made each answer; parallel
    and multiple calls come through."""
    from synth_data import four_steps
    from stage_outputs import records_as_written
    from pipeline.engines import CachedEngine, TransformersEngine

    engine = CachedEngine(TransformersEngine("teacher", batch_size=8, threads=1), tmp_path / "cache",
                          progress=False)
    # seed 0: a parallel, a multiple and two irrelevance items, each request stating its values
    cfg = tu.Config(count=4, n=1, max_tokens=48, requests="bfcl", answers="auto",
                    mix={"parallel": 0.4, "multiple": 0.4, "irrelevance": 0.2}, seed=0)
    stats = four_steps.run(tu, cfg, engine, tmp_path / "out")
    accepted = records_as_written(tmp_path / "out" / "accepted.jsonl")
    rejected = records_as_written(tmp_path / "out" / "rejected.jsonl")
    calls = sum(len(json.loads(r["meta"]["expected_calls"])) > 0 for r in accepted + rejected
                if r["meta"]["answer_source"] == "code")
    assert stats["generated"] == 4 + calls  # one teacher answer each, one code answer per call set
    for record in accepted + rejected:
        meta = record["meta"]
        assert meta["request_source"] == "bfcl" and meta["answer_source"] in ("teacher", "code")
        if meta["answer_source"] == "code":
            # correct by construction: only the request check or a duplicate can reject it
            assert record.get("reject_reason") in (None, "request_missing_value", "duplicate_sample")
    kinds = {r["meta"]["kind"] for r in accepted if _calls_of(r)}
    assert {"parallel", "multiple"} <= kinds
    for record in accepted:
        expected = json.loads(record["meta"]["expected_calls"])
        assert _calls_of(record) == expected
        text = "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in expected) or "No tool fits."
        assert tu.match_calls(text, expected, record["tools"]) is None
        assert tu._request_mentions(record["messages"][0]["content"], expected)
    # the teacher's wrong answers stay as rejected samples (the preference pairs' losers)
    assert all(r["meta"]["answer_source"] == "teacher" for r in rejected
               if r["reject_reason"] not in ("request_missing_value", "duplicate_sample"))
    # counts conserved; only a record the teacher had no part in (BFCL's request, the
    # code's answer) carries no sampling parameters
    assert stats["accepted"] + stats["rejected"] == stats["generated"] == len(accepted) + len(rejected)
    assert all(r["reject_reason"] in tu.REJECT_REASONS + ("duplicate_sample",) for r in rejected)
    assert len({r["id"] for r in accepted}) == len(accepted)
    assert all((r["meta"]["sampling"] is None) == (r["meta"]["answer_source"] == "code")
               for r in accepted + rejected)


@pytest.mark.slow
def test_paraphrased_requests_state_every_value_on_the_real_teacher(tmp_path, teacher_dir):
    """requests: paraphrase: the teacher rewrites a request code stated; an accepted
    record's request is the teacher's text and states every sampled value."""
    from synth_data import four_steps
    from stage_outputs import records_as_written
    from pipeline.engines import CachedEngine, TransformersEngine

    engine = CachedEngine(TransformersEngine("teacher", batch_size=8, threads=1), tmp_path / "cache",
                          progress=False)
    cfg = tu.Config(count=4, request_n=3, request_max_tokens=48, requests="paraphrase", answers="code",
                    mix={"single": 1.0}, seed=0)
    stats = four_steps.run(tu, cfg, engine, tmp_path / "out")
    assert stats["generated"] == 4  # code answers only: one per call set
    accepted = records_as_written(tmp_path / "out" / "accepted.jsonl")
    assert accepted, stats
    for record in accepted + records_as_written(tmp_path / "out" / "rejected.jsonl"):
        meta = record["meta"]
        assert meta["request_source"] == "paraphrase" and meta["answer_source"] == "code"
        assert meta["request_seed"] and 0 <= meta["request_sample"] < 3
    for record in accepted:
        expected = json.loads(record["meta"]["expected_calls"])
        assert _calls_of(record) == expected
        assert record["messages"][0]["content"] != record["meta"]["request_seed"]  # the teacher's words
        assert tu._request_mentions(record["messages"][0]["content"], expected)
