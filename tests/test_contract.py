"""The contract owns every file that crosses a stage boundary.

Walking dvc.yaml: every output that a later stage, the summary or the plots read has
an entry in pipeline.contract.ARTIFACTS (a model, one reader, one writer); the stage
that writes it calls that writer and every stage that reads it calls that reader,
and no stage reads a JSON file of its own accord. A planted fault in each kind of
artifact (a corrupted line, a missing key) stops the reader with one line naming
the file, the line or key, the id where there is one, and the problem; the same
file read around the contract goes through unnoticed.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
from pathlib import Path
from typing import Iterator

import pytest
from test_dvc_deps import ROOT, closure, entry_modules, module_file

from pipeline import contract
from pipeline.contract import ARTIFACTS
from pipeline.records import InputError, read_json, read_jsonl

# Outputs a later stage depends on without reading them as data.
ORDER_ONLY = {
    ("generate", "models/teacher.json"): "generate takes the teacher from the recipe; the manifest "
                                         "only reruns generation when the teacher changes",
    ("export", "outputs/gate/gate_report.json"): "export only waits for the gate (which exits 1 to "
                                                 "stop the DAG); it reads nothing from the report",
}
# Folders of weights: transformers and PEFT read them, the contract does not type them.
MODEL_FOLDERS = {"outputs/sft/final", "outputs/export/profiles"}
# JSON I/O around the contract that stays: files no stage writes for another.
RAW_READS = {
    ("pipeline.bfcl", "read_jsonl"): "BFCL's own data files (the benchmark, not a stage output)",
    ("pipeline.ifeval_data", "read_jsonl"): "IFEval's own data file",
}
RAW_WRITES = {
    ("evals.gate", "retention.json"): "the retention plot's data (outputs/eval/plots/), read by DVC only; "
                                      "the eval's per-item file of that name is another",
}
RAW_READERS = {"read_json", "read_jsonl", "iter_jsonl", "load"}  # load: json.load
RAW_WRITERS = {"write_json", "write_jsonl", "append_jsonl", "dump"}  # dump: json.dump


# ------------------------------------------------------------------- the DAG
def dvc_stages() -> list[tuple[str, str, list[str], list[str]]]:
    """(name, cmd, deps, outs) of every stage; outs include metrics and plots."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return [(s.addressing, s.cmd, [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                 [o.def_path for o in s.outs]) for s in repo.index.stages]


STAGES = dvc_stages()


def matches(path: str, pattern: str) -> bool:
    """Glob match part by part: `*` stays within one folder name."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, wanted))


def artifact_of(path: str) -> list[str]:
    """The table's patterns for a file, or for the files right inside a folder."""
    return [p for p in ARTIFACTS if matches(path, p) or matches(f"{path}/{Path(p).name}", p)]


def stage_code(cmd: str, deps: list[str]) -> set[str]:
    """The modules a stage runs: its command's imports, and the code dvc.yaml lists
    (evaluate loads its suites by name, which no import shows)."""
    listed = set()
    for dep in deps:
        path = ROOT / dep
        files = [path] if path.suffix == ".py" else sorted(path.rglob("*.py")) if path.is_dir() else []
        listed |= {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for f in files}
    return closure(entry_modules(cmd) | {m for m in listed if module_file(m) is not None})


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def consumers(out: str, producer: str) -> list[str]:
    """Stages whose deps take this output (the file, a folder above it, or one inside it)."""
    return [name for name, _, deps, _ in STAGES if name != producer
            and any(under(out, d) or under(d, out) for d in deps)]


def names_in(modules: set[str]) -> set[str]:
    """Every name the modules use (Name ids, attribute names), the contract itself excluded."""
    found: set[str] = set()
    for module in modules - {"pipeline.contract", "pipeline.records"}:
        for node in ast.walk(ast.parse(module_file(module).read_text())):
            if isinstance(node, ast.Name):
                found.add(node.id)
            elif isinstance(node, ast.Attribute):
                found.add(node.attr)
    return found


def uses(artifact: contract.Artifact, how: str, names: set[str]) -> bool:
    """The stage calls the artifact's reader or writer, and names its model where the
    function serves several (read_report, write_report)."""
    function = getattr(artifact, how).__name__
    return function in names and (function not in ("read_report", "write_report")
                                  or artifact.model.__name__ in names)


# ---------------------------------------------------------------- the table
def test_every_output_another_stage_the_summary_or_the_plots_read_is_in_the_contract():
    from posttrain.summary import GENERATE, REPORTS

    missing = []
    for name, _, _, outs in STAGES:
        for out in outs:
            readers = [c for c in consumers(out, name) if (c.split("@")[0], out) not in ORDER_ONLY]
            if readers and out not in MODEL_FOLDERS and not artifact_of(out):
                missing.append(f"{out} (written by {name}, read by {', '.join(readers)})")
    assert not missing, f"outputs crossing a stage boundary with no contract entry: {missing}"
    for path in [GENERATE, *REPORTS.values()]:  # the summary's reports
        assert path in ARTIFACTS, path


def test_every_contract_entry_is_a_dvc_output():
    outs = [out for *_, stage_outs in STAGES for out in stage_outs]
    for pattern in ARTIFACTS:
        assert any(pattern in artifact_of(out) for out in outs), pattern


def test_every_record_the_mix_writes_is_a_conversation_sft_reads(tmp_path):
    from stage_outputs import needle_records

    for record in needle_records(tmp_path, 2, (512,)):
        contract.Record.model_validate(record)
        contract.Conversation.model_validate(record)


def test_a_parquet_training_file_reads_as_the_same_conversations_as_its_jsonl(tmp_path):
    """A user's data.train may be parquet, tools as JSON text (one Arrow type cannot hold
    every schema): SFT, the audit and the held-out loss read it as the JSONL; a row that
    breaks the contract is named by file and row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fixtures_chat import chat_records

    from pipeline.records import write_jsonl

    records = chat_records(6)
    write_jsonl(tmp_path / "train.jsonl", records)
    table = pa.Table.from_pylist([{"id": r["id"], "messages": r["messages"], "tools": json.dumps(r.get("tools"))}
                                  for r in records])
    pq.write_table(table, tmp_path / "train.parquet")
    jsonl = contract.read_conversations(tmp_path / "train.jsonl")
    parquet = contract.read_conversations(tmp_path / "train.parquet")
    assert any(c.tools for c in jsonl) and any(not c.tools for c in jsonl)
    assert [c.id for c in parquet] == [c.id for c in jsonl] and [c.tools for c in parquet] == [c.tools for c in jsonl]
    # Arrow gives every turn every key of the column (tool_calls: None where a turn has
    # none), which the chat templates read as absent.
    assert [[{k: v for k, v in t.items() if v is not None} for t in c.turns()] for c in parquet] == [
        c.turns() for c in jsonl]
    broken = table.to_pylist()
    broken[1]["messages"] = broken[1]["messages"][:-1][:1]  # a user turn, no answer
    pq.write_table(pa.Table.from_pylist(broken), tmp_path / "broken.parquet")
    with pytest.raises(InputError) as exc:
        contract.read_conversations(tmp_path / "broken.parquet")
    assert f"broken.parquet:row 2: record {records[1]['id']!r}: messages: " in one_line(exc)


@pytest.mark.parametrize("name, cmd, deps, outs", STAGES, ids=[s[0] for s in STAGES])
def test_each_stage_writes_and_reads_its_artifacts_through_the_contract(name, cmd, deps, outs):
    names = names_in(stage_code(cmd, deps))
    problems = []
    for out in outs:
        for pattern in artifact_of(out):
            if not uses(ARTIFACTS[pattern], "write", names):
                problems.append(f"writes {pattern} without {ARTIFACTS[pattern].write.__name__}")
    produced = {out: producer for producer, _, _, stage_outs in STAGES for out in stage_outs}
    for dep in deps:
        crossing = [out for out, producer in produced.items() if producer != name and (under(out, dep) or under(dep, out))
                    and (name.split("@")[0], out) not in ORDER_ONLY and out not in MODEL_FOLDERS]
        patterns = {p for out in crossing for p in artifact_of(out)}
        # A folder dep is read through at least one artifact in it (dedup reads the
        # synthetic records under data/synth, the plots its stats).
        if patterns and not any(uses(ARTIFACTS[p], "read", names) for p in patterns):
            problems.append(f"reads {dep} without the contract's reader ({sorted(patterns)})")
    assert not problems, f"stage {name}: {problems}"


# ------------------------------------------------------------- no way around
def raw_io(module: str, source: str) -> list[str]:
    """JSON reads that bypass the contract, and raw writes of a file the contract owns."""
    owned = {Path(p).name for p in ARTIFACTS}
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if func == "load" and not (isinstance(node.func, ast.Attribute)
                                   and getattr(node.func.value, "id", None) == "json"):
            continue  # only json.load
        if func in RAW_READERS and (module, func) not in RAW_READS:
            found.append(f"{module}:{node.lineno} {func}")
        if func in RAW_WRITERS:
            strings = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            hits = [s for s in strings for o in owned if fnmatch.fnmatchcase(Path(s).name, o)
                    and (module, Path(s).name) not in RAW_WRITES]
            if hits:
                found.append(f"{module}:{node.lineno} {func} {hits[0]}")
    return found


def stage_modules() -> set[str]:
    modules = set().union(*(stage_code(cmd, deps) for _, cmd, deps, _ in STAGES))
    return (modules | {"posttrain.summary", "posttrain.plots"}) - {"pipeline.contract", "pipeline.records"}


def stage_hits(scan) -> list[str]:
    """What `scan(module, source)` finds in every stage module, the summary and the plots."""
    return [hit for m in sorted(stage_modules()) for hit in scan(m, module_file(m).read_text())]


def test_no_stage_reads_json_around_the_contract_or_writes_an_owned_file_raw():
    found = stage_hits(raw_io)
    assert not found, found


def test_the_bypass_check_finds_a_planted_bypass():
    planted = ('import json\nfrom pipeline.records import read_json, write_json\n'
               'gate = read_json("outputs/gate/gate_report.json")\n'
               'write_json(out / "train_metrics.json", metrics)\n'
               'scores = json.load(open("scores.json"))\n')
    assert [hit.split(" ", 1)[1] for hit in raw_io("evals.gate", planted)] == [
        "read_json", "write_json train_metrics.json", "load"]


# ------------------------------------------------ reports are typed objects
REPORT_MODELS = {name for name, obj in vars(contract).items() if isinstance(obj, type)
                 and (issubclass(obj, contract.Report) or obj in (contract.ActivationStats, contract.LossCurve))}
DICT_ACCESS = {"get", "keys", "items", "values", "setdefault", "pop", "update"}


def callee(node: ast.AST) -> str | None:
    """The name a call calls (`f(...)`, `x.f(...)`; `Model.model_validate(...)`: Model)."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "model_validate":
            func = func.value
        return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return None


def dict_reads(function: ast.AST, string_keys: bool = False) -> Iterator[tuple[ast.AST, ast.AST]]:
    """(node, what it reads as a dict) for every `x[...]`, `x.get(...)` (and the other
    dict methods), `... in x` in a function; `string_keys`: only `x["key"]` and
    `"key" in x` (a list's `rows[0]` is no dict read)."""
    for node in ast.walk(function):
        if isinstance(node, ast.Subscript) and (not string_keys or (
                isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str))):
            yield node, node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DICT_ACCESS:
            yield node, node.func.value
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)) and (
                not string_keys or isinstance(node.left, ast.Constant)):
            yield node, node.comparators[0]


def report_indexing(module: str, source: str) -> list[str]:
    """Where a stage treats a report as a dict (`r["key"]`, `r.get("key")`, `"key" in r`,
    `r.items()`): r a name bound, in that function, to what read_report (or a function
    of the module that returns its result) gave, to a report model built there, or a
    parameter annotated with a report model; or such a call itself."""
    tree = ast.parse(source)

    def gives_report(node: ast.AST | None, readers: set[str]) -> bool:
        if isinstance(node, ast.IfExp):
            return gives_report(node.body, readers) or gives_report(node.orelse, readers)
        if isinstance(node, ast.BoolOp):
            return any(gives_report(v, readers) for v in node.values)
        return callee(node) in readers | REPORT_MODELS

    def is_report_type(annotation: ast.AST) -> bool:  # Model or Model | None, not list[Model]
        if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
            sides = (annotation.left, annotation.right)
            return any(map(is_report_type, sides)) and all(
                is_report_type(n) or (isinstance(n, ast.Constant) and n.value is None) for n in sides)
        return isinstance(annotation, ast.Name) and annotation.id in REPORT_MODELS

    readers = {"read_report"}
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in functions:  # helpers that hand back read_report's result (summary._read)
        if any(isinstance(n, ast.Return) and gives_report(n.value, {"read_report"}) for n in ast.walk(function)):
            readers.add(function.name)
    found = []
    for function in functions:
        args = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
        reports = {a.arg for a in args if a.annotation is not None and is_report_type(a.annotation)}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and gives_report(node.value, readers):
                reports |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and (
                    gives_report(node.value, readers) or is_report_type(node.annotation)):
                reports.add(node.target.id)
        for node, target in dict_reads(function):
            if (isinstance(target, ast.Name) and target.id in reports) or gives_report(target, readers):
                found.append(f"{module}:{node.lineno} {ast.unparse(node)[:60]}")
    return sorted(set(found))


def test_no_stage_reads_a_report_as_a_dict():
    """A report reaches a stage as its model: the stage reads attributes the model
    types (a key it left to model_extra is read there, deliberately)."""
    found = stage_hits(report_indexing)
    assert not found, found


def test_the_dict_check_finds_a_planted_dict_read():
    planted = ('def read_scores(path):\n'
               '    scores = read_report(path, EvalScores)\n'
               '    return scores["scores"]\n'
               'def checks(audit: Fp16Audit | None, path):\n'
               '    safe = audit.get("fp16_safe", False)\n'
               '    pointer = read_report(path, ModelPointer)["model"]\n'
               '    stats = _read(path) or {}\n'
               '    return "mode" in stats\n'
               'def _read(path):\n'
               '    return read_report(path, ReviewStats) if path.is_file() else None\n'
               'def fine(path, rows: list[dict]):\n'
               '    maxima = read_report(path, ActivationStats).root\n'
               '    return maxima["mamba"], rows[0]["id"], read_report(path, EvalScores).scores["ifeval"]\n')
    assert [hit.split(" ", 1)[0] for hit in report_indexing("evals.gate", planted)] == [
        "evals.gate:3", "evals.gate:5", "evals.gate:6", "evals.gate:8"]


# -------------------------- records, pairs, prompts, conversations are typed too
ROW_MODELS = {"Record", "Pair", "GrpoPrompt", "Conversation"}
# Calls that give a row, or a list of rows: the contract's readers and builders, and
# the stage functions built on them.
ROW_MAKERS = {"make_record", "check_record", "check_pair", "check_grpo_prompt", "make_pair", "as_grpo_prompt",
              "rejected_by_code", "apply_decision", "post_edit", *ROW_MODELS}
ROWS_READERS = {"read_records", "read_pairs", "read_grpo_prompts", "read_conversations", "load_candidates"}


def row_indexing(module: str, source: str) -> list[str]:
    """Where a stage treats a record, pair, GRPO prompt or conversation as a dict
    (`r["id"]`, `r.get("tools")`, `"meta" in r`): r a name bound to what a row maker
    gives, a parameter annotated with a row model, a loop or lambda variable over a list
    of rows (what a reader or a function annotated so gives, a parameter annotated so,
    a list rows are appended to), or such a list's element itself (`rows[0]["id"]`)."""
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

    def names_in(annotation: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}

    def is_row_type(annotation: ast.AST) -> bool:  # Record, Record | Pair
        if isinstance(annotation, ast.BinOp):
            return is_row_type(annotation.left) and is_row_type(annotation.right)
        return isinstance(annotation, ast.Name) and annotation.id in ROW_MODELS

    def is_rows_type(annotation: ast.AST) -> bool:  # list[Record], dict[str, list[Record | Pair]]
        return isinstance(annotation, ast.Subscript) and bool(names_in(annotation) & ROW_MODELS)

    makers = ROW_MAKERS | {f.name for f in functions if f.returns is not None and is_row_type(f.returns)}
    readers = ROWS_READERS | {f.name for f in functions if f.returns is not None and is_rows_type(f.returns)}

    def is_rows(node: ast.AST, lists: set[str]) -> bool:
        if isinstance(node, ast.BinOp):  # accepted + rejected
            return is_rows(node.left, lists) or is_rows(node.right, lists)
        if isinstance(node, ast.Call) and callee(node) in ("sorted", "enumerate", "reversed", "list") and node.args:
            return is_rows(node.args[0], lists)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values":
            return is_rows(node.func.value, lists)
        if isinstance(node, ast.Subscript):  # rows[:n], by_pipeline[name]
            return is_rows(node.value, lists)
        return (isinstance(node, ast.Name) and node.id in lists) or callee(node) in readers

    def is_row(node: ast.AST, rows: set[str], lists: set[str]) -> bool:
        if isinstance(node, ast.Subscript) and isinstance(node.slice, (ast.Constant, ast.Name, ast.UnaryOp)) and not (
                isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            return is_rows(node.value, lists)  # rows[0], rows[i]
        return (isinstance(node, ast.Name) and node.id in rows) or callee(node) in makers

    found = []
    for function in functions:
        args = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
        rows = {a.arg for a in args if a.annotation is not None and is_row_type(a.annotation)}
        lists = {a.arg for a in args if a.annotation is not None and is_rows_type(a.annotation)}
        for _ in range(3):  # a name bound later in the walk than its use
            for node in ast.walk(function):
                if isinstance(node, ast.Assign):
                    targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
                    if is_row(node.value, rows, lists):
                        rows |= targets
                    elif is_rows(node.value, lists) or isinstance(node.value, (ast.ListComp, ast.List)) and any(
                            is_rows(g.iter, lists) for g in ast.walk(node.value) if isinstance(g, ast.comprehension)):
                        lists |= targets
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    if is_row_type(node.annotation):
                        rows.add(node.target.id)
                    elif is_rows_type(node.annotation):
                        lists.add(node.target.id)
                elif isinstance(node, (ast.For, ast.comprehension)) and is_rows(node.iter, lists):
                    target = node.target
                    if isinstance(target, ast.Tuple):  # for i, r in enumerate(rows)
                        target = target.elts[-1]
                    if isinstance(target, ast.Name):
                        rows.add(target.id)
                elif isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Tuple) and \
                        isinstance(node.iter, ast.Call) and isinstance(node.iter.func, ast.Attribute) and \
                        node.iter.func.attr == "items" and is_rows(node.iter.func.value, lists):
                    value = node.target.elts[-1]  # for name, group in by_pipeline.items()
                    if isinstance(value, ast.Name):
                        lists.add(value.id)
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        node.func.attr == "append" and isinstance(node.func.value, ast.Name) and node.args and \
                        is_row(node.args[0], rows, lists):
                    lists.add(node.func.value.id)  # chosen.append(record)
                elif isinstance(node, ast.Call) and callee(node) in ("sorted", "max", "min") and node.args and \
                        is_rows(node.args[0], lists):
                    for key in node.keywords:  # sorted(rows, key=lambda r: ...)
                        if key.arg == "key" and isinstance(key.value, ast.Lambda):
                            rows |= {a.arg for a in key.value.args.args}
        for node, target in dict_reads(function, string_keys=True):
            if is_row(target, rows, lists):
                found.append(f"{module}:{node.lineno} {ast.unparse(node)[:60]}")
    return sorted(set(found))


def test_no_stage_reads_a_record_pair_prompt_or_conversation_as_a_dict():
    """Records, pairs, GRPO prompts and training conversations reach a stage as their
    models: the stage reads attributes (a pipeline's own meta keys from model_extra)."""
    found = stage_hits(row_indexing)
    assert not found, found


def test_the_row_check_finds_a_planted_dict_read():
    planted = ('def dedup(inputs: dict[str, list[Record]]):\n'
               '    for name in inputs:\n'
               '        pass\n'
               'def main(path):\n'
               '    for r in read_records(path):\n'
               '        print(r["id"])\n'
               '    pairs = read_pairs(path)\n'
               '    for i, pair in enumerate(pairs):\n'
               '        tools = pair.get("tools")\n'
               '    record = make_record("x", [], {})\n'
               '    return "meta" in record\n'
               'def rank(record: Record) -> tuple:\n'
               '    return record["meta"]["scores"], record.meta.validators["calls"]\n'
               'def fine(rows: list[dict], items):\n'
               '    return rows[0]["id"], [i["id"] for i in items]\n')
    assert [hit.split(" ", 1)[0] for hit in row_indexing("synth_data.prefs", planted)] == [
        "synth_data.prefs:11", "synth_data.prefs:13", "synth_data.prefs:6", "synth_data.prefs:9"]


# An attribute read in a real stage put back as the dict read it replaced.
PLANTED_IN_STAGES = [
    ("synth_data.prefs", "{r.id for r in read_records", '{r["id"] for r in read_records'),
    ("synth_data.dedup", "record_text(r.messages))", 'record_text(r["messages"]))'),
    ("sft.mix", "Counter(r.pipeline for r in chosen)", 'Counter(r["pipeline"] for r in chosen)'),
    ("sft.dpo", "json.dumps(pair.tools) if", 'json.dumps(pair.get("tools")) if'),
    ("review.pull", "original = record.messages[-1]", 'original = record["messages"][-1]'),
    ("synth_data.grpo_prompts", 'p.id = f"heldout-{p.id}"', 'p["id"] = f"heldout-{p.id}"'),
    ("evals.heldout_loss", '"id": record.id,', '"id": record["id"],'),
]


@pytest.mark.parametrize("module, attribute, planted", PLANTED_IN_STAGES, ids=[c[0] for c in PLANTED_IN_STAGES])
def test_the_row_check_finds_a_dict_read_planted_in_a_stage(module, attribute, planted):
    source = module_file(module).read_text()
    assert attribute in source
    assert row_indexing(module, source.replace(attribute, planted, 1))


# ---------------------------------------------------------- planted faults
@pytest.fixture(scope="module")
def specimens(tmp_path_factory) -> dict[str, Path]:
    """One file of each artifact kind: the records and stats the needle chain really
    writes (generate, dedup, review pull, mix) and the DPO-off pointer; the kinds only
    a trained model or a teacher makes here are the smallest data their model takes."""
    import argparse

    from review import pull
    from sft import dpo, mix
    from stage_outputs import needle_records
    from synth_data import dedup

    root = tmp_path_factory.mktemp("specimens")
    records = needle_records(root / "synth" / "needle", 3, (512,))
    recipe = root / "recipe.yaml"
    recipe.write_text("dedup:\n  bfcl_heldout: false\nreview:\n  mode: off\nmix:\n  eval_fraction: 0.34\n")
    ns = lambda **kw: argparse.Namespace(recipe=str(recipe), overrides=[], **kw)  # noqa: E731
    assert dedup.main(ns(input=str(root / "synth"), out=str(root / "dedup"))) == 0
    assert pull.main(ns(input=[str(root / "dedup/accepted/needle.jsonl")], pairs=None, out=str(root / "review"))) == 0
    assert mix.main(ns(input=[str(root / "review/reviewed.jsonl")], out=str(root / "mix"))) == 0
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    dpo.write_pointer(model, root / "dpo")

    made = {
        "records": root / "dedup/accepted/needle.jsonl",
        "conversations": root / "mix/train.jsonl",
        "stats": root / "synth/needle/stats.json",
        "dedup_stats": root / "dedup/dedup_stats.json",
        "review_stats": root / "review/review_stats.json",
        "mix_stats": root / "mix/mix_stats.json",
        "pointer": root / "dpo/final/posttrain_model.json",
        "dpo_metrics": root / "dpo/dpo_metrics.json",
    }
    # A pair of a real record's turns: chosen its answer, rejected another.
    prompt, answer = records[0]["messages"][:-1], records[0]["messages"][-1]
    pair = {"id": "p1", "pipeline": "needle", "prompt": prompt, "chosen": [answer],
            "rejected": [{"role": "assistant", "content": "no idea"}], "meta": {"seed_id": "s1"}}
    contract.write_pairs(root / "pairs.jsonl", [pair, {**pair, "id": "p2"}])
    made["pairs"] = root / "pairs.jsonl"
    grpo_prompt = {"id": "g1", "pipeline": "table_qa", "prompt": prompt, "verifier": {"stated": ["4"]}}
    contract.write_grpo_prompts(root / "grpo_prompts.jsonl", [grpo_prompt, {**grpo_prompt, "id": "g2"}])
    made["grpo_prompts"] = root / "grpo_prompts.jsonl"
    comparison = {"before": 50.0, "after": 40.0, "delta": -10.0, "low": -20.0, "high": 0.0, "p": 0.04,
                  "items": 20, "lower_is_better": False}
    minimal = {
        "train_metrics": (contract.TrainMetrics, {"mode": "lora", "global_step": 2, "first_loss": 9.1,
                                                  "final_loss": 8.7}),
        "activation_stats": (contract.ActivationStats, {"mamba": {"0": 12.5, "1": None}}),
        "loss_curve": (contract.LossCurve, [{"step": 1, "loss": 9.1}, {"step": 2, "loss": 8.7}]),
        "prefs_stats": (contract.PrefsStats, {"pairs": 1, "prompts": 2, "pipelines": {
            "steerability": {"prompts": 2, "pairs": 1, "no_pair": {"all_passed": 1}}}}),
        "fp16_audit": (contract.Fp16Audit, {"fp16_safe": True, "max_abs": 812.0, "offending": []}),
        "scores": (contract.EvalScores, {"model": "base", "engine": "transformers",
                                         "scores": {"ifeval": {"prompt_strict": 40.0}}}),
        "suite_items": (contract.SuiteItems, {"items": [{"id": "ifeval/1", "passed": True},
                                                        {"id": "ifeval/2", "passed": False}]}),
        "eval_report": (contract.EvalReport, {"suites": {}, "comparisons": {"ifeval.prompt_strict": comparison}}),
        "gate_report": (contract.GateReport, {"passed": True, "enforce": True, "off": [], "uninformative": [],
                                              "message": "gate: passed 1 of 1 checks", "checks": [
                                                  {"name": "fp16_safe", "status": "passed", "passed": True,
                                                   "detail": "max |activation| 812"}]}),
        "export_report": (contract.ExportReport, {"kind": "lora", "profiles": {"merged": {"passed": True}}}),
        "grpo_prompt_stats": (contract.GrpoPromptStats, {"prompts": 3, "pipelines": {
            "table_qa": {"sampled": 4, "contaminated": 1, "kept": 3}}}),
        "grpo_metrics": (contract.GrpoMetrics, {"enabled": True, "global_step": 2, "prompts": 6}),
    }
    for kind, (model_class, data) in minimal.items():
        contract.write_report(root / f"{kind}.json", model_class, data)
        made[kind] = root / f"{kind}.json"
    return made


JSONL_FAULTS = {  # kind -> (reader, the key a planted fault removes)
    "records": (contract.read_records, "messages"),
    "conversations": (contract.read_conversations, "messages"),
    "pairs": (contract.read_pairs, "chosen"),
    "grpo_prompts": (contract.read_grpo_prompts, "verifier"),
}
REPORT_FAULTS = {  # kind -> (model, the path of the key a planted fault removes)
    # activation_stats has no fixed keys: its fault is a layer's maximum that is text.
    "stats": (contract.GenerateStats, ("accepted",)),
    "dedup_stats": (contract.DedupStats, ("kept",)),
    "review_stats": (contract.ReviewStats, ("pending",)),
    "mix_stats": (contract.MixStats, ("train",)),
    "pointer": (contract.ModelPointer, ("model",)),
    "dpo_metrics": (contract.DpoMetrics, ("enabled",)),
    "train_metrics": (contract.TrainMetrics, ("global_step",)),
    "activation_stats": (contract.ActivationStats, ("mamba", "0")),
    "loss_curve": (contract.LossCurve, ("1", "step")),
    "prefs_stats": (contract.PrefsStats, ("pipelines", "steerability", "pairs")),
    "fp16_audit": (contract.Fp16Audit, ("fp16_safe",)),
    "scores": (contract.EvalScores, ("scores",)),
    "suite_items": (contract.SuiteItems, ("items",)),
    "eval_report": (contract.EvalReport, ("comparisons", "ifeval.prompt_strict", "p")),
    "gate_report": (contract.GateReport, ("checks", "0", "passed")),
    "export_report": (contract.ExportReport, ("profiles",)),
    "grpo_prompt_stats": (contract.GrpoPromptStats, ("pipelines", "table_qa", "kept")),
    "grpo_metrics": (contract.GrpoMetrics, ("enabled",)),
}


def test_every_artifact_kind_has_a_planted_fault_case():
    covered = {reader for reader, _ in JSONL_FAULTS.values()} | {model for model, _ in REPORT_FAULTS.values()}
    for pattern, artifact in ARTIFACTS.items():
        assert (artifact.model if artifact.read is contract.read_report else artifact.read) in covered, pattern


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def plant(data, path: tuple):
    """A copy of the data without the key at `path` (numbers index lists), or, for
    activation stats, with text in its place; and the problem the reader must name."""
    data = copy.deepcopy(data)
    holder = data
    for part in path[:-1]:
        holder = holder[int(part)] if isinstance(holder, list) else holder[part]
    dotted = ".".join(path)
    if path == REPORT_FAULTS["activation_stats"][1]:
        holder[path[-1]] = "huge"
        return data, f"{dotted}: Input should be a valid number"
    del holder[path[-1]]
    return data, f"{dotted}: Field required"


@pytest.mark.parametrize("kind", sorted(JSONL_FAULTS))
def test_a_corrupted_line_is_named_by_file_and_line(specimens, kind, tmp_path):
    read, _ = JSONL_FAULTS[kind]
    lines = specimens[kind].read_text().splitlines()
    bad = tmp_path / specimens[kind].name
    bad.write_text("\n".join([lines[0], lines[1][: len(lines[1]) // 2], *lines[2:]]) + "\n")
    with pytest.raises(InputError) as exc:
        read(bad)
    assert f"{bad}:2: not valid JSON" in one_line(exc)


@pytest.mark.parametrize("kind", sorted(JSONL_FAULTS))
def test_a_missing_key_is_named_by_file_line_id_and_key_and_passes_unseen_around_the_reader(
        specimens, kind, tmp_path):
    read, key = JSONL_FAULTS[kind]
    rows = read_jsonl(specimens[kind])
    del rows[1][key]
    bad = tmp_path / specimens[kind].name
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError) as exc:
        read(bad)
    assert one_line(exc).startswith(f"{bad}:2: ")
    assert repr(rows[1]["id"]) in str(exc.value) and f"{key}: Field required" in str(exc.value)
    assert len(read_jsonl(bad)) == len(rows)  # around the contract: no error, a record without it


@pytest.mark.parametrize("kind", sorted(REPORT_FAULTS))
def test_a_corrupted_report_is_named_by_file_and_line(specimens, kind, tmp_path):
    model, _ = REPORT_FAULTS[kind]
    text = specimens[kind].read_text()
    bad = tmp_path / specimens[kind].name
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(InputError) as exc:
        contract.read_report(bad, model)
    assert f"{bad}:" in one_line(exc) and "not valid JSON" in str(exc.value)


@pytest.mark.parametrize("kind", sorted(REPORT_FAULTS))
def test_a_missing_key_in_a_report_is_named_and_passes_unseen_around_the_reader(specimens, kind, tmp_path):
    model, path = REPORT_FAULTS[kind]
    planted, problem = plant(read_json(specimens[kind]), path)
    bad = tmp_path / specimens[kind].name
    bad.write_text(json.dumps(planted))
    with pytest.raises(InputError) as exc:
        contract.read_report(bad, model)
    message = one_line(exc)
    assert message.startswith(f"{bad}: not a valid ") and problem in message, message
    assert read_json(bad) == planted  # around the contract: read as if nothing were wrong


def test_a_list_entry_is_named_by_its_id(specimens, tmp_path):
    items = read_json(specimens["suite_items"])
    items["items"][1]["id"] = 7  # ids are text: the gate pairs items by them
    bad = tmp_path / "ifeval.json"
    bad.write_text(json.dumps(items))
    with pytest.raises(InputError, match=r"items\.1 \(id 7\)\.id: Input should be a valid string"):
        contract.read_report(bad, contract.SuiteItems)


def test_a_writer_refuses_a_report_that_breaks_the_contract(tmp_path):
    with pytest.raises(InputError, match=r"gate_report.json \(writing\): not a valid gate report file: passed"):
        contract.write_report(tmp_path / "gate_report.json", contract.GateReport, {"checks": []})
    assert not (tmp_path / "gate_report.json").exists()


def test_the_summary_names_a_broken_report_on_its_own_line(specimens, tmp_path):
    from posttrain.summary import summary

    gate = read_json(specimens["gate_report"])
    del gate["passed"]
    (tmp_path / "outputs/gate").mkdir(parents=True)
    (tmp_path / "outputs/gate/gate_report.json").write_text(json.dumps(gate))
    lines = summary(tmp_path)
    [line] = [line for line in lines if line.startswith("gate")]
    assert "outputs/gate/gate_report.json: not a valid gate report file: passed: Field required" in line
    assert any(line.startswith("dedup") and "not run" in line for line in lines)  # the rest goes on


@pytest.mark.parametrize("kind", sorted(REPORT_FAULTS))
def test_a_report_read_and_written_again_is_the_same_file(specimens, kind, tmp_path):
    """Key order, null against a missing key, and 9 against 9.0 survive the model: a
    stage that hands write_report the model writes what the dict wrote."""
    model, _ = REPORT_FAULTS[kind]
    report = contract.read_report(specimens[kind], model)
    assert isinstance(report, model)
    contract.write_report(tmp_path / specimens[kind].name, report)
    assert (tmp_path / specimens[kind].name).read_bytes() == specimens[kind].read_bytes()


@pytest.mark.parametrize("kind", sorted(JSONL_FAULTS))
def test_a_jsonl_file_read_as_models_and_written_again_is_the_same_file(specimens, kind, tmp_path):
    """Records (dedup's output), training conversations (the mix's, carrying review's
    decision), pairs and GRPO prompts keep their layout through their models: what a
    stage reads and writes unchanged is byte for byte what was there."""
    read, _ = JSONL_FAULTS[kind]
    write = {"pairs": contract.write_pairs, "grpo_prompts": contract.write_grpo_prompts}.get(kind, contract.write_records)
    rows = read(specimens[kind])
    assert rows and all(isinstance(row, contract.Layout) for row in rows)
    write(tmp_path / specimens[kind].name, rows)
    assert (tmp_path / specimens[kind].name).read_bytes() == specimens[kind].read_bytes()


def test_a_record_changed_by_a_stage_is_written_as_a_dict_edit_would_write_it(specimens, tmp_path):
    """A key a stage sets comes last, where `{**record, key: value}` put it; 1 stays 1."""
    [record, *_] = contract.read_records(specimens["records"])
    raw = read_jsonl(specimens["records"])[0]
    changed = record.model_copy(deep=True)
    changed.meta.dedup = {"duplicate_of": "x", "similarity": 1}
    changed.reject_reason = "duplicate"
    contract.write_records(tmp_path / "removed.jsonl", [changed])
    expected = {**raw, "meta": {**raw["meta"], "dedup": {"duplicate_of": "x", "similarity": 1}},
                "reject_reason": "duplicate"}
    assert (tmp_path / "removed.jsonl").read_text() == json.dumps(expected, ensure_ascii=False) + "\n"
    assert "dedup" not in record.meta.model_fields_set  # the deep copy left the original alone
    graded = {**raw, "meta": {**raw["meta"], "validators": {
        **raw["meta"]["validators"], "graded": {"passed": True, "score": 1, "reason": None}}}}
    contract.write_records(tmp_path / "graded.jsonl", [contract.check_record(graded)])
    assert (tmp_path / "graded.jsonl").read_text() == json.dumps(graded, ensure_ascii=False) + "\n"


def test_a_report_model_keeps_the_layout_it_was_given(tmp_path):
    check = contract.GateCheck(detail="max |activation| 812", name="fp16_safe", passed=True, status="passed",
                               max_abs=812, offending=[])
    gate = contract.GateReport(passed=True, enforce=True, rule="...", alpha=0.05, off=[], uninformative=[],
                               checks=[check, {"name": "x", "status": "passed", "passed": True, "detail": "",
                                               "detectable": 3, "p": None}], message="gate: passed")
    gate.note = "added later"
    contract.write_report(tmp_path / "gate_report.json", gate)
    written = read_json(tmp_path / "gate_report.json")
    assert list(written) == ["passed", "enforce", "rule", "alpha", "off", "uninformative", "checks", "message", "note"]
    assert list(written["checks"][0]) == ["detail", "name", "passed", "status", "max_abs", "offending"]
    assert written["checks"][1] == {"name": "x", "status": "passed", "passed": True, "detail": "", "detectable": 3,
                                    "p": None}  # 3 stays 3; p given as null is written, a key not given is not
    read = contract.read_report(tmp_path / "gate_report.json", contract.GateReport)
    assert isinstance(read.checks[1].detectable, int) and read.note == "added later"
