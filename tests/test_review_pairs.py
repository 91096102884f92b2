"""Human review of preference pairs: the pairs `posttrain prefs` really writes (the
session's steerability and tool_use outputs -> dedup -> prefs with code-built rejected
answers, tests/test_prefs.py's fixtures) go to a real local Argilla server and come back
through the same buckets as SFT records: pushing twice adds nothing, reviewers who
disagree send a pair to the disputed bucket instead of either answer winning, a swap
exchanges chosen and rejected, counts are conserved, and without a server every pair
is accepted automatically, as the DAG's dpo stage then trains on them."""

import argparse
import copy
import html
import json
import uuid

import pytest
from test_prefs import code_rejected_run, prefs_run  # noqa: F401  (fixtures)
from test_review import argilla, free_port, prefix, sdk, submit  # noqa: F401  (argilla, sdk: fixtures)

from posttrain.cli import main as posttrain
from pipeline.contract import check_pair
from pipeline.records import read_json, read_jsonl, write_jsonl
from review import pull, push, server
from review.dataset import render_conversation

pytestmark = pytest.mark.slow  # the pairs need the session's teacher-generated outputs
needs_server = pytest.mark.skipif(
    not (server.SERVER_VENV / "bin" / "python").exists(), reason=".venv-argilla missing: run `make setup`"
)
BUCKETS = ("accepted", "rejected", "corrected", "disputed", "pending")


@pytest.fixture
def pairs(code_rejected_run):  # noqa: F811
    """(path, pairs): prefs' real pairs.jsonl and its pairs, as prefs wrote them, from
    the run that also builds rejected tool_use answers by code: sampled pairs alone hang
    on whether the teacher's two samples of one prompt split (the session's four tool_use
    prompts gave one pair after the BFCL dev slice changed the draw)."""
    path = code_rejected_run / "pairs.jsonl"
    found = read_jsonl(path)
    stats = read_json(path.parent / "prefs_stats.json")
    assert len(found) >= 2, f"prefs made {len(found)} pair(s); these tests need two: {stats}"
    return str(path), found


def recipe(tmp_path, **review) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("review:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in review.items()))
    return str(path)


def ns(recipe_path: str, pairs_path: str, out=None, overrides=()) -> argparse.Namespace:
    return argparse.Namespace(recipe=recipe_path, overrides=list(overrides), input=None, pairs=[pairs_path],
                              out=str(out) if out else None)


def counts(stats: dict) -> tuple[int, ...]:
    return tuple(stats[b] for b in BUCKETS)


@needs_server
def test_push_twice_holds_each_pair_once_showing_prompt_chosen_rejected(
    argilla, sdk, pairs, tmp_path, capsys,  # noqa: F811
):
    path, found = pairs
    name = prefix()
    settings = recipe(tmp_path, mode="server", dataset_prefix=name, batch_size=1)
    assert push.main(ns(settings, path)) == 0
    assert f"pushed {len(found)} pairs" in capsys.readouterr().out
    assert push.main(ns(settings, path)) == 0
    assert "pushed 0 pairs" in capsys.readouterr().out

    by_pipeline = {p: {x["id"]: x for x in found if x["pipeline"] == p} for p in {x["pipeline"] for x in found}}
    for pipeline, expected in by_pipeline.items():
        dataset = sdk.datasets(f"{name}-pairs-{pipeline}", workspace="posttrain")
        held = list(dataset.records())
        assert sorted(r.id for r in held) == sorted(expected)
        for record in held:
            pair = expected[record.id]
            for field in ("prompt", "chosen", "rejected"):
                # Escaped for the UI (which drops tag-shaped text): it shows the exact text.
                shown = [{"role": t.role, "content": html.unescape(t.content)} for t in record.fields[field]]
                assert shown == render_conversation(getattr(check_pair(pair), field)), field
            assert pair["rejected"][0]["content"] in html.unescape(record.fields["rejected"][0].content)
            assert (record.fields.get("tools") is not None) == bool(pair.get("tools"))
            assert record.metadata["rejected_reason"] == pair["meta"]["rejected_reason"]
        assert {q.name for q in dataset.settings.questions} == {"verdict", "swap"}
    # The SFT records' datasets are another layout: pairs never land in them.
    assert sdk.datasets(f"{name}-{found[0]['pipeline']}", workspace="posttrain") is None


@needs_server
def test_reviewers_dispute_and_swap_pairs_and_every_pair_ends_in_one_bucket(argilla, sdk, pairs, tmp_path):  # noqa: F811
    import argilla as rg

    path, found = pairs
    name = prefix()
    settings = recipe(tmp_path, mode="server", dataset_prefix=name, unreviewed="pending")
    assert push.main(ns(settings, path)) == 0
    gone, swapped = found[0], found[1]
    dataset = sdk.datasets(f"{name}-pairs-{gone['pipeline']}", workspace="posttrain")
    me = sdk.me.id
    # One reviewer accepts the first pair, a second rejects it: disputed, neither wins.
    submit(dataset, gone["id"], me, verdict="accept")
    second = rg.User(username=f"rev{uuid.uuid4().hex[:6]}", password=uuid.uuid4().hex, role="annotator",
                     client=sdk).create()
    second.add_to_workspace(sdk.workspaces("posttrain"))
    submit(dataset, gone["id"], second.id, verdict="reject")
    # The other says the ranking is wrong: the rejected response is the better one.
    dataset = sdk.datasets(f"{name}-pairs-{swapped['pipeline']}", workspace="posttrain")
    submit(dataset, swapped["id"], me, verdict="accept", swap="swap")

    out = tmp_path / "review"
    assert pull.main(ns(settings, path, out)) == 0
    stats = read_json(out / "review_stats.json")
    rest = len(found) - 2
    assert counts(stats) == (0, 0, 1, 1, rest)
    assert stats["total"] == len(found) == sum(counts(stats))
    assert stats["agreement"]["records_with_several_reviewers"] == 1
    assert stats["agreement"]["unanimous_verdict"] == 0

    assert read_jsonl(out / "rejected.jsonl") == []
    [disputed] = read_jsonl(out / "disputed.jsonl")
    assert disputed["id"] == gone["id"] and "reject_reason" not in disputed
    assert disputed["meta"]["review"] == {"decision": "disputed", "by": "human", "reviewers": 2,
                                          "verdicts": {"accept": 1, "reject": 1}, "disputed_on": ["verdict"]}
    assert (disputed["chosen"], disputed["rejected"]) == (gone["chosen"], gone["rejected"])

    [kept] = read_jsonl(out / "reviewed.jsonl")
    assert kept["id"] == swapped["id"]
    assert kept["chosen"] == swapped["rejected"] and kept["rejected"] == swapped["chosen"]
    assert kept["prompt"] == swapped["prompt"] and kept.get("tools") == swapped.get("tools")
    assert kept["meta"]["review"] == {"decision": "corrected", "by": "human", "reviewers": 1,
                                      "verdicts": {"accept": 1}, "swapped_by": str(me), "swaps": 1}
    # The rest of meta is prefs' own record of the code's ranking.
    assert {k: v for k, v in kept["meta"].items() if k != "review"} == swapped["meta"]
    pending = read_jsonl(out / "pending.jsonl")
    assert len(pending) == rest and {p["meta"]["review"]["decision"] for p in pending} <= {"pending"}

    # Unreviewed pairs keep the code's ranking when the recipe says so.
    assert pull.main(ns(settings, path, out, ["review.unreviewed=keep"])) == 0
    stats = read_json(out / "review_stats.json")
    assert counts(stats) == (rest, 0, 1, 1, 0)
    assert len(read_jsonl(out / "reviewed.jsonl")) == len(found) - 1


@needs_server
def test_a_seeded_sample_of_pairs_is_reviewed_and_the_rest_keeps_the_code_ranking(
    argilla, sdk, pairs, tmp_path,  # noqa: F811
):
    path, found = pairs
    name = prefix()
    settings = recipe(tmp_path, mode="server", dataset_prefix=name, sample_per_pipeline=1, unreviewed="pending")
    assert push.main(ns(settings, path)) == 0
    pipelines = {p["pipeline"] for p in found}
    held = sum(len(list(sdk.datasets(f"{name}-pairs-{p}", workspace="posttrain").records())) for p in pipelines)
    assert held == len(pipelines)
    out = tmp_path / "review"
    assert pull.main(ns(settings, path, out)) == 0
    stats = read_json(out / "review_stats.json")
    assert counts(stats) == (len(found) - held, 0, 0, 0, held)


def test_without_a_server_every_pair_is_accepted_automatically(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("ARGILLA_API_KEY", "unused")
    path, found = pairs
    for mode in ("auto", "off"):
        out = tmp_path / mode
        assert posttrain(["review", "pull", recipe(tmp_path, mode=mode), "--pairs", path, "--out", str(out)]) == 0
        stats = read_json(out / "review_stats.json")
        assert counts(stats) == (len(found), 0, 0, 0, 0) and stats["server"] is None, stats
        reviewed = read_jsonl(out / "reviewed.jsonl")
        assert [p["id"] for p in reviewed] == [p["id"] for p in found]
        for pair, original in zip(reviewed, found):
            assert pair["meta"]["review"] == {"decision": "accepted", "by": "automatic", "reason": "no_server"}
            assert (pair["chosen"], pair["rejected"]) == (original["chosen"], original["rejected"])


def test_a_file_that_is_not_pairs_is_one_error_naming_file_and_line(prefs_run, pairs, tmp_path, capsys):  # noqa: F811
    _, found = pairs
    records = str(prefs_run / "synth" / "tool_use" / "accepted.jsonl")
    settings = recipe(tmp_path, mode="off")
    assert posttrain(["review", "pull", settings, "--pairs", records, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"posttrain review pull: error: {records}:1: record '") and "SFT record" in err, err
    assert len(err.splitlines()) == 1

    broken = copy.deepcopy(found[:2])
    del broken[1]["rejected"]
    path = tmp_path / "broken.jsonl"
    write_jsonl(path, broken)
    assert posttrain(["review", "push", settings, "--pairs", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: pair '{broken[1]['id']}': rejected: Field required" in err, err
    assert not (tmp_path / "out").exists()
