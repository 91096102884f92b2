"""Real stage outputs for tests that need records: made by the stages' own code, never
by hand, so a test cannot hold a record shape that no stage produces.

`needle_records(folder, count)` runs the needle pipeline's four steps (its answers are
written by code, so it needs no teacher and takes seconds) and returns the accepted
records, read back through the record contract, as their file holds them (dicts: a
test edits and plants faults in them; a stage function takes `check_record(r)`).
`run_pipeline(name, cfg, engine, folder)` runs any pipeline and returns (accepted,
rejected) so. Import from tests:
`from stage_outputs import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.contract import read_records
from synth_data import four_steps

# needle.generate makes no teacher call; four_steps.run only reads the engine's name.
NO_TEACHER = SimpleNamespace(name="none", model="none")


def run_pipeline(name: str, cfg: Any, engine: Any, folder: Path) -> tuple[list[dict], list[dict]]:
    four_steps.run(four_steps.load_pipeline(name), cfg, engine, Path(folder))
    return tuple([r.dump() for r in read_records(Path(folder) / f"{part}.jsonl")] for part in ("accepted", "rejected"))


def needle_records(folder: Path, count: int, length_buckets: tuple[int, ...] = (1024,), seed: int = 0) -> list[dict]:
    from synth_data import needle

    cfg = needle.Config(count=count, length_buckets=list(length_buckets), seed=seed)
    accepted, rejected = run_pipeline("needle", cfg, NO_TEACHER, folder)
    assert not rejected, [r["reject_reason"] for r in rejected]
    return accepted


def records_as_written(path: Path, trainable: bool = False) -> list[dict]:
    """A file's records, each checked by the record contract, as the file holds them."""
    return [r.dump() for r in read_records(path, trainable)]
