"""Document QA: grounded, non-trivial QA pairs pass and ungrounded or trivial ones are
rejected (hand-written cases); malformed teacher output is rejected with a reason;
long-context records fall inside their bucket in student tokens and name the gold
document; the pipeline runs end to end on the real teacher."""

import random

import pytest

from synth_data import doc_qa as dq
from pipeline import sources
from pipeline.engines import Completion
from synth_data.four_steps import candidate

PARAGRAPH = (
    "The Australian Competition and Consumer Commission says it will take legal action against "
    "Telstra over its pricing of broadband services. The commission's chairman, Allan Fels, says "
    "Telstra charged rivals too much for access to its network."
)


@pytest.mark.parametrize("text, reason", [
    ("Question: Who is the chairman of the commission?\nAnswer: Allan Fels", None),
    ("Question: What will the commission take against Telstra?\nAnswer: Legal action.", None),
    # the answer is not in the paragraph
    ("Question: Who is the chairman of the commission?\nAnswer: John Howard, the prime minister", "ungrounded"),
    # the answer only repeats the question
    ("Question: Who charged rivals too much?\nAnswer: charged rivals too much", "trivial"),
    ("Question: Telstra charged rivals.\nAnswer: Telstra", "not_a_question"),
    ("Allan Fels is the chairman.", "unparseable"),
    ('{"question": "Who is the chairman?", "answer": ', "unparseable"),  # invalid JSON
    ("Question: What is it?\nAnswer: What is it? " * 10, "degenerate_repetition"),
])
def test_qa_pairs_must_be_grounded_and_non_trivial(text, reason):
    got, scores, _ = dq.check_qa(text, PARAGRAPH, dq.Config())
    assert got == reason, scores


SENTENCE = "The commission's chairman, Allan Fels, says Telstra charged rivals too much for access to its network."


@pytest.mark.parametrize("text, reason", [
    ("Question: Who is the chairman of the commission?", None),
    ("\nWho says Telstra charged rivals too much?\nAnswer: Allan Fels", None),
    ("Question: Is Allan Fels the chairman of the commission?", "trivial"),  # gives the answer away
    ("Question: Who is Allan. Fels, the chairman?", "trivial"),
    ("Question: Who won the cricket match in Sydney yesterday?", "ungrounded"),
    ("Question: Who is the chairman of Australia?", "ungrounded"),  # one shared word is not enough
    ("Question: How many rivals did the chairman say Telstra charged?", "wrong_answer_type"),
    ("The chairman of the commission.", "not_a_question"),
    ("", "not_a_question"),
])
def test_answer_first_questions_must_fit_the_answer_sentence(text, reason):
    got, scores, qa = dq.check_question(text, "Allan Fels", SENTENCE)
    assert got == reason, scores
    if reason is None:
        assert qa[1] == "Allan Fels"


def test_answer_spans_are_names_and_numbers_from_the_paragraph():
    spans = [s for s, _ in dq.answer_spans(
        "At about 4:00pm a storm hit. The Reserve Bank cut rates by 0.25 per cent, affecting 1,200 people.")]
    assert spans == ["Reserve Bank", "0.25 per cent", "1,200 people"]


def test_answer_first_prompts_carry_a_span_of_the_cited_paragraph():
    for p in dq.sample_prompts(dq.Config(count=5, long_fraction=0), random.Random(1)):
        assert p["span"] in p["span_sentence"] and p["span_sentence"] in p["paragraphs"][p["cited"]]
        assert f'whose answer is "{p["span"]}"' in dq.conversation(p)[-1]["content"]


def test_cloze_prompts_never_show_the_teacher_its_answer():
    """questions: cloze: the teacher sees the answer's sentence with the span blanked,
    so it cannot copy the answer into its question; the validator is answer_first's."""
    prompts = dq.sample_prompts(dq.Config(count=8, long_fraction=0, questions="cloze"), random.Random(1))
    for p in prompts:
        conv = dq.conversation(p)
        shown = "\n".join(turn["content"] for turn in conv[1:])  # the worked example's answer, and the item
        assert p["span"] not in shown and "___" in conv[-1]["content"]
        assert p["span_sentence"].replace(p["span"], "___") in conv[-1]["content"]
        assert dq.EXAMPLE_SPAN not in conv[0]["content"]


def _cand(text, finish="stop", **meta):
    meta = {"paragraphs": [PARAGRAPH], "cited": 0, "seed_ids": {"doc_id": "lee-001"}, **meta}
    return candidate([{"role": "user", "content": "x"}], Completion(text, 9, finish), meta)


def test_malformed_teacher_output_is_rejected_with_a_reason():
    cands = [_cand(""), _cand("Question: Who is the chairman?\nAnswer: Allan", "length"),
             _cand("Question: Who is the chairman?"), _cand("Question: Who is the chairman?\nAnswer: Allan Fels")]
    assert [c["reject_reason"] for c in dq.validate(cands, dq.Config())] == ["empty", "truncated", "unparseable", None]


def test_several_paragraphs_cite_the_paragraph_the_answer_comes_from():
    c = _cand("Question: Who is the chairman?\nAnswer: allan Fels", paragraphs=["Other text here.", PARAGRAPH], cited=1)
    (c,) = dq.validate([c], dq.Config())
    assert c["reject_reason"] is None
    record = dq.post_edit(c, dq.Config()).dump()
    assert record["messages"][0]["content"].startswith("Paragraph 1: Other text here.\n\nParagraph 2: The Australian")
    assert record["messages"][1]["content"] == "Allan Fels (paragraph 2)."
    # grounding is judged against the cited paragraph only
    (wrong,) = dq.validate([_cand("Question: Who is the chairman?\nAnswer: Allan Fels",
                                  paragraphs=[PARAGRAPH, "Other text here."], cited=1)], dq.Config())
    assert wrong["reject_reason"] == "ungrounded"


def test_distractors_are_the_most_similar_documents():
    docs, _ = dq._pool(("lee",))
    gold = 0  # a bushfire report: its nearest neighbours share its vocabulary
    near, far = dq.similar(("lee",), gold)[:5], dq.similar(("lee",), gold)[-5:]
    words = dq.content_words(docs[gold]["text"])
    overlap = lambda i: len(words & dq.content_words(docs[i]["text"]))  # noqa: E731
    assert min(overlap(i) for i in near) > max(overlap(i) for i in far)


@pytest.mark.parametrize("bucket", [1024, 2048, 4096])
def test_long_context_records_fall_inside_their_bucket(bucket):
    cfg = dq.Config(count=2, long_fraction=1.0, length_buckets=[bucket])
    prompts = dq.sample_prompts(cfg, random.Random(bucket))
    lower, upper = sources.bucket_bounds([bucket])[bucket]
    for p in prompts:
        answer = p["paragraphs"][p["cited"]].split(".")[0]
        qa = f"Question: What happened according to the report?\nAnswer: {answer}"
        c = candidate([{"role": "user", "content": "x"}], Completion(qa, 30, "stop"),
                      {"paragraphs": p["paragraphs"], "cited": p["cited"], "seed_ids": {"doc_id": p["doc_id"]},
                       "length_bucket": p["length_bucket"], "context_ids": p["context_ids"]})
        (c,) = dq.validate([c], cfg)
        assert c["reject_reason"] is None, c["scores"]
        record = dq.post_edit(c, cfg).dump()
        tokens = sources.conversation_tokens(record["messages"])
        assert lower < tokens <= upper and record["meta"]["tokens"] == tokens
        assert record["meta"]["length_bucket"] == bucket
        assert p["doc_id"] in p["context_ids"] and len(p["context_ids"]) > 1
        assert f"Document {p['doc_id']}:" in record["messages"][0]["content"]
        assert record["messages"][1]["content"].endswith(f"Source: document {p['doc_id']}.")


def test_a_bucket_larger_than_the_corpus_fails_with_one_clear_error():
    cfg = dq.Config(count=1, long_fraction=1.0, length_buckets=[262144])
    with pytest.raises(ValueError, match="too little for bucket 262144"):
        dq.sample_prompts(cfg, random.Random(0))


@pytest.mark.slow
def test_cloze_questions_on_the_real_teacher_keep_the_code_picked_answer(tmp_path, teacher_dir):
    from test_steerability import assert_pipeline_output

    from stage_outputs import records_as_written
    from synth_data import four_steps
    from pipeline.engines import TransformersEngine

    engine = TransformersEngine("teacher", batch_size=8, threads=1)
    cfg = dq.Config(count=8, long_fraction=0, max_paragraphs=1, max_tokens=48, questions="cloze", seed=3)
    stats = four_steps.run(dq, cfg, engine, tmp_path / "out")
    assert_pipeline_output(tmp_path / "out", stats, dq.REJECT_REASONS, teacher_dir)
    accepted = records_as_written(tmp_path / "out" / "accepted.jsonl")
    assert accepted, stats
    for record in accepted + records_as_written(tmp_path / "out" / "rejected.jsonl"):
        assert record["meta"]["questions"] == "cloze" and record["meta"]["answer_source"] == "code"
    for record in accepted:
        meta = record["meta"]
        # the answer is the span code picked; the teacher's question neither gives it away
        # nor leaves the answer's sentence (answer_first's validator, unchanged)
        assert record["messages"][-1]["content"] == dq.tidy_answer(meta["span"])
        assert dq.check_question(meta["question"], meta["span"], meta["span_sentence"])[0] is None


@pytest.mark.slow
def test_doc_qa_end_to_end_on_the_real_teacher(tmp_path, teacher_dir):
    from test_steerability import assert_pipeline_output

    from pipeline.records import read_jsonl
    from synth_data import four_steps
    from pipeline.engines import TransformersEngine

    engine = TransformersEngine("teacher", batch_size=4, threads=1)
    cfg = dq.Config(count=4, long_fraction=0.5, length_buckets=[1024], max_paragraphs=1, max_tokens=64)
    stats = four_steps.run(dq, cfg, engine, tmp_path / "out")
    assert_pipeline_output(tmp_path / "out", stats, dq.REJECT_REASONS, teacher_dir)
    for record in read_jsonl(tmp_path / "out" / "accepted.jsonl"):
        assert record["meta"]["source"] and record["meta"]["seed_ids"]["doc_id"].startswith("lee-")
        if "length_bucket" in record["meta"]:
            assert 512 < sources.conversation_tokens(record["messages"]) <= 1024
