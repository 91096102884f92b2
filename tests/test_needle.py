"""Needles in haystacks: records fall inside their length bucket in student tokens,
the answer is the code's (the planted values), each needle occurs once, the filler is
real text, and broken items are rejected with a reason."""

import random
from types import SimpleNamespace

import pytest

from pipeline.contract import read_records
from pipeline import sources
from synth_data import four_steps
from synth_data import needle as nd


# needle.generate makes no teacher call; four_steps.run only reads the engine's name.
NO_TEACHER = SimpleNamespace(name="none", model="none")


@pytest.mark.parametrize("bucket", [1024, 2048, 4096])
def test_records_fall_inside_their_bucket_with_the_planted_answer(tmp_path, bucket):
    cfg = nd.Config(count=3, length_buckets=[bucket])
    stats = four_steps.run(nd, cfg, NO_TEACHER, tmp_path)
    assert stats["accepted"] == 3, stats["reject_reasons"]
    lower, upper = sources.bucket_bounds([bucket])[bucket]
    for record in (r.dump() for r in read_records(tmp_path / "accepted.jsonl")):
        meta, (user, reply) = record["meta"], record["messages"]
        assert set(meta["validators"]) == {"needles_unique", "values_not_in_filler", "length_bucket"}
        assert all(v["passed"] for v in meta["validators"].values())
        assert lower < sources.conversation_tokens(record["messages"]) <= upper
        assert meta["length_bucket"] == bucket and meta["answer_by"] == "code"
        asked = [n["value"] for n in meta["needles"] if n["key"] == meta["query"]]
        assert asked and all(v in reply["content"] for v in asked)
        for n in meta["needles"]:
            assert user["content"].count(nd.needle_sentence(n["key"], n["value"])) == 1


def test_kinds_single_multikey_multivalue():
    cfg = nd.Config(count=3, length_buckets=[1024], needles=3)
    single, multikey, multivalue = nd.sample_prompts(cfg, random.Random(1))
    assert len(single["needles"]) == 1
    assert len({k for k, _ in multikey["needles"]}) == 3  # three keys, one asked for
    assert len({k for k, _ in multivalue["needles"]}) == 1 and len(multivalue["needles"]) == 3
    reply = nd.record_messages(multivalue)[1]["content"]
    assert all(v in reply for _, v in multivalue["needles"])
    # the haystack is real filler text, named by source ids
    assert multikey["filler_ids"] and all("#" in i for i in multikey["filler_ids"])


def test_broken_items_are_rejected_with_a_reason():
    cfg = nd.Config(count=3, kinds=["single"], length_buckets=[1024])
    prompts = nd.sample_prompts(cfg, random.Random(2))
    prompts[0]["filler"].append(nd.needle_sentence(*prompts[0]["needles"][0]))  # needle twice
    prompts[1]["filler"].append(f"Call {prompts[1]['needles'][0][1]} now.")  # value in filler
    prompts[2]["filler"] = prompts[2]["filler"] * 3  # too long for its bucket
    reasons = [c["reject_reason"] for c in nd.validate(nd.generate(prompts, None, cfg), cfg)]
    assert reasons == ["needle_not_unique", "value_in_filler", "out_of_bucket"]


def test_filler_works_without_debian_packages():
    passages = sources.filler_passages("lee") + sources.filler_passages("pydoc")
    assert len(passages) > 1000 and {p["source"] for p in passages} == {"lee", "pydoc"}
    if not sources.fortunes():
        with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
            sources.filler_passages("fortunes")
