"""Dedup and decontamination: exact and near duplicates are removed within and across
pipelines, records that copy held-out evaluation items are dropped, and every input
record ends up either kept or in removed.jsonl with its reason. Test records carry a
real needle record's meta (validators and all) with the texts each test needs."""

import copy
import json
import subprocess
import sys

import pytest
from stage_outputs import needle_records

from pipeline.contract import make_record, write_records
from pipeline.records import read_jsonl, write_jsonl
from synth_data.dedup import Decontaminator, dedup, find_duplicates

BASE = ("The community garden opens on Saturday morning with free seedlings, a short talk on "
        "composting and a picnic for every volunteer who helped build the raised beds last spring.")


@pytest.fixture(scope="module")
def needle(tmp_path_factory):
    [record] = needle_records(tmp_path_factory.mktemp("needle"), 1)
    return record


@pytest.fixture
def rec(needle):
    def make(pipeline, text, user="Write a note."):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return make_record(pipeline, messages, copy.deepcopy(needle["meta"]))

    return make


def test_exact_duplicates_ignore_case_punctuation_and_spacing(rec):
    records = [rec("a", BASE), rec("a", BASE.upper().replace(",", "") + "  "), rec("a", "Something else entirely.")]
    assert find_duplicates(records) == {1: ("duplicate", 0, 1.0)}


def test_near_duplicates_are_found_and_distinct_texts_kept(rec):
    # Counted by hand: "Write a note." + BASE is 3 + 29 = 32 words, so 28 word 5-grams,
    # all distinct. Saturday -> Sunday (word 9) changes the 5 that hold it: 23 shared,
    # 28 + 5 in the union, Jaccard 23 / 33.
    near = BASE.replace("Saturday", "Sunday")
    other = "Quarterly revenue grew by four percent while operating costs stayed flat across all regions."
    a, b = rec("a", BASE), rec("a", near)
    assert len(BASE.split()) == 29 and BASE.split()[5] == "Saturday"
    sim = 23 / 33
    found = find_duplicates([a, b, rec("a", other)], threshold=0.69)
    assert found == {1: ("near_duplicate", 0, round(sim, 4))}
    assert find_duplicates([a, b], threshold=0.70) == {}


def test_decontamination_matches_ngrams_and_short_items_whole():
    d = Decontaminator(["What is the weather like in Boston today?", BASE], n=8)
    # The 8-word item matches whole, case and punctuation aside.
    assert d.match("Tell me: what is the weather like in Boston today, please") == \
        "what is the weather like in boston today"
    # The first 8 words of this text are 8 consecutive words of BASE.
    assert d.match("A picnic for every volunteer who helped build the raised beds.") == \
        "a picnic for every volunteer who helped build"
    assert d.match("The weather in Boston is mild.") is None


def test_dedup_across_pipelines_conserves_counts(rec):
    inputs = {"steerability": [rec("steerability", BASE), rec("steerability", "Unique one.")],
              "tool_use": [rec("tool_use", BASE), rec("tool_use", "What is the weather like in Boston today?")]}
    kept, removed, stats = dedup(inputs, Decontaminator(["what is the weather like in Boston today"], n=13))
    assert [r.reject_reason for r in removed] == ["duplicate", "contaminated"]
    assert removed[0].meta.dedup["duplicate_of"] == inputs["steerability"][0].id
    assert stats["input"] == 4 and stats["kept"] == 2
    assert stats["removed"] == {"duplicate": 1, "contaminated": 1}
    assert [len(kept[n]) for n in sorted(kept)] == [2, 0]


def test_dedup_stage_writes_kept_and_removed_files(rec, needle, tmp_path):
    root = tmp_path / "synth"
    write_records(root / "steerability" / "accepted.jsonl", [rec("steerability", BASE), rec("steerability", BASE)])
    write_records(root / "tool_use" / "accepted.jsonl", [rec("tool_use", "Fine.")])
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"question": "Fine."}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dedup:\n  heldout_files: [{heldout}]\n  bfcl_heldout: true\n")
    out = tmp_path / "dedup"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "dedup", str(recipe), "--input", str(root),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "dedup_stats.json").read_text())
    assert stats["input"] == 3 and stats["kept"] == 2 and stats["removed"] == {"duplicate": 1}
    assert stats["heldout_items"] > 1  # BFCL held-out slice + the file (too short to match)
    assert len(read_jsonl(out / "removed.jsonl")) == 1 and len(read_jsonl(out / "accepted" / "steerability.jsonl")) == 1

    recipe.write_text("dedup:\n  heldout_files: [/nonexistent.jsonl]\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "dedup", str(recipe), "--input", str(root),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "/nonexistent.jsonl: no such file" in proc.stderr

    # Dedup reads through the record contract: a record without validators is named.
    broken = copy.deepcopy(needle)
    del broken["meta"]["validators"]
    write_jsonl(root / "needle" / "accepted.jsonl", [needle, broken])
    recipe.write_text("dedup:\n  bfcl_heldout: false\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "dedup", str(recipe), "--input", str(root),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"needle/accepted.jsonl:2: record '{needle['id']}': meta.validators: Field required" in proc.stderr
