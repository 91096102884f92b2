"""Table QA: answers are computed by pandas from the table as shown, a verbalisation
that drops a value the answer needs is rejected, malformed teacher output is rejected
with a reason, and the pipeline runs end to end on the real teacher."""

import random

import pandas as pd
import pytest

from synth_data import table_qa as tq
from pipeline.engines import Completion
from synth_data.four_steps import candidate


class Picks(random.Random):
    """A seeded Random whose `choice` first returns the given items (to pick a
    question kind); everything else stays random."""

    def __init__(self, *picks):
        super().__init__(0)
        self.picks = list(picks)

    def choice(self, seq):
        if self.picks and self.picks[0] in seq:
            return self.picks.pop(0)
        return super().choice(seq)


TABLE = pd.DataFrame({"units": ["12", "30", "7.5"], "town": ["Leeds", "York", "Bath"]},
                     index=["shop 1", "shop 2", "shop 3"])
CUT = {"table": TABLE, "noun": "shop", "numeric": ["units"]}


@pytest.mark.parametrize("op, expected", [
    ("sum", "12 + 30 + 7.5 = 49.5. The total units is 49.5."),
    ("mean", "(12 + 30 + 7.5) / 3 = 16.5. The average units is 16.5."),
    ("max", "The highest units is 30."),
    ("argmin", "shop 3 has the lowest units, 7.5."),
])
def test_aggregation_answers_are_computed_by_pandas(op, expected):
    qa = tq.ask("aggregation", CUT, Picks("units", op))
    assert qa["answer"] == expected
    assert set(qa["needed"]) >= {"12", "30", "7.5"}


def test_attribution_names_the_supporting_rows_and_needs_every_row():
    qa = tq.ask("attribution", CUT, Picks("units", "7.5"))
    assert qa["support"] == ["shop 1", "shop 2"]
    assert "shop 1 (12)" in qa["answer"] and "shop 2 (30)" in qa["answer"] and "shop 3" not in qa["answer"]
    assert {"shop 1", "shop 2", "shop 3", "12", "30", "7.5"} <= set(qa["needed"])


def test_the_worked_example_is_verbalised_by_code_from_other_rows():
    example = pd.DataFrame({"units": ["4", "9"], "town": ["Hull", "Ely"]}, index=["shop 7", "shop 9"])
    assert tq.example_paragraph(example) == "Shop 7 has a units of 4 and a town of Hull. Shop 9 has a units of 9 and a town of Ely."


def test_prompts_come_from_real_tables_and_are_seeded():
    cfg = tq.Config(count=6, tables=["iris", "wine", "diabetes", "breast_cancer", "linnerud"])
    first = tq.sample_prompts(cfg, random.Random(3))
    assert first == tq.sample_prompts(cfg, random.Random(3))
    assert {p["question_type"] for p in first} == set(tq.QUESTION_TYPES)
    for p in first:
        # every needed value is a cell (or row name) of the table shown to the teacher
        assert all(v in p["table_markdown"] for v in p["needed"]), p
        assert p["seed_ids"]["dataset"] in tq.sources.SKLEARN_TABLES and p["seed_ids"]["rows"]
        assert not set(p["example_labels"]) & set(p["needed"])


VERBALISATION = "Shop 1 in Leeds sold 12 units, shop 2 in York sold 30 units and shop 3 in Bath sold 7.5 units."


@pytest.mark.parametrize("text, reason", [
    (VERBALISATION, None),
    (VERBALISATION.replace("7.5", "seven and a half"), "dropped_value"),  # a needed value is gone
    (VERBALISATION.replace("7.5", "7.55"), "dropped_value"),  # 7.5 is not found inside 7.55
    (VERBALISATION.replace("shop 3", "the third shop"), "dropped_value"),  # a needed row name
    ("| shop | units |\n|---|---|\n| shop 1 | 12 |", "copied_table"),
    ("Shop 1 sold 12 units. " * 12, "degenerate_repetition"),
    (VERBALISATION + " Shop 2 also sold 45 cakes.", "invented_value"),  # a number the table lacks
    (VERBALISATION.replace("Shop 1", "Shop 9").replace("shop 2", "shop 1 and shop 2"), "invented_value"),
    (VERBALISATION + " Shop 9 sold 4 units.", "invented_value"),  # copied from the worked example
])
def test_verbalisation_must_keep_every_needed_value_and_invent_none(text, reason):
    needed = ["12", "30", "7.5", "shop 1", "shop 2", "shop 3"]
    got, scores = tq.check_verbalisation(text, needed, tq.facts(TABLE), ["shop 9"])
    assert got == reason, scores
    if reason == "dropped_value":
        assert scores["missing_values"] and scores["coverage"] < 1


def _cands(*completions):
    meta = {"needed_values": ["12", "shop 1"], "question": "What is the units of shop 1?",
            "answer": "The units of shop 1 is 12."}
    conv = [{"role": "user", "content": "facts"}]
    return [candidate(conv, c, dict(meta)) for c in completions]


def test_malformed_teacher_output_is_rejected_with_a_reason():
    cands = _cands(Completion("", 0, "stop"), Completion("   \n", 2, "stop"),
                   Completion("Shop 1 sold 12 units and", 200, "length"),
                   Completion("Shop 1 sold 12 units.", 9, "stop"))
    validated = tq.validate(cands, tq.Config())
    assert [c["reject_reason"] for c in validated] == ["empty", "empty", "truncated", None]
    # Each verdict is recorded in the contract's shape; the reason is the failed validator's.
    assert [c["validators"]["well_formed"]["reason"] for c in validated] == ["empty", "empty", "truncated", None]
    assert validated[3]["validators"]["verbalisation"] == {"passed": True, "score": 1.0, "reason": None}


def test_post_edit_pairs_the_paragraph_with_the_computed_answer():
    (c,) = tq.validate(_cands(Completion("\nAnswer:  Shop 1 sold   12 units. ", 9, "stop")), tq.Config())
    record = tq.post_edit(c, tq.Config()).dump()
    assert record["messages"][0]["content"] == "Shop 1 sold 12 units.\n\nQuestion: What is the units of shop 1?"
    assert record["messages"][1]["content"] == "The units of shop 1 is 12."
    assert {"strip_whitespace", "strip_role_label", "collapse_whitespace"} <= set(record["meta"]["post_edit"])


@pytest.mark.slow
def test_table_qa_end_to_end_on_the_real_teacher(tmp_path, teacher_dir):
    from test_steerability import assert_pipeline_output

    from synth_data import four_steps
    from pipeline.engines import TransformersEngine

    engine = TransformersEngine("teacher", batch_size=4, threads=1)
    cfg = tq.Config(count=3, max_rows=2, max_columns=1, max_tokens=80)
    stats = four_steps.run(tq, cfg, engine, tmp_path / "out")
    assert_pipeline_output(tmp_path / "out", stats, tq.REJECT_REASONS, teacher_dir)
    from pipeline.records import read_jsonl

    for record in read_jsonl(tmp_path / "out" / "accepted.jsonl"):
        meta = record["meta"]
        # the answer is the code's, and every value it needs is in the paragraph shown
        assert record["messages"][-1]["content"] == meta["answer"]
        assert all(tq.mentions(record["messages"][0]["content"], v) for v in meta["needed_values"])
        assert meta["source"].startswith("|")
