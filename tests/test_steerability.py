"""Steerability: every constraint validator accepts what it asks for and rejects what
it forbids (hand-written cases), and the pipeline runs end to end on the real teacher."""

import json
import random

import pytest

from synth_data import constraints
from synth_data.constraints import CONSTRAINTS, check

# kind -> (args, a text that follows the instruction, a text that breaks it)
CASES = {
    "max_words": ({"n": 5}, "Short and sweet here.", "This answer has clearly more than five words in it."),
    "min_words": ({"n": 5}, "This answer has at least five words.", "Too short."),
    "max_sentences": ({"n": 2}, "One. Two!", "One. Two. Three?"),
    "paragraphs": ({"n": 2}, "First part.\n\nSecond part.", "Only one paragraph here."),
    "bullets": ({"n": 3}, "- a\n- b\n* c", "- a\n- b"),
    "numbered_list": ({"n": 3}, "1. a\n2. b\n3) c", "1. a\n2. b\n3. c\n4. d"),
    "json_output": ({}, '```json\n{"title": "Memo", "body": "Hi"}\n```', '{"title": "Memo", "body": '),
    "sections": ({"n": 2}, "SECTION 1\nIntro\nSECTION 2\nEnd", "SECTION 1\nIntro\nSECTION 3\nEnd"),
    "two_responses": ({}, "Answer one.\n******\nAnswer two.", "Answer one.\n***\nAnswer two."),
    "quoted": ({}, '"The whole answer is quoted."', 'The answer "is" partly quoted.'),
    "title": ({}, "<<Spring Memo>>\nBody text.", "Spring Memo\nBody text."),
    "start_phrase": ({"phrase": "Dear team,"}, "  Dear team, the garden opens.", "Hello, dear team, the garden opens."),
    "end_phrase": ({"phrase": "That is all."}, "Meeting at 5. That is all.\n", "That is all. Meeting at 5."),
    "postscript": ({"marker": "P.S."}, "See you soon.\n\nP.S. Bring snacks.", "See you soon. PS bring snacks."),
    "lowercase": ({}, "all lowercase, even 2024.", "Not all lowercase."),
    "uppercase": ({}, "ALL CAPS, EVEN 2024!", "ALL CAPS except this."),
    "max_capital_words": ({"n": 1}, "Only ONE shouted word. I is fine.", "TWO SHOUTED words."),
    "include_keywords": ({"keywords": ["budget", "team"]}, "The team set a Budget.", "The team set a plan."),
    "exclude_keywords": ({"keywords": ["budget", "team"]}, "The crew set a plan.", "The crew set a budget."),
    "keyword_frequency": ({"keyword": "garden", "n": 2}, "Garden talk: the garden grows.", "The gardens grow; one garden."),
    "no_commas": ({}, "No commas here at all.", "Commas, sadly, appear."),
    "placeholders": ({"n": 2}, "Dear [name], see you at [address].", "Dear [name], see you soon."),
    "highlights": ({"n": 2}, "This is *key* and *also key*.", "This is *key* only."),
    "english_only": ({}, "The garden is open to all of us.", "Le jardin est ouvert à tous, où être."),
}


def test_every_constraint_kind_has_hand_written_cases():
    assert len(CONSTRAINTS) >= 20
    assert set(CASES) == set(CONSTRAINTS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_validator_accepts_a_follower_and_rejects_a_breaker(kind):
    args, good, bad = CASES[kind]
    assert check(kind, args, good), f"{kind} rejected {good!r}"
    assert not check(kind, args, bad), f"{kind} accepted {bad!r}"
    assert not check(kind, args, "") or kind in ("max_capital_words",), f"{kind} accepted empty text"


@pytest.mark.parametrize("kind", sorted(CASES))
def test_every_kind_describes_its_sampled_arguments(kind):
    args = CONSTRAINTS[kind].sample(random.Random(1))
    text = constraints.describe(kind, args)
    assert text and all(str(v) in text for v in args.values() if not isinstance(v, list))


def test_sampled_constraints_never_contradict_each_other():
    rng = random.Random(0)
    for _ in range(300):
        chosen = constraints.sample_constraints(rng, 3)
        families = [CONSTRAINTS[c["kind"]].family for c in chosen]
        assert len(families) == len(set(families))
        kinds = {c["kind"] for c in chosen}
        if "json_output" in kinds:
            assert not {"start_phrase", "end_phrase", "lowercase", "no_commas", "max_words"} & kinds


def test_malformed_teacher_output_is_rejected_with_a_reason_never_a_crash():
    from synth_data import steerability as st
    from pipeline.engines import Completion
    from synth_data.four_steps import candidate

    cfg = st.Config(count=1, conversations=0, n=3)
    cons = [{"kind": "json_output", "args": {}}]
    meta = {"seed_id": "p0", "variant": "single", "constraints": cons, "sample": 0}
    outs = [Completion("", 0, "stop"), Completion('{"a": [1, 2', 64, "length"), Completion("not json {", 5, "stop")]
    cands = [candidate([{"role": "user", "content": "x"}], o, {**meta, "sample": i}) for i, o in enumerate(outs)]
    reasons = [c["reject_reason"] for c in st.validate(cands, cfg)]
    assert reasons == ["empty", "truncated", "violates_json_output"]
    assert set(reasons) <= set(st.REJECT_REASONS)


def test_rejection_sampling_keeps_the_best_passing_sample_per_prompt():
    from synth_data import steerability as st
    from pipeline.engines import Completion
    from synth_data.four_steps import candidate

    cfg = st.Config(count=1, conversations=0, n=3, scorer="concise")
    meta = {"seed_id": "p0", "variant": "single", "constraints": [{"kind": "no_commas", "args": {}}]}
    texts = ["A long answer with many many words.", "Short answer.", "Bad, commas."]
    cands = [candidate([{"role": "user", "content": "x"}], Completion(t, 5, "stop"), {**meta, "sample": i})
             for i, t in enumerate(texts)]
    reasons = [c["reject_reason"] for c in st.validate(cands, cfg)]
    assert reasons == ["not_selected", None, "violates_no_commas"]


@pytest.mark.parametrize("kind", sorted(constraints.EDITS))
def test_format_edits_make_a_draft_follow_an_instruction_of_form_keeping_its_words(kind):
    args, _, bad = CASES[kind]
    edited, kinds = constraints.edit([{"kind": kind, "args": args}], bad)
    assert kinds == [kind] and check(kind, args, edited)
    # the teacher's words are all still there, in order (only case and edges changed)
    words = lambda t: " ".join(w.lower() for w in constraints.words(t))  # noqa: E731
    assert words(bad) in words(edited)
    # a draft that already follows the instruction is left alone
    follower = CASES[kind][1]
    assert constraints.edit([{"kind": kind, "args": args}], follower) == (follower, [])


@pytest.mark.slow
def test_finished_drafts_never_fail_an_instruction_of_form_with_format_edits(tmp_path, teacher_dir):
    """format_edits on the packaged teacher: a draft it finished is never rejected for
    an instruction code can apply; a cut-off draft is never edited; meta says what code
    changed."""
    from synth_data import four_steps, steerability as st
    from stage_outputs import records_as_written
    from pipeline.engines import CachedEngine, TransformersEngine

    engine = CachedEngine(TransformersEngine("teacher", batch_size=8, threads=1), tmp_path / "cache",
                          progress=False)
    cfg = st.Config(count=4, conversations=1, turns=2, n=2, max_tokens=64, max_constraints=1, short_drafts=True,
                    format_edits=True, kinds=sorted(constraints.EDITS), seed=1)
    stats = four_steps.run(st, cfg, engine, tmp_path / "out")
    assert_pipeline_output(tmp_path / "out", stats, st.REJECT_REASONS, teacher_dir)
    records = records_as_written(tmp_path / "out" / "accepted.jsonl") + records_as_written(tmp_path / "out" / "rejected.jsonl")
    assert any(r["meta"]["format_edits"] for r in records)
    for r in records:
        # the request asks for brevity (the instructions, when listed, follow it)
        assert all("Keep it short." in m["content"] for m in r["messages"] if m["role"] == "user")
        assert r.get("reject_reason") in (None, "empty", "truncated", "not_selected", "duplicate_sample"), r["reject_reason"]
        assert r["meta"]["answer_source"] == ("teacher+code_edits" if r["meta"]["format_edits"] else "teacher")
        if r.get("reject_reason") == "truncated" and r["meta"]["variant"] == "single":
            assert not r["meta"]["format_edits"]


@pytest.mark.slow
def test_steerability_end_to_end_on_the_real_teacher(tmp_path, teacher_dir):
    """Both variants on the packaged SmolLM2 (transformers engine): counts conserved,
    every rejection has a reason, accepted records load with `datasets` and render
    through the student's chat template."""
    from synth_data import four_steps, steerability as st
    from pipeline.engines import CachedEngine, TransformersEngine

    engine = CachedEngine(TransformersEngine("teacher", batch_size=8, threads=1), tmp_path / "cache",
                          progress=False)
    # Constraints a 135M model can meet in 48 tokens, so something gets accepted.
    cfg = st.Config(count=3, conversations=1, turns=2, n=2, max_tokens=48, max_constraints=1,
                    kinds=["placeholders", "english_only", "exclude_keywords", "max_words"])
    stats = four_steps.run(st, cfg, engine, tmp_path / "out")
    assert_pipeline_output(tmp_path / "out", stats, st.REJECT_REASONS, teacher_dir)
    assert stats["steps"]["sample_prompts"] == 4
    assert stats["generated"] == 3 * 2 + 1


def assert_pipeline_output(out, stats, reasons, teacher_dir):
    """The promises every pipeline's output keeps (shared with test_tool_use)."""
    import datasets
    from transformers import AutoTokenizer

    from pipeline.chat_template import CHATML_TOOLS_TEMPLATE
    from stage_outputs import records_as_written

    # Read through the record contract; a rejected record's reason is a failed validator's.
    accepted, rejected = records_as_written(out / "accepted.jsonl"), records_as_written(out / "rejected.jsonl")
    assert all(v["passed"] for r in accepted for v in r["meta"]["validators"].values())
    assert all(r["reject_reason"] in {v["reason"] for v in r["meta"]["validators"].values() if not v["passed"]}
               for r in rejected)
    saved = json.loads((out / "stats.json").read_text())
    assert saved["generated"] == stats["generated"] == len(accepted) + len(rejected)
    assert all(r["reject_reason"] in reasons + ("empty", "truncated") for r in rejected)
    assert sum(saved["reject_reasons"].values()) == len(rejected)
    assert all(r["meta"]["teacher"] and r["meta"]["sampling"] and "scores" in r["meta"] for r in accepted + rejected)
    assert len({r["id"] for r in accepted}) == len(accepted)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    for path, records in (("accepted", accepted), ("rejected", rejected)):
        if records:
            ds = datasets.load_dataset("json", data_files=str(out / f"{path}.jsonl"), split="train")
            assert len(ds) == len(records)
    for record in accepted:
        text = tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"),
                                             chat_template=CHATML_TOOLS_TEMPLATE, tokenize=False)
        assert text.count("<|im_start|>assistant") >= 1 and text.rstrip().endswith("<|im_end|>")
