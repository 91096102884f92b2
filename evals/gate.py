"""`posttrain gate RECIPE`: compare the trained model with the base and decide whether
it may be exported.

    posttrain gate recipes/tiny-cpu.yaml --before outputs/eval/base/scores.json \
        --after outputs/eval/after/scores.json --audit outputs/audit/fp16_audit.json \
        --report outputs/eval/eval_report.json --out outputs/gate

Writes the eval report (before, after and delta for every suite metric and length),
its plot data and PNGs (retention vs length, skill scores, before and after), and
gate_report.json with every check, passed or not. The checks (recipe `gate:`):

- fp16_safe: the FP16 audit found no activation past FP16's range (require_fp16_safe);
- retention@L, for every length L: after >= before - max_retention_drop (points);
- effective_length: not shorter than before (keep_effective_length);
- heldout_loss: after <= before + max_heldout_loss_rise (nats/token), when set;
- min_scores: the trained model's floors, by dotted metric path;
- min_gain: after - before at least this, by dotted metric path.

When a check fails and `gate.enforce` is on, the stage exits 1 with one message naming
every failed check and its numbers; DVC then stops, so export (which depends on the
gate report) does not run. `enforce: false` reports the same and exits 0.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.recipe import add_recipe_arguments, load_recipe
from pipeline.records import InputError, read_json, write_json

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--before", default="outputs/eval/base/scores.json", help="the base model's scores")
    parser.add_argument("--after", default="outputs/eval/after/scores.json", help="the trained model's scores")
    parser.add_argument("--audit", default="outputs/audit/fp16_audit.json", help="the FP16 audit of the trained model")
    parser.add_argument("--report", default="outputs/eval/eval_report.json", help="where the before/after report goes")
    parser.add_argument("--out", default="outputs/gate", help="folder for gate_report.json")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    before, after = read_json(args.before), read_json(args.after)
    for path, scores in ((args.before, before), (args.after, after)):
        if not isinstance(scores, dict) or not isinstance(scores.get("scores"), dict):
            raise InputError(f"{path}: not a posttrain eval scores.json (expected an object with `scores`)")
    audit = read_json(args.audit) if Path(args.audit).is_file() else None
    if audit is not None and not isinstance(audit, dict):
        raise InputError(f"{args.audit}: not a posttrain audit report (expected an object)")
    report = eval_report(before, after, recipe)
    write_json(args.report, report)
    plot_dir = Path(args.report).parent / "plots"
    write_plots(report, plot_dir)

    gate = run_checks(report, audit, recipe.gate)
    write_json(Path(args.out) / "gate_report.json", gate)
    if not gate["passed"] and recipe.gate.enforce:
        print(gate["message"], file=sys.stderr)
        return 1
    print(gate["message"])
    return 0


# ---------------------------------------------------------------------- report
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


def eval_report(before: dict, after: dict, recipe) -> dict[str, Any]:
    b, a = before.get("scores", {}), after.get("scores", {})
    suites = sorted(set(b) | set(a))
    report: dict[str, Any] = {
        "models": {"before": before.get("model"), "after": after.get("model")},
        "engine": {"before": before.get("engine"), "after": after.get("engine")},
        "counts": after.get("counts", {}),
        "suites": {s: {"before": b.get(s), "after": a.get(s), "delta": delta(b.get(s), a.get(s))}
                   for s in suites},
    }
    if recipe.model.tiny is not None:
        report["note"] = ("The student is model.tiny: random weights before training and a few "
                          "steps after, so its scores are at chance. The numbers mean something "
                          "on real weights.")
    return report


def get_path(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


# ---------------------------------------------------------------------- checks
def run_checks(report: dict, audit: dict | None, cfg) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, detail: str, **numbers: Any) -> None:
        checks.append({"name": name, "passed": bool(passed), "detail": detail, **numbers})

    if cfg.require_fp16_safe:
        if audit is None:
            check("fp16_safe", False, "no FP16 audit report")
        else:
            sites = [o["site"] for o in audit.get("offending", [])]
            check("fp16_safe", audit.get("fp16_safe", False),
                  f"max |activation| {audit.get('max_abs')}, offending sites: {sites or 'none'}",
                  max_abs=audit.get("max_abs"), offending=sites)

    retention = report["suites"].get("retention") or {}
    before_avg = get_path(retention.get("before"), "average") or {}
    after_avg = get_path(retention.get("after"), "average") or {}
    for length in sorted(set(before_avg) | set(after_avg), key=lambda x: int(x)):
        b, a = before_avg.get(length), after_avg.get(length)
        if not (_number(b) and _number(a)):
            check(f"retention@{length}", False, f"missing score (before {b}, after {a})")
            continue
        floor = b - cfg.max_retention_drop
        check(f"retention@{length}", a >= floor,
              f"after {a:.1f} vs before {b:.1f} (drop {b - a:.1f} points, allowed {cfg.max_retention_drop:g})",
              before=b, after=a, floor=round(floor, 4))
    if cfg.keep_effective_length and retention:
        b = get_path(retention.get("before"), "effective_length") or 0
        a = get_path(retention.get("after"), "effective_length") or 0
        check("effective_length", a >= b, f"after {a} vs before {b} tokens", before=b, after=a)

    loss = report["suites"].get("heldout_loss") or {}
    if cfg.max_heldout_loss_rise is not None and loss:
        b, a = get_path(loss, "before.overall"), get_path(loss, "after.overall")
        if _number(a) and _number(b):
            check("heldout_loss", a <= b + cfg.max_heldout_loss_rise, f"after {a} vs before {b} nats/token "
                  f"(rise allowed {cfg.max_heldout_loss_rise:g})", before=b, after=a)
        else:  # a check that cannot be measured does not pass
            check("heldout_loss", False, "not measured: no eval-split record the template can render "
                  f"(before {b}, after {a})", before=b, after=a)

    for dotted, floor in sorted(cfg.min_scores.items()):
        a = get_path(report["suites"], _side(dotted, "after"))
        check(f"min_score {dotted}", _number(a) and a >= floor, f"after {a} (minimum {floor:g})",
              after=a, minimum=floor)
    for dotted, gain in sorted(cfg.min_gain.items()):
        d = get_path(report["suites"], _side(dotted, "delta"))
        check(f"min_gain {dotted}", _number(d) and d >= gain, f"gain {d} (minimum {gain:g})",
              delta=d, minimum=gain)

    failed = [c for c in checks if not c["passed"]]
    if failed:
        message = f"gate: FAILED {len(failed)} of {len(checks)} checks: " + "; ".join(
            f"{c['name']}: {c['detail']}" for c in failed)
        if not cfg.enforce:
            message += " (gate.enforce is false: export not blocked)"
    else:
        message = f"gate: passed all {len(checks)} checks"
    return {"passed": not failed, "enforce": cfg.enforce, "checks": checks, "message": message}


def _side(dotted: str, side: str) -> str:
    """'tool_calls.overall' -> 'tool_calls.after.overall' in the report's layout."""
    suite, _, rest = dotted.partition(".")
    return f"{suite}.{side}.{rest}" if rest else f"{suite}.{side}"


# ----------------------------------------------------------------------- plots
def write_plots(report: dict, out: Path) -> None:
    """DVC plot data (JSON rows) and PNGs: retention vs length, skill scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    retention = report["suites"].get("retention") or {}
    before_avg = get_path(retention.get("before"), "average") or {}
    after_avg = get_path(retention.get("after"), "average") or {}
    lengths = sorted(set(before_avg) | set(after_avg), key=lambda x: int(x))
    rows = [{"length": int(L), "before": before_avg.get(L), "after": after_avg.get(L)} for L in lengths]
    write_json(out / "retention.json", rows)

    skills = []
    for suite, sides in sorted(report["suites"].items()):
        if suite in ("retention", "heldout_loss"):
            continue
        for metric, value in sorted((sides.get("after") or {}).items()):
            before_value = (sides.get("before") or {}).get(metric)
            if _number(value):
                skills.append({"metric": f"{suite}.{metric}", "before": before_value, "after": value})
    write_json(out / "skills.json", skills)

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, style in (("before", "o--"), ("after", "o-")):
        ax.plot([r["length"] for r in rows], [r[side] for r in rows], style, label=side)
    ax.set(xlabel="context length (student tokens)", ylabel="task average (%)", ylim=(0, 100),
           title="Retention vs length")
    if rows:
        ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, len(skills) * 0.6), 4))
    xs = range(len(skills))
    ax.bar([x - 0.2 for x in xs], [r["before"] or 0 for r in skills], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [r["after"] or 0 for r in skills], 0.4, label="after")
    ax.set_xticks(list(xs), [r["metric"] for r in skills], rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="score (%)", ylim=(0, 100), title="Skill scores, before and after")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "skills.png", dpi=100)
    plt.close(fig)
