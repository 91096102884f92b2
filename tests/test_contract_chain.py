"""The record contract holds along the real chain: every pipeline's four-step output →
dedup → push to a real local Argilla → reviewers' decisions → pull → mix.

What each stage promises the next: generation writes every validator's verdict in
`meta.validators` (a rejected record's reason is its failed validator's); the reviewer
sees that verdict, the validators' mean score and their reasons as the suggestion, and
can filter on the reasons; pull puts every record in one bucket; the mix trains on
exactly what review accepted (corrections included) and loses nothing.
"""

import argparse
import statistics

import pytest
from test_review import argilla, prefix, submit  # noqa: F401  (argilla is a fixture)

from stage_outputs import records_as_written
from pipeline.records import read_json, read_jsonl
from review import pull, push, server
from sft import mix
from synth_data import dedup, four_steps

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (server.SERVER_VENV / "bin" / "python").exists(),
                       reason=".venv-argilla missing: run `make setup`"),
]


def ns(recipe, **kw) -> argparse.Namespace:
    return argparse.Namespace(recipe=str(recipe), overrides=[], **kw)


def test_generation_to_mix_keeps_the_contract(pipeline_outputs, argilla, tmp_path):  # noqa: F811
    import argilla as rg

    # ---- generation: every record, accepted or rejected, carries its validators' verdicts.
    generated = {}
    for name in four_steps.PIPELINES:
        accepted = records_as_written(pipeline_outputs / name / "accepted.jsonl")
        rejected = records_as_written(pipeline_outputs / name / "rejected.jsonl")
        assert read_json(pipeline_outputs / name / "stats.json")["generated"] == len(accepted) + len(rejected)
        for record in accepted:
            assert all(v["passed"] for v in record["meta"]["validators"].values()), record["id"]
        for record in rejected:
            failed = {v["reason"] for v in record["meta"]["validators"].values() if not v["passed"]}
            assert record["reject_reason"] in failed, record["id"]
        generated[name] = accepted
    total = sum(len(r) for r in generated.values())
    assert total >= 6 and len(generated["needle"]) == 6

    # ---- dedup (the real stage): kept + removed = accepted.
    name = prefix()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "dedup:\n  bfcl_heldout: false\n"
        f"review:\n  mode: server\n  dataset_prefix: {name}\n  unreviewed: keep\n"
        "mix:\n  eval_fraction: 0.2\n  seed: 1\n"
    )
    out = tmp_path / "dedup"
    assert dedup.main(ns(recipe, input=str(pipeline_outputs), out=str(out))) == 0
    kept = {p.stem: records_as_written(p) for p in sorted((out / "accepted").glob("*.jsonl"))}
    removed = records_as_written(out / "removed.jsonl") if (out / "removed.jsonl").exists() else []
    assert sum(len(r) for r in kept.values()) + len(removed) == total
    inputs = [str(out / "accepted" / f"{p}.jsonl") for p in kept if kept[p]]
    records = {r["id"]: r for group in kept.values() for r in group}

    # ---- push to the real server: the suggestion carries the validators' verdict,
    # mean score and reasons; the reasons are filterable metadata.
    assert push.main(ns(recipe, input=inputs)) == 0
    client = server.argilla_client(argilla[0])
    datasets = {p: client.datasets(f"{name}-{p}", workspace="posttrain") for p in kept if kept[p]}
    seen = {}
    for pipeline, dataset in datasets.items():
        for item in dataset.records(with_suggestions=True):
            seen[item.id] = item
            validators = records[item.id]["meta"]["validators"]
            suggestion = item.suggestions["verdict"]
            scores = [v["score"] for v in validators.values() if v["score"] is not None]
            terms = [f"{n}:{'pass' if v['passed'] else v['reason']}" for n, v in validators.items()]
            assert suggestion.value == "accept"
            assert suggestion.score == (pytest.approx(statistics.mean(scores), abs=1e-4) if scores else None)
            agent = "validators: " + " ".join(terms)  # Argilla caps an agent at 200 characters
            assert suggestion.agent == (agent if len(agent) <= 200 else agent[:197] + "...")
            assert sorted(item.metadata["validator_reasons"]) == sorted(terms)
            if scores:
                assert item.metadata["validator_score"] == pytest.approx(statistics.mean(scores), abs=1e-4)
    assert set(seen) == set(records)
    by_term = {}
    for record in records.values():
        for n, v in record["meta"]["validators"].items():
            by_term.setdefault(f"{n}:pass" if v["passed"] else f"{n}:{v['reason']}", set()).add(record["id"])
    for term, ids in sorted(by_term.items()):
        query = rg.Query(filter=rg.Filter(("metadata.validator_reasons", "==", term)))
        found = {r.id for d in datasets.values() for r in d.records(query=query)}
        assert found == ids, term
    example = next(iter(seen.values()))
    print(f"\nArgilla suggestion for {example.id}: value={example.suggestions['verdict'].value}"
          f" score={example.suggestions['verdict'].score} agent={example.suggestions['verdict'].agent!r}"
          f" metadata={example.metadata}")
    print(f"validator-reason filters checked: {len(by_term)} terms over {len(records)} records")

    # ---- reviewers: one rejects a record, one corrects another (derived from its answer).
    ordered = sorted(records)
    rejected_id, corrected_id = ordered[0], ordered[1]
    correction = f"{records[corrected_id]['messages'][-1].get('content') or ''} (checked by a reviewer)".strip()
    me = client.me.id
    for record_id, answers in ((rejected_id, {"verdict": "reject"}),
                               (corrected_id, {"verdict": "accept", "corrected_answer": correction})):
        submit(datasets[records[record_id]["pipeline"]], record_id, me, **answers)

    # ---- pull: every record in exactly one bucket; reviewed.jsonl is what may train.
    review_out = tmp_path / "review"
    assert pull.main(ns(recipe, input=inputs, out=str(review_out))) == 0
    stats = read_json(review_out / "review_stats.json")
    assert (stats["total"], stats["rejected"], stats["corrected"], stats["pending"]) == (len(records), 1, 1, 0)
    reviewed = records_as_written(review_out / "reviewed.jsonl", trainable=True)
    assert {r["id"] for r in reviewed} == set(records) - {rejected_id}
    [gone] = records_as_written(review_out / "rejected.jsonl")
    assert gone["id"] == rejected_id and gone["reject_reason"] == "human_reject"

    # ---- mix: conserves counts and trains exactly on what review accepted.
    mix_out = tmp_path / "mix"
    assert mix.main(ns(recipe, input=[str(review_out / "reviewed.jsonl")], out=str(mix_out))) == 0
    mix_stats = read_json(mix_out / "mix_stats.json")
    placed = {part: read_jsonl(mix_out / f"{part}.jsonl") for part in ("train", "eval", "unused")}
    assert mix_stats["input"] == len(reviewed) == sum(len(p) for p in placed.values())
    assert sorted(r["id"] for p in placed.values() for r in p) == sorted(r["id"] for r in reviewed)
    by_id = {r["id"]: r for r in reviewed}
    for record in placed["train"] + placed["eval"]:
        assert record["messages"] == by_id[record["id"]]["messages"]
        assert record["meta"]["review"]["decision"] in ("accepted", "corrected")
    corrected = next(r for p in placed.values() for r in p if r["id"] == corrected_id)
    assert corrected["messages"][-1] == {"role": "assistant", "content": correction}
    assert rejected_id not in {r["id"] for p in placed.values() for r in p}
