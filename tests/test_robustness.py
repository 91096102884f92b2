"""Arbitrary input never crashes a reader or a validator: property-based tests
(hypothesis). A record reader either returns records or raises InputError naming the
file and line; every pipeline's four steps turn any teacher output, however malformed,
into accepted records or rejections with a reason code from the pipeline's list."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.engines import Completion
from pipeline.records import InputError, read_jsonl
from synth_data import four_steps

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Record-like objects: the contract's keys with arbitrary values, plus anything at all.
RECORDISH = st.fixed_dictionaries(
    {}, optional={"id": JSON, "pipeline": JSON, "messages": JSON, "tools": JSON, "meta": JSON},
) | JSON
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(lines=st.lists(RECORDISH | st.text(max_size=30), max_size=5))
def test_jsonl_reader_returns_objects_or_names_the_bad_line(tmp_path, lines):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(v if isinstance(v, str) else json.dumps(v) for v in lines) + "\n")
    try:
        records = read_jsonl(path)
    except InputError as exc:
        assert str(path) in str(exc) and ":" in str(exc).replace(str(path), "", 1)
    else:
        assert all(isinstance(r, dict) for r in records)


@SETTINGS
@given(records=st.lists(RECORDISH, min_size=1, max_size=4))
def test_train_and_review_readers_name_the_bad_record(tmp_path, records):
    from review.dataset import load_candidates
    from sft.train import load_conversations

    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        for where, problem in load_conversations([str(path)])[1]:
            assert f"{path}:" in where and problem
    except InputError as exc:  # a line that is not a JSON object
        assert f"{path}:" in str(exc)
    try:
        load_candidates([str(path)])
    except InputError as exc:
        assert str(path) in str(exc)


class ScriptedTeacher:
    """Answers every request with the same drawn text: the malformed output under test."""

    name, model = "scripted", "scripted"

    def __init__(self, text: str, finish_reason: str):
        self.text, self.finish_reason = text, finish_reason

    def chat(self, conversations, sampling, tools=None):
        return [[Completion(self.text, len(self.text.split()), self.finish_reason)] * sampling.n
                for _ in conversations]


SMALL = {
    "tool_use": {"count": 2, "n": 1},
    "steerability": {"count": 1, "n": 2, "conversations": 0},
    "table_qa": {"count": 2},
    "doc_qa": {"count": 2, "long_fraction": 0.0},
    "needle": {"count": 1, "length_buckets": [256]},
    "chat": {"count": 2},
}
TEXTS = st.one_of(
    st.text(max_size=200),
    st.sampled_from(['<tool_call>{"name": "f", "arguments": {"x": [1, 2', "<tool_call>null</tool_call>",
                     '{"a": 1}', "```json\n{}\n```", "<|im_start|>assistant\nhi<|im_end|>", "9" * 50]),
)


@pytest.mark.parametrize("name", sorted(four_steps.PIPELINES))
def test_every_pipeline_rejects_malformed_teacher_output_with_a_reason(tmp_path_factory, name, teacher_dir):
    module = four_steps.load_pipeline(name)
    allowed = set(module.REJECT_REASONS) | set(four_steps.COMMON_REASONS)
    cfg = four_steps.validate_config(name, SMALL[name])

    @settings(max_examples=15, deadline=None)
    @given(text=TEXTS, finish=st.sampled_from(["stop", "length"]))
    def check(text, finish):
        out = tmp_path_factory.mktemp(name)
        stats = four_steps.run(module, cfg, ScriptedTeacher(text, finish), out)  # conserves counts
        for record in read_jsonl(out / "rejected.jsonl"):
            assert record["reject_reason"] in allowed
        assert stats["accepted"] + stats["rejected"] == stats["generated"]

    check()
