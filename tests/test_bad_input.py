"""Bad input at every stage: one line on stderr, `posttrain STAGE: error: ...`, exit 2,
no traceback, naming the file and line, the record, the key or the folder — and the
stage's previous outputs left exactly as they were.

One table: each row is a subcommand, a kind of bad input, what the message must
name, and the output that must survive. Each run goes through the real CLI entry
point (`posttrain.cli.main`) with the real stage code; every check that can happen
before a model is built or data is generated happens there, so these runs are quick.
"""

import json
import shutil
from pathlib import Path

import pytest

from posttrain.cli import main as posttrain

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
SENTINEL = "previous output, must survive\n"


@pytest.fixture(scope="module")
def good_record(tmp_path_factory) -> dict:
    """A record as the stages really write it: a needle record after review pull."""
    from pipeline.records import read_jsonl, write_jsonl
    from stage_outputs import needle_records

    root = tmp_path_factory.mktemp("good")
    write_jsonl(root / "accepted.jsonl", needle_records(root / "needle", 1, (512,)))
    assert posttrain(["review", "pull", str(RECIPE), "--set", "review.mode=off", "--input",
                      str(root / "accepted.jsonl"), "--out", str(root / "review")]) == 0
    return read_jsonl(root / "review" / "reviewed.jsonl")[0]


def inputs(ws: Path, good: dict) -> dict[str, Path]:
    """The bad files every row draws from (each bad line follows a good record), plus a
    folder that is not a model."""
    GOOD = good
    files = {
        "missing": ws / "nope" / "missing.jsonl",
        "empty": ws / "empty.jsonl",
        "broken": ws / "broken.jsonl",
        "shape": ws / "shape.jsonl",
    }
    files["empty"].write_text("")
    files["broken"].write_text(json.dumps(GOOD) + "\n" + '{"id": "b2", "messages": [\n')
    files["shape"].write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "odd-2", "messages": "hello"}) + "\n")
    files["list"] = ws / "list.json"
    files["list"].write_text("[1, 2]\n")
    notmodel = ws / "notmodel"
    notmodel.mkdir()
    (notmodel / "config.json").write_text('{"hidden_size": 8}')
    files["notmodel"] = notmodel
    # dedup reads <folder>/<pipeline>/accepted.jsonl
    for kind in ("broken", "shape"):
        folder = ws / f"synth-{kind}" / "chat"
        folder.mkdir(parents=True)
        shutil.copy(files[kind], folder / "accepted.jsonl")
    return files


def gate(ws: Path, scores: Path) -> list[str]:
    return ["gate", str(RECIPE), "--before", str(scores), "--after", str(scores), "--audit", str(ws / "nope.json"),
            "--report", str(ws / "out" / "eval_report.json"), "--out", str(ws / "out")]


def rows():
    """(id, argv builder, words the message must contain, output file that must survive)."""
    R = str(RECIPE)
    train = lambda f: ["train", R, "--set", f"data.train=[{f}]", "--set", "data.eval=[]", "--output-dir"]  # noqa: E731
    table = [
        ("teacher-wrong-type", lambda ws, f: ["teacher", R, "--set", "teacher.batch_size=many",
                                             "--manifest", str(ws / "out" / "teacher.json")],
         ["teacher.batch_size"], "out/teacher.json"),
        ("teacher-missing-recipe", lambda ws, f: ["teacher", str(ws / "nope.yaml"), "--manifest", str(ws / "out" / "teacher.json")],
         ["nope.yaml", "no such file"], "out/teacher.json"),
        ("generate-wrong-type", lambda ws, f: ["generate", "tool_use", R, "--set", "generate.tool_use.count=-3",
                                              "--out", str(ws / "out")],
         ["generate.tool_use.count"], "out/accepted.jsonl"),
        ("dedup-missing", lambda ws, f: ["dedup", R, "--input", str(ws / "nope"), "--out", str(ws / "out")],
         ["nope"], "out/dedup_stats.json"),
        ("dedup-broken-line", lambda ws, f: ["dedup", R, "--input", str(ws / "synth-broken"), "--out", str(ws / "out")],
         ["accepted.jsonl:2", "not valid JSON"], "out/dedup_stats.json"),
        ("dedup-wrong-shape", lambda ws, f: ["dedup", R, "--input", str(ws / "synth-shape"), "--out", str(ws / "out")],
         ["odd-2", "messages"], "out/dedup_stats.json"),
        ("dedup-wrong-type", lambda ws, f: ["dedup", R, "--set", "dedup.threshold=high", "--input", str(ws / "synth-shape"),
                                           "--out", str(ws / "out")],
         ["dedup.threshold"], "out/dedup_stats.json"),
        ("mix-missing", lambda ws, f: ["mix", R, "--input", str(f["missing"]), "--out", str(ws / "out")],
         ["missing.jsonl", "no such file"], "out/train.jsonl"),
        ("mix-broken-line", lambda ws, f: ["mix", R, "--input", str(f["broken"]), "--out", str(ws / "out")],
         ["broken.jsonl:2", "not valid JSON"], "out/train.jsonl"),
        ("mix-wrong-shape", lambda ws, f: ["mix", R, "--input", str(f["shape"]), "--out", str(ws / "out")],
         ["odd-2", "messages"], "out/train.jsonl"),
        ("mix-wrong-type", lambda ws, f: ["mix", R, "--set", "mix.eval_fraction=lots", "--input", str(f["shape"]),
                                         "--out", str(ws / "out")],
         ["mix.eval_fraction"], "out/train.jsonl"),
        ("train-missing", lambda ws, f: train(f["missing"]) + [str(ws / "out")],
         ["data.train", "missing.jsonl"], "out/train_metrics.json"),
        ("train-empty", lambda ws, f: train(f["empty"]) + [str(ws / "out")],
         ["empty.jsonl", "no records"], "out/train_metrics.json"),
        ("train-broken-line", lambda ws, f: train(f["broken"]) + [str(ws / "out")],
         ["broken.jsonl:2", "not valid JSON"], "out/train_metrics.json"),
        ("train-wrong-shape", lambda ws, f: train(f["shape"]) + [str(ws / "out")],
         ["shape.jsonl:2", "odd-2", "messages"], "out/train_metrics.json"),
        ("train-wrong-type", lambda ws, f: ["train", R, "--set", "sft.learning_rate=fast", "--output-dir", str(ws / "out")],
         ["sft.learning_rate"], "out/train_metrics.json"),
        ("train-missing-deepspeed", lambda ws, f: train(f["shape"]) + [str(ws / "out"), "--set", "sft.deepspeed=nope.json"],
         ["sft.deepspeed", "nope.json"], "out/train_metrics.json"),
        ("audit-not-a-model", lambda ws, f: ["audit", R, "--model", str(f["notmodel"]), "--out", str(ws / "out")],
         ["notmodel", "config"], "out/fp16_audit.json"),
        ("audit-missing-model", lambda ws, f: ["audit", R, "--model", str(ws / "nope"), "--out", str(ws / "out")],
         ["nope", "no such folder"], "out/fp16_audit.json"),
        ("audit-wrong-type", lambda ws, f: ["audit", R, "--set", "audit.batch_size=two", "--out", str(ws / "out")],
         ["audit.batch_size"], "out/fp16_audit.json"),
        ("export-not-a-model", lambda ws, f: ["export", R, "--model", str(f["notmodel"]), "--out", str(ws / "out")],
         ["notmodel", "config"], "out/export_report.json"),
        ("export-missing-model", lambda ws, f: ["export", R, "--model", str(ws / "nope"), "--out", str(ws / "out")],
         ["nope", "no such folder"], "out/export_report.json"),
        ("export-wrong-type", lambda ws, f: ["export", R, "--set", "export.tolerance=tight", "--model", str(f["notmodel"]),
                                            "--out", str(ws / "out")],
         ["export.tolerance"], "out/export_report.json"),
        ("prefs-missing", lambda ws, f: ["prefs", R, "--synth", str(ws / "nope"), "--dedup", str(ws / "nope"),
                                        "--out", str(ws / "out")],
         ["nope", "steerability", "accepted.jsonl"], "out/pairs.jsonl"),
        ("prefs-wrong-type", lambda ws, f: ["prefs", R, "--set", "prefs.pipelines=[chat]", "--out", str(ws / "out")],
         ["prefs.pipelines"], "out/pairs.jsonl"),
        ("dpo-not-a-model", lambda ws, f: ["dpo", R, "--sft", str(f["notmodel"]), "--pairs", str(f["broken"]),
                                          "--output-dir", str(ws / "out")],
         ["--sft", "notmodel", "config"], "out/dpo_metrics.json"),
        ("dpo-missing-model", lambda ws, f: ["dpo", R, "--sft", str(ws / "nope"), "--pairs", str(f["broken"]),
                                            "--output-dir", str(ws / "out")],
         ["--sft", "nope", "no such folder"], "out/dpo_metrics.json"),
        ("dpo-wrong-type", lambda ws, f: ["dpo", R, "--set", "dpo.beta=high", "--sft", str(f["notmodel"]),
                                         "--output-dir", str(ws / "out")],
         ["dpo.beta"], "out/dpo_metrics.json"),
        ("eval-not-a-model", lambda ws, f: ["eval", R, "--model", str(f["notmodel"]), "--out", str(ws / "out")],
         ["--model", "notmodel", "config"], "out/scores.json"),
        ("eval-missing-model", lambda ws, f: ["eval", R, "--model", str(ws / "nope"), "--out", str(ws / "out")],
         ["nope", "no such folder"], "out/scores.json"),
        ("eval-wrong-type", lambda ws, f: ["eval", R, "--set", "eval.batch_size=many", "--model", "base",
                                          "--out", str(ws / "out")],
         ["eval.batch_size"], "out/scores.json"),
        ("gate-missing", lambda ws, f: gate(ws, f["missing"]), ["missing.jsonl", "no such file"], "out/gate_report.json"),
        ("gate-empty", lambda ws, f: gate(ws, f["empty"]), ["empty.jsonl"], "out/gate_report.json"),
        ("gate-broken", lambda ws, f: gate(ws, f["broken"]), ["broken.jsonl:2", "not valid JSON"], "out/gate_report.json"),
        ("gate-wrong-shape", lambda ws, f: gate(ws, f["list"]), ["list.json", "scores"], "out/gate_report.json"),
        ("gate-wrong-type", lambda ws, f: gate(ws, f["list"]) + ["--set", "gate.max_retention_drop=lots"],
         ["gate.max_retention_drop"], "out/gate_report.json"),
    ]
    for verb in ("push", "pull"):
        out = ["--out", None] if verb == "pull" else []
        guard = "out/reviewed.jsonl"
        for kind, words in (("missing", ["missing.jsonl"]), ("broken", ["broken.jsonl:2", "not valid JSON"]),
                            ("shape", ["odd-2", "messages"])):
            table.append((f"review-{verb}-{kind}",
                          lambda ws, f, verb=verb, kind=kind, out=out: [
                              "review", verb, R, "--set", "review.mode=off", "--input", str(f[kind]),
                              *([out[0], str(ws / "out")] if out else [])],
                          words, guard))
    return table


ROWS = rows()


@pytest.mark.parametrize("argv_of, words, guarded", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line_and_loses_nothing(tmp_path, capsys, good_record, argv_of, words, guarded):
    files = inputs(tmp_path, good_record)
    survivor = tmp_path / guarded
    survivor.parent.mkdir(parents=True, exist_ok=True)
    survivor.write_text(SENTINEL)

    code = posttrain(argv_of(tmp_path, files))
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if ": error: " in line]

    assert code == 2, err
    assert "Traceback" not in err
    assert len(error_lines) == 1 and error_lines[0].startswith("posttrain "), err
    for word in words:
        assert word in error_lines[0], f"{word!r} not named in: {error_lines[0]}"
    assert survivor.read_text() == SENTINEL


def test_verbose_shows_the_traceback_behind_the_line(tmp_path, capsys, good_record):
    files = inputs(tmp_path, good_record)
    code = posttrain(["-v", "mix", str(RECIPE), "--input", str(files["broken"]), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "posttrain mix: error:" in err
