"""General conversation: seed instructions from the shipped list and real text;
empty, truncated, looping, role-leaking and echoing answers are rejected with a
reason; the pipeline runs end to end on the real teacher."""

import random

import pytest

from synth_data import chat
from pipeline.engines import Completion
from synth_data.four_steps import candidate

GOOD = "Boil water, lower the egg in gently and cook it for six minutes, then cool it in cold water."


@pytest.mark.parametrize("text, finish, reason", [
    (GOOD, "stop", None),
    ("", "stop", "empty"),
    ("  \n ", "stop", "empty"),
    ("Boil water, lower the egg in gently and", "length", "truncated"),
    ("Boil the egg. " * 20, "stop", "degenerate_repetition"),
    ("Boil it.\nThe egg is ready when it is ready.\nThe egg is ready when it is ready.\n"
     "The egg is ready when it is ready.", "stop", "degenerate_repetition"),
    ("Okay.", "stop", "too_short"),
    ("Boil it for six minutes.<|im_start|>user\nthanks", "stop", "role_leak"),
    ("Boil it for six minutes.\nUser: and then?", "stop", "role_leak"),
    ("How do I boil an egg so that the yolk stays soft?", "stop", "echo"),
])
def test_validator_cases(text, finish, reason):
    conv = [{"role": "user", "content": "How do I boil an egg so that the yolk stays soft?"}]
    (c,) = chat.validate([candidate(conv, Completion(text, 20, finish), {})], chat.Config())
    assert c["reject_reason"] == reason, c["scores"]
    failed = [v["reason"] for v in c["validators"].values() if not v["passed"]]
    assert failed[:1] == ([reason] if reason else [])  # the first failed validator's reason


def test_answers_about_real_text_must_not_invent_numbers():
    source = "Firefighters battled 30 blazes near Sydney; 1,500 people left their homes."
    conv = [{"role": "user", "content": f"Summarise this news report in two sentences.\n\n{source}"}]
    texts = ["About 1,500 people left their homes as firefighters fought 30 blazes near Sydney.",
             "The fires near Sydney killed at least 27 firefighters and 1,500 people fled."]
    cands = [candidate(conv, Completion(t, 20, "stop"), {"source": source}) for t in texts]
    got = chat.validate(cands, chat.Config())
    assert [c["reject_reason"] for c in got] == [None, "invented_number"]
    assert got[1]["scores"]["invented_numbers"] == ["27"]


def test_post_edit_strips_labels_and_whitespace():
    conv = [{"role": "user", "content": "How do I boil an egg?"}]
    (c,) = chat.validate([candidate(conv, Completion(f"\nAssistant: {GOOD}\n", 20, "stop"), {})], chat.Config())
    record = chat.post_edit(c, chat.Config()).dump()
    assert record["messages"][-1]["content"] == GOOD
    assert record["meta"]["post_edit"] == ["strip_whitespace", "strip_role_label"]


def test_seed_instructions_mix_the_shipped_list_and_real_text():
    prompts = chat.sample_prompts(chat.Config(count=60), random.Random(0))
    ids = {p["seed_id"].split("-")[0] for p in prompts}
    assert ids == {"builtin", "lee", "pydoc"}
    assert prompts == chat.sample_prompts(chat.Config(count=60), random.Random(0))
    with pytest.raises(ValueError, match="unknown source"):
        chat.sample_prompts(chat.Config(seeds=["sharegpt"]), random.Random(0))


@pytest.mark.slow
def test_chat_end_to_end_on_the_real_teacher(tmp_path, teacher_dir):
    from test_steerability import assert_pipeline_output

    from synth_data import four_steps
    from pipeline.engines import TransformersEngine

    engine = TransformersEngine("teacher", batch_size=4, threads=1)
    cfg = chat.Config(count=3, seeds=["builtin"], max_tokens=48)
    stats = four_steps.run(chat, cfg, engine, tmp_path / "out")
    assert_pipeline_output(tmp_path / "out", stats, chat.REJECT_REASONS, teacher_dir)
    assert stats["generated"] == 3
