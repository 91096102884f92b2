"""The DAG's code dependencies and the house rule on imports.

Every project module a DVC stage runs, found by following its imports transitively
(function-level imports included), is one of that stage's deps in dvc.yaml, so
editing code reruns what it feeds and nothing goes stale silently. And stages keep
to the house rule: synth_data, review, sft, activation_loss and evals import only
`pipeline` (sft may also import activation_loss); `pipeline` imports no stage.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "posttrain", "synth_data", "review", "sft", "activation_loss", "evals", "plan")
# What each package may import besides itself.
MAY_IMPORT = {
    "pipeline": set(),  # the ground floor: foundations only
    # The commands above the stages (CLI, teacher, plots, summary): the CLI reaches a
    # stage's module by name when its subcommand runs; the rest read the contract.
    "posttrain": {"pipeline"},
    "synth_data": {"pipeline"},
    "review": {"pipeline"},
    "sft": {"pipeline", "activation_loss"},
    "activation_loss": {"pipeline"},
    "evals": {"pipeline"},
    # `posttrain plan` is a command above the stages, not a stage: it sizes a run with
    # each stage's own functions, and no stage imports it.
    "plan": {"pipeline", "synth_data", "sft", "evals"},
}
# The imports across stages: GRPO's rewards are the validators that filter the
# data (DESIGN, one source of truth), so the GRPO stage imports them and nothing else
# of synth_data (its deps in dvc.yaml list what they run).
# GRPO's held-out effect is paired with the gate's own statistics (evals/paired.py),
# so the two report changes the same way.
ALLOWED = {("sft.grpo", "synth_data.rewards"), ("sft.grpo", "evals.paired")}


def module_file(name: str) -> Path | None:
    """The file behind a project module name, or None (a class, a function, a library)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def imported_modules(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its body (top level or inside functions)."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            # `from pipeline import records` imports the module pipeline.records
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {m for m in found if module_file(m) is not None}


def runs_code(path: Path) -> bool:
    """A package __init__ holding only a docstring runs nothing worth a dependency."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def closure(roots: set[str]) -> set[str]:
    """Every project module importing `roots` executes, roots included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(name))
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
    return {m for m in seen
            if module_file(m).name != "__init__.py" or runs_code(module_file(m))}


def dvc_stages():
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            code = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
            yield stage.addressing, stage.cmd, code


def entry_modules(cmd: str) -> set[str]:
    """The modules a stage's `posttrain <subcommand> ...` command runs."""
    from posttrain.cli import COMMANDS
    from synth_data.four_steps import PIPELINES

    words = shlex.split(cmd)
    assert words[0] == "posttrain" and words[1] in COMMANDS, cmd
    modules = {COMMANDS[words[1]][0]}
    if words[1] == "generate":  # four_steps loads the pipeline's module by name
        modules.add(PIPELINES[words[2]])
    return modules


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


STAGES = list(dvc_stages())


@pytest.mark.parametrize("name, cmd, deps", STAGES, ids=[s[0] for s in STAGES])
def test_every_module_a_stage_runs_is_one_of_its_deps(name, cmd, deps):
    modules = closure(entry_modules(cmd))
    missing = sorted(str(module_file(m).relative_to(ROOT)) for m in modules
                     if not covered(module_file(m), deps))
    assert not missing, f"dvc.yaml stage {name} runs {missing} but does not list them in deps"


def test_closure_follows_imports_transitively_and_inside_functions():
    # sft.train -> activation_loss.term -> activation_loss.sites; export imports the
    # student loader inside export(); the template reaches train through the student.
    assert {"activation_loss.sites", "pipeline.chat_template"} <= closure({"sft.train"})
    assert "pipeline.student" in closure({"sft.export"})
    assert "synth_data.constraints" in closure({"synth_data.steerability"})
    assert "synth_data.constraints" not in closure({"synth_data.chat"})


def project_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_stage_imports_another_stage_and_pipeline_imports_no_stage_or_command():
    broken = []
    for name in project_modules():
        package = name.split(".")[0]
        for imported in sorted(imported_modules(name)):
            other = imported.split(".")[0]
            if other != package and other not in MAY_IMPORT[package] and (name, imported) not in ALLOWED:
                broken.append(f"{name} imports {imported}")
    assert not broken, broken


@pytest.fixture(scope="module")
def committed_copy(tmp_path_factory):
    """A git copy of the project whose dvc.lock records every stage as up to date.

    Running the DAG takes a quarter of an hour; `dvc commit -f` over placeholder outputs
    records the same lock from the current code in seconds.
    """
    import subprocess

    from dvc.repo import Repo

    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    copy = tmp_path_factory.mktemp("dag")
    for rel in listed.stdout.splitlines():
        source = ROOT / rel
        if source.is_file() and not source.is_symlink():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / rel)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    with contextlib.chdir(copy), Repo(str(copy)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                path = copy / out.def_path
                if path.suffix:  # outputs without a suffix are folders (final/, accepted/)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder\n")
        repo.commit(force=True)
        assert repo.status() == {}
    return copy


def stale_after_edit(copy: Path, rel: str) -> set[str]:
    """Stages `dvc status` reports after appending a comment to `rel` (undone after)."""
    from dvc.repo import Repo

    path = copy / rel
    original = path.read_text()
    path.write_text(original + "# edited\n")
    try:
        with contextlib.chdir(copy), Repo(str(copy)) as repo:
            return set(repo.status())
    finally:
        path.write_text(original)


def downstream(copy: Path, stages: set[str]) -> set[str]:
    """Stages that consume what `stages` write: dvc reruns them once those outputs change."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(copy), Repo(str(copy)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {s.addressing: s for s in graph.nodes}
        return {a.addressing for s in stages for a in nx.ancestors(graph, by_name[s])}


GENERATE = {f"generate@{p}" for p in
            ("table_qa", "doc_qa", "tool_use", "steerability", "needle", "chat")}


def test_real_dvc_reruns_what_edited_code_feeds_and_nothing_else(committed_copy):
    # steerability's validators: its stage is stale (the other pipelines share the
    # foreach's deps) and dedup, the mix and training follow. They are GRPO's
    # rewards and shape its prompts too: both GRPO stages rerun.
    stale = stale_after_edit(committed_copy, "synth_data/constraints.py")
    assert "generate@steerability" in stale and {"grpo_prompts", "grpo"} <= stale
    assert stale <= GENERATE | {"grpo_prompts", "grpo"}
    assert {"dedup", "mix", "sft", "export"} <= downstream(committed_copy, stale)
    # The chat template renders every prompt and every training example.
    stale = stale_after_edit(committed_copy, "pipeline/chat_template.py")
    assert GENERATE | {"sft", "audit", "export"} <= stale
    # The student loader feeds training, the audit and the export.
    assert {"sft", "audit", "export"} <= stale_after_edit(committed_copy, "pipeline/student.py")
    # A module no stage imports changes nothing.
    assert stale_after_edit(committed_copy, "bench/engine_speed.py") == set()
