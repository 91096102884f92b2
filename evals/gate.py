"""`posttrain gate RECIPE`: compare the trained model with the base, item by item, and
decide whether it may be exported.

    posttrain gate recipes/tiny-cpu.yaml --before outputs/eval/base/scores.json \
        --after outputs/eval/after/scores.json --audit outputs/audit/fp16_audit.json \
        --report outputs/eval/eval_report.json --out outputs/gate

Both evals answered the same items (the gate refuses two item sets that differ), so
every metric's change is paired (evals/paired.py): for every suite, metric, task and
length the eval report gives before, after, the change with its 95 % interval and
p-value, and the base's own standard error.

The decision rule (recipe `gate:`), written into gate_report.json too:

- Every skill the data targets is a check: retention per task and length and per
  length, IFEval prompt-level strict, the tool-call categories (`non_live_ast`) and
  irrelevance, held-out loss per record, the forgetting probe, and the FP16 audit. A
  check can be switched off only by naming it in `gate.off`; the report lists it.
  A check whose data is missing fails as "not measured".
- A paired check fails when the change is a regression, significant (two-sided
  p-value, Benjamini-Hochberg-adjusted over all the gate's paired checks, below
  `alpha`) and beyond the check's margin (`max_*_drop` / `max_*_rise`).
- Each check states the smallest drop it can detect with `power` (80 %) at this
  recipe's item counts (evals/paired.detectable_drop), using the larger of the
  observed standard error of the change and the base's own standard error (a greedy
  rerun can leave every answer unchanged, which says nothing about a later run).
- A check whose base is not significantly better than the score of an empty answer
  (the suite's chance level, which the eval records) is "uninformative": it fails on
  a significant regression like any other, but it never reads "passed".
- `min_scores` / `min_gain` add point floors by dotted metric path.

When a check fails and `gate.enforce` is on, the stage exits 1 with one message naming
every failed check and its numbers; DVC then stops, so export (which depends on the
gate report) does not run. `enforce: false` reports the same and exits 0.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from evals.paired import adjust, compare, detectable_drop
from pipeline.contract import (
    SUITE_FILES,
    ChanceComparison,
    Comparison,
    EvalItem,
    EvalReport,
    EvalScores,
    Fp16Audit,
    GateCheck,
    GateReport,
    SuiteItems,
    read_report,
    write_report,
)
from pipeline.plotting import figure
from pipeline.recipe import add_recipe_arguments, load_recipe
from pipeline.records import InputError, write_json

log = logging.getLogger(__name__)

# The gated checks: name pattern -> the recipe field holding its margin.
GATED = {
    "fp16_safe": None,
    "retention.*": "max_retention_drop",
    "ifeval.prompt_strict": "max_ifeval_drop",
    "tool_calls.non_live_ast": "max_tool_calls_drop",
    "tool_calls.irrelevance": "max_tool_calls_drop",
    "heldout_loss.overall": "max_heldout_loss_rise",
    "forgetting.overall": "max_forgetting_rise",
}
AST_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--before", default="outputs/eval/base/scores.json", help="the base model's scores")
    parser.add_argument("--after", default="outputs/eval/after/scores.json", help="the trained model's scores")
    parser.add_argument("--audit", default="outputs/audit/fp16_audit.json", help="the FP16 audit of the trained model")
    parser.add_argument("--report", default="outputs/eval/eval_report.json", help="where the before/after report goes")
    parser.add_argument("--out", default="outputs/gate", help="folder for gate_report.json")
    parser.add_argument("--plots", default=None, help="folder for the plots (default: plots/ beside --report)")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    before, after = read_scores(Path(args.before)), read_scores(Path(args.after))
    audit = read_report(args.audit, Fp16Audit) if Path(args.audit).is_file() else None
    report = eval_report(before, after, recipe)
    gate = run_checks(report, audit, recipe.gate)
    write_report(args.report, report)
    write_plots(report, Path(args.plots) if args.plots else Path(args.report).parent / "plots")
    write_report(Path(args.out) / "gate_report.json", gate)
    if not gate.passed and recipe.gate.enforce:
        print(gate.message, file=sys.stderr)
        return 1
    print(gate.message)
    return 0


# ------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Scores:
    """One eval: its scores.json and the per-item file of each suite beside it."""

    report: EvalScores
    per_item: dict[str, SuiteItems]


def read_scores(path: Path) -> Scores:
    """scores.json plus every suite's per-item file beside it."""
    scores = Scores(read_report(path, EvalScores), {})
    for suite in SUITE_FILES:  # per-item answers beside scores.json, as <suite>.json
        file = path.parent / f"{suite}.json"
        if suite in scores.report.scores and file.is_file():
            scores.per_item[suite] = read_report(file, SuiteItems)
    return scores


def check_same_items(suite: str, before: list[EvalItem], after: list[EvalItem]) -> None:
    """Refuse a comparison of two different item sets: a paired test needs pairs."""
    ids_before, ids_after = [r.id for r in before], [r.id for r in after]
    for side, ids in (("before", ids_before), ("after", ids_after)):
        if None in ids or len(set(ids)) != len(ids):
            raise InputError(f"gate: the {side} eval's {suite} items lack ids or repeat one")
    if set(ids_before) != set(ids_after):
        only_b = sorted(set(ids_before) - set(ids_after))
        only_a = sorted(set(ids_after) - set(ids_before))
        raise InputError(
            f"gate: before and after answered different {suite} items ({len(only_b)} only before, e.g. "
            f"{only_b[:3]}; {len(only_a)} only after, e.g. {only_a[:3]}): rerun both evals with the same "
            "recipe `eval:` section")


# ----------------------------------------------------------------------- metrics
@dataclasses.dataclass
class Metric:
    """One metric of one suite as a weighted mean of per-item values."""

    name: str
    rows: list[EvalItem]  # the before items it averages
    weights: list[float]
    value: Callable[[EvalItem], float]
    binary: bool = False
    lower_is_better: bool = False
    unit: str = "points"
    # Cells averaged as fixed parts (a length's tasks): their standard errors come
    # from the spread within each cell, since a task's level is not noise.
    stratum: Callable[[EvalItem], Any] | None = None


def _percent(flag: str) -> Callable[[EvalItem], float]:
    return lambda row: 100.0 if getattr(row, flag) else 0.0


def nested_weights(rows: list[EvalItem], levels: list[Callable[[EvalItem], Any]]) -> list[float]:
    """Weights that make a weighted item mean equal a mean of cell means, level by
    level (e.g. tool calls: the mean of categories, each the mean of its languages)."""
    def weigh(group: list[int], depth: int, share: float, out: dict[int, float]) -> None:
        if depth == len(levels):
            for i in group:
                out[i] = share / len(group)
            return
        cells: dict[Any, list[int]] = defaultdict(list)
        for i in group:
            cells[levels[depth](rows[i])].append(i)
        for members in cells.values():
            weigh(members, depth + 1, share / len(cells), out)

    out: dict[int, float] = {}
    weigh(list(range(len(rows))), 0, 1.0, out)
    return [out[i] for i in range(len(rows))]


def _retention_cell(row: EvalItem) -> tuple[str, int]:
    if {"task", "length"} <= row.model_fields_set:
        return row.task, int(row.length)
    task, length, _ = row.id.split("/")  # ids are task/length/index
    return task, int(length)


def suite_metrics(suite: str, rows: list[EvalItem]) -> list[Metric]:
    """Every reported metric of a suite, built from its per-item rows."""
    metrics: list[Metric] = []
    if suite == "retention":
        by_length: dict[int, list[EvalItem]] = defaultdict(list)
        cells: dict[tuple[str, int], list[EvalItem]] = defaultdict(list)
        for row in rows:
            task, length = _retention_cell(row)
            by_length[length].append(row)
            cells[(task, length)].append(row)
        score = lambda row: float(row.score)  # noqa: E731
        for length, members in sorted(by_length.items()):
            metrics.append(Metric(f"retention.average.{length}", members,
                                  nested_weights(members, [lambda r: _retention_cell(r)[0]]), score,
                                  stratum=lambda r: _retention_cell(r)[0]))
        for (task, length), members in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            metrics.append(Metric(f"retention.{task}.{length}", members, [1.0] * len(members), score))
    elif suite == "tool_calls":
        language = lambda row: row.language  # noqa: E731
        category = lambda row: row.category  # noqa: E731
        present = sorted({row.category for row in rows})
        for name in present:
            members = [r for r in rows if r.category == name]
            metrics.append(Metric(f"tool_calls.{name}", members, nested_weights(members, [language]),
                                  _percent("passed"), binary=True))
            spoken = sorted({r.language for r in members if r.language})
            for lang in spoken if len(spoken) > 1 else []:  # BFCL's simple_python, simple_java, ...
                cell = [r for r in members if r.language == lang]
                metrics.append(Metric(f"tool_calls.{name}_{lang}", cell, [1.0] * len(cell), _percent("passed"),
                                      binary=True))
        ast = [r for r in rows if r.category in AST_CATEGORIES]
        if ast:
            metrics.append(Metric("tool_calls.non_live_ast", ast, nested_weights(ast, [category, language]),
                                  _percent("passed"), binary=True))
        metrics.append(Metric("tool_calls.overall", rows, nested_weights(rows, [category, language]),
                              _percent("passed"), binary=True))
    elif suite == "ifeval":
        ones = [1.0] * len(rows)
        # An item without an instruction count counts once.
        instructions = [float(r.instructions if "instructions" in r.model_fields_set else 1) for r in rows]
        metrics += [
            Metric("ifeval.prompt_strict", rows, ones, _percent("passed"), binary=True),
            Metric("ifeval.prompt_loose", rows, ones, _percent("loose_passed"), binary=True),
            Metric("ifeval.instruction_strict", rows, instructions, lambda r: float(r.score)),
        ]
        if all("loose_score" in r.model_fields_set for r in rows):
            metrics.append(Metric("ifeval.instruction_loose", rows, instructions,
                                  lambda r: float(r.loose_score)))
    elif suite in ("heldout_loss", "forgetting"):
        scored = [r for r in rows if r.loss is not None and r.tokens]
        loss = lambda row: float(row.loss)  # noqa: E731
        if scored:
            metrics.append(Metric(f"{suite}.overall", scored, [float(r.tokens) for r in scored], loss,
                                  lower_is_better=True, unit="nats/token"))
        for name in sorted({r.category for r in scored if r.category}):
            members = [r for r in scored if r.category == name]
            metrics.append(Metric(f"{suite}.{name}", members, [float(r.tokens) for r in members], loss,
                                  lower_is_better=True, unit="nats/token"))
    return metrics


def paired(metric: Metric, other: dict[str, EvalItem], cfg, *, as_after: bool = True) -> dict[str, Any]:
    """The metric's change from its rows (before) to the same items in `other` (after),
    or, with as_after=False, from `other` (the chance rows) to its rows."""
    mine = [metric.value(r) for r in metric.rows]
    theirs = [metric.value(other[r.id]) for r in metric.rows]
    clusters = [str(r.cluster or r.id) for r in metric.rows]
    first, second = (mine, theirs) if as_after else (theirs, mine)
    result = compare(first, second, weights=metric.weights, binary=metric.binary, seed=cfg.seed,
                     clusters=clusters if any(r.cluster for r in metric.rows) else None,
                     resamples=cfg.resamples,
                     strata=[metric.stratum(r) for r in metric.rows] if metric.stratum else None)
    out = result.as_dict()
    if metric.lower_is_better:  # compare counts rises and falls; a loss that falls is better
        out["better"], out["worse"] = out["worse"], out["better"]
    return out


# ------------------------------------------------------------------------ report
def delta(before: Any, after: Any) -> Any:
    """after - before for every number both sides hold, with the same nesting."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = {k: delta(before.get(k), after[k]) for k in after if k in before}
        return {k: v for k, v in out.items() if v is not None}
    if _number(before) and _number(after):
        return round(after - before, 4)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def eval_report(before: Scores, after: Scores, recipe, only: Callable[[str], bool] | None = None) -> EvalReport:
    """Before, after and delta of every suite's metrics, and the paired comparison of
    each metric (`only`: of the metrics it accepts)."""
    b, a = before.report.scores, after.report.scores
    suites = sorted(set(b) | set(a))
    cfg = recipe.gate
    comparisons: dict[str, Comparison] = {}
    notes: dict[str, list[str]] = {}
    for suite in suites:
        items_b = suite_items(before, suite)
        items_a = suite_items(after, suite)
        for side in (b.get(suite), a.get(suite)):  # e.g. an IFEval budget below the benchmark's
            if isinstance(side, dict) and side.get("notes"):
                notes[suite] = sorted(set(notes.get(suite, [])) | set(side["notes"]))
        if not items_b or not items_a:
            continue
        check_same_items(suite, items_b, items_a)
        after_rows = {r.id: r for r in items_a}
        chance = before.per_item[suite].chance
        chance_rows = {r.id: r for r in (chance.items if chance is not None and chance.items else [])}
        for metric in suite_metrics(suite, items_b):
            if only is not None and not only(metric.name):
                continue
            row = {"unit": metric.unit, "lower_is_better": metric.lower_is_better,
                   **paired(metric, after_rows, cfg)}
            if all(r.id in chance_rows for r in metric.rows):
                vs_chance = paired(metric, chance_rows, cfg, as_after=False)
                row["chance"] = ChanceComparison(score=vs_chance["before"], base_minus_chance=vs_chance["delta"],
                                                 p=vs_chance["p"])
            comparisons[metric.name] = Comparison(**row)
    report = EvalReport(
        models={"before": before.report.model, "after": after.report.model},
        engine={"before": before.report.engine, "after": after.report.engine},
        counts=after.report.counts if "counts" in after.report.model_fields_set else {},
        suites={s: {"before": b.get(s), "after": a.get(s), "delta": delta(b.get(s), a.get(s))} for s in suites},
        comparisons=comparisons,
        notes=notes,
    )
    if recipe.model.tiny is not None:
        report.note = ("The student is model.tiny: random weights before training and a few "
                       "steps after, so its scores are at chance. The numbers mean something "
                       "on real weights.")
    return report


def suite_items(scores: Scores, suite: str) -> list[EvalItem] | None:
    """A suite's per-item verdicts in one eval (None: no per-item file)."""
    items = scores.per_item.get(suite)
    return items.items if items is not None else None


def get_path(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


# ------------------------------------------------------------------------ checks
RULE = ("A paired check fails when the trained model's change is a regression that is "
        "significant (two-sided paired p-value: exact McNemar for pass/fail items, a paired "
        "permutation test otherwise; Benjamini-Hochberg-adjusted over the gate's paired checks) "
        "below alpha, and larger than the check's margin. A check whose data is missing fails "
        "as not measured; a check whose base is not significantly better than an empty answer "
        "is uninformative; fp16_safe fails when the FP16 audit finds an activation past FP16's "
        "range.")


def margin_field(name: str) -> str | None:
    for pattern, field in GATED.items():
        if fnmatch.fnmatchcase(name, pattern):
            return field
    raise KeyError(name)


def is_off(name: str, cfg) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.off)


def run_checks(report: EvalReport, audit: Fp16Audit | None, cfg) -> GateReport:
    comparisons = report.comparisons
    checks: list[GateCheck] = []
    off: list[str] = []

    # fp16_safe
    if is_off("fp16_safe", cfg):
        off.append("fp16_safe")
    elif audit is None:
        checks.append(GateCheck(name="fp16_safe", status="not measured", passed=False,
                                detail="not measured: no FP16 audit report"))
    else:
        sites = [o.site for o in audit.offending]
        safe = audit.fp16_safe
        checks.append(GateCheck(name="fp16_safe", status="passed" if safe else "failed", passed=safe,
                                detail=f"max |activation| {audit.max_abs}, offending sites: {sites or 'none'}",
                                max_abs=audit.max_abs, offending=sites))

    # The paired checks: every gated name the data has, and each gated family it lacks.
    names = [n for n in comparisons if n != "fp16_safe" and is_gated(n)]
    for pattern in GATED:
        if pattern == "fp16_safe" or any(fnmatch.fnmatchcase(n, pattern) for n in names):
            continue
        name = pattern.rstrip(".*")
        if is_off(name, cfg) or is_off(pattern, cfg):
            off.append(pattern)
        else:
            checks.append(GateCheck(name=name, status="not measured", passed=False,
                                    detail=f"not measured: no {name} items in both evals"))
    off += [n for n in names if is_off(n, cfg)]
    names = [n for n in names if not is_off(n, cfg)]
    adjusted = dict(zip(names, adjust([comparisons[n].p for n in names])))
    for name in names:
        checks.append(paired_check(name, comparisons[name], adjusted[name], len(names), cfg))

    for dotted, floor in sorted(cfg.min_scores.items()):
        a = get_path(report.suites, _side(dotted, "after"))
        ok = _number(a) and a >= floor
        checks.append(GateCheck(name=f"min_score {dotted}", status="passed" if ok else "failed", passed=ok,
                                detail=f"after {a} (minimum {floor:g})", after=a, minimum=floor))
    for dotted, gain in sorted(cfg.min_gain.items()):
        d = get_path(report.suites, _side(dotted, "delta"))
        ok = _number(d) and d >= gain
        checks.append(GateCheck(name=f"min_gain {dotted}", status="passed" if ok else "failed", passed=ok,
                                detail=f"gain {d} (minimum {gain:g})", delta=d, minimum=gain))

    failed = [c for c in checks if not c.passed]
    uninformative = [c.name for c in checks if c.status == "uninformative"]
    if failed:
        message = f"gate: FAILED {len(failed)} of {len(checks)} checks: " + "; ".join(
            f"{c.name}: {c.detail}" for c in failed)
        if not cfg.enforce:
            message += " (gate.enforce is false: export not blocked)"
    else:
        passed = len(checks) - len(uninformative)
        message = f"gate: passed {passed} of {len(checks)} checks"
        if uninformative:
            message += (f"; {len(uninformative)} uninformative (the base scores no better than an "
                        f"empty answer): {', '.join(uninformative)}")
    if off:
        message += f"; off: {', '.join(off)}"
    return GateReport(passed=not failed, enforce=cfg.enforce, rule=RULE, alpha=cfg.alpha, power=cfg.power,
                      paired_checks=len(names), off=off, uninformative=uninformative, checks=checks,
                      message=message)


def is_gated(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in GATED if p != "fp16_safe")


def paired_check(name: str, c: Comparison, p_adjusted: float, family: int, cfg) -> GateCheck:
    margin = float(getattr(cfg, margin_field(name)))
    sign = 1.0 if c.lower_is_better else -1.0  # harm is a rise for losses, a drop otherwise
    harm = sign * c.delta
    failed = harm > margin and p_adjusted < cfg.alpha
    # The larger of the observed SE and the base's own: a rerun with identical answers
    # (SE 0) says nothing about what a later run can detect. Losses always move.
    # The bootstrap's standard error divides by n, the base's (evals/standard_error) by
    # n - 1: the bootstrap's is scaled to match before the two are compared.
    units = c.clusters
    change_se = c.se * math.sqrt(units / (units - 1)) if units > 1 else c.se
    se = change_se if c.lower_is_better else max(change_se, c.se_before)
    detectable = detectable_drop(se, margin, cfg.alpha, cfg.power, family, units=units,
                                 scale=0.0 if c.lower_is_better else 100.0)
    chance = c.chance
    informative = chance is None or (-sign * chance.base_minus_chance > 0 and chance.p < cfg.alpha)
    status = "failed" if failed else ("passed" if informative else "uninformative")
    unit = "nats/token" if c.lower_is_better else "points"
    verb = "rise" if c.lower_is_better else "drop"
    detail = (f"{_fmt(c.before)} -> {_fmt(c.after)} (change {c.delta:+.4g} {unit}, 95% CI "
              f"[{_fmt(c.low)}, {_fmt(c.high)}], p {c.p:.3g}, adjusted {p_adjusted:.3g}, "
              f"{c.items} items; margin {margin:g}, detectable {verb} {detectable:.3g})")
    if status == "uninformative":
        detail += f"; base {_fmt(c.before)} vs empty answer {_fmt(chance.score)}: uninformative"
    return GateCheck(name=name, status=status, passed=not failed, detail=detail,
                     before=c.before, after=c.after, delta=c.delta, ci=[c.low, c.high],
                     p=c.p, p_adjusted=round(p_adjusted, 6), items=c.items, margin=margin,
                     detectable=round(detectable, 4), unit=unit,
                     chance=chance.score if chance else None)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _side(dotted: str, side: str) -> str:
    """'tool_calls.overall' -> 'tool_calls.after.overall' in the report's layout."""
    suite, _, rest = dotted.partition(".")
    return f"{suite}.{side}.{rest}" if rest else f"{suite}.{side}"


# ------------------------------------------------------------------------- plots
def write_plots(report: EvalReport, out: Path) -> None:
    """DVC plot data (JSON rows) and PNGs, every number with its 95 % error bar:
    retention vs length, skill scores before and after, and each change with its
    interval."""
    out.mkdir(parents=True, exist_ok=True)
    comparisons = report.comparisons
    z = 1.96

    def bars(c: Comparison) -> dict[str, float]:
        se_after = c.se_after if "se_after" in c.model_fields_set else 0.0
        return {"before": c.before, "after": c.after, "before_err": z * c.se_before,
                "after_err": z * se_after, "delta": c.delta, "low": c.low, "high": c.high}

    retention = [{"length": int(n.rsplit(".", 1)[1]), **bars(c)} for n, c in comparisons.items()
                 if n.startswith("retention.average.")]
    retention.sort(key=lambda r: r["length"])
    skills = [{"metric": n, **bars(c)} for n, c in comparisons.items()
              if not n.startswith("retention.") and not c.lower_is_better]
    deltas = [{"metric": n, **bars(c)} for n, c in comparisons.items() if is_gated(n)]
    write_json(out / "retention.json", retention)
    write_json(out / "skills.json", skills)
    write_json(out / "deltas.json", deltas)

    with figure(out / "retention.png", (6, 4)) as (_, ax):
        for side, style in (("before", "o--"), ("after", "o-")):
            ax.errorbar([r["length"] for r in retention], [r[side] for r in retention],
                        yerr=[r[f"{side}_err"] for r in retention], fmt=style, capsize=3, label=side)
        ax.set(xlabel="context length (student tokens)", ylabel="task average (%), 95% error bars",
               ylim=(-5, 105), title="Retention vs length")
        if retention:
            ax.set_xscale("log", base=2)
        ax.legend()

    with figure(out / "skills.png", (max(6, len(skills) * 0.6), 4)) as (_, ax):
        xs = range(len(skills))
        for offset, side in ((-0.2, "before"), (0.2, "after")):
            ax.bar([x + offset for x in xs], [r[side] for r in skills], 0.4,
                   yerr=[r[f"{side}_err"] for r in skills], capsize=2, label=side)
        ax.set_xticks(list(xs), [r["metric"] for r in skills], rotation=45, ha="right", fontsize=8)
        ax.set(ylabel="score (%), 95% error bars", ylim=(0, 105), title="Skill scores, before and after")
        ax.legend()

    with figure(out / "deltas.png", (7, max(3, 0.3 * len(deltas) + 1))) as (_, ax):
        ys = range(len(deltas))
        ax.errorbar([r["delta"] for r in deltas], list(ys), capsize=3, fmt="o",
                    xerr=[[r["delta"] - r["low"] for r in deltas], [r["high"] - r["delta"] for r in deltas]])
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(list(ys), [r["metric"] for r in deltas], fontsize=8)
        ax.set(xlabel="after - before (points; nats/token for losses), 95% CI", title="Change per gated check")
