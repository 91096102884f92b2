"""Shared test ground. Tests run offline on CPU against real components."""

import os
import shutil
from types import SimpleNamespace

# No model hub is reachable: fail fast instead of retrying network calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402

# Bounds (seconds) for tests that carry a marker but no @pytest.mark.timeout of their
# own; every other test has pyproject's `timeout`. A slow test trains or runs several
# stages: on 2 shared cores the planted-outlier fixture (two 120-step trainings) took
# over an hour. A proof run trains for up to two hours by design.
MARKER_TIMEOUTS = {"proof": 6 * 3600, "slow": 4 * 3600}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            for marker, seconds in MARKER_TIMEOUTS.items():
                if item.get_closest_marker(marker) is not None:
                    item.add_marker(pytest.mark.timeout(seconds))
                    break


@pytest.fixture(scope="session")
def teacher_dir():
    """The packaged SmolLM2-135M-Instruct as a plain model folder (materialised once)."""
    from pipeline.model_paths import teacher_path

    return teacher_path()


@pytest.fixture(scope="session")
def pipeline_outputs(tmp_path_factory, teacher_dir):
    """Every synthetic pipeline's real four-step output, made once per session on the
    packaged teacher (transformers engine, one thread, a few items each, settings that
    let a 135M model get some accepted). Returns the folder holding <pipeline>/
    {accepted,rejected}.jsonl and stats.json, as the generate stage writes them."""
    from pipeline.engines import CachedEngine, TransformersEngine
    from synth_data import four_steps

    root = tmp_path_factory.mktemp("synth")
    configs = {
        "table_qa": {"count": 3, "max_rows": 2, "max_columns": 1, "max_tokens": 80},
        "doc_qa": {"count": 3, "long_fraction": 0.5, "length_buckets": [1024], "max_paragraphs": 1,
                   "max_tokens": 64},
        # BFCL's requests, answered by the teacher (n=2) and by code (auto): a call set
        # yields a record with calls whatever the 135M teacher writes, and its wrong
        # answers of the same prompt make preference pairs (tests/test_prefs.py).
        "tool_use": {"count": 4, "n": 2, "max_tokens": 64, "requests": "bfcl", "answers": "auto",
                     "mix": {"single": 0.5, "irrelevance": 0.5}},
        "steerability": {"count": 3, "conversations": 1, "turns": 2, "n": 2, "max_tokens": 48,
                         "max_constraints": 1,
                         "kinds": ["placeholders", "english_only", "exclude_keywords", "max_words"]},
        "needle": {"count": 6, "length_buckets": [1024]},
        "chat": {"count": 4, "seeds": ["builtin"], "max_tokens": 48},
    }
    engine = CachedEngine(TransformersEngine("teacher", batch_size=8, threads=1), root / "cache", progress=False)
    for name, raw in configs.items():
        four_steps.run(four_steps.load_pipeline(name), four_steps.validate_config(name, raw), engine, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory):
    """The reduced default recipe (tests/test_dag.py) through `dvc repro` from scratch,
    once per session: its repo, recipe and the stages that ran, and a snapshot of the
    evals, audit and mix it wrote (tests/test_eval_gate.py gates them) taken before
    test_dag changes the recipe and reruns."""
    from test_dag import copy_repo, reduced_recipe, repro

    root = tmp_path_factory.mktemp("dag")
    repo = copy_repo(root / "repo")
    recipe = reduced_recipe(repo)
    ran = repro(repo)
    snapshot = root / "snapshot"
    for src, dest in (("outputs/eval/base", "eval/base"), ("outputs/eval/after", "eval/after"),
                      ("outputs/audit", "audit"), ("data/mix", "mix")):
        shutil.copytree(repo / src, snapshot / dest)
    shutil.copy(recipe, snapshot / "recipe.yaml")
    return SimpleNamespace(repo=repo, recipe=recipe, ran=ran, snapshot=snapshot)
