"""`posttrain summary [--root .]`: what the last run produced, in about 30 lines.

Reads the reports the stages write (at the paths dvc.yaml gives them) and prints the
numbers a person checks first: per pipeline accepted / generated and the top reject
reason; dedup, review buckets and the mix; training loss first -> last, the records
max_length truncated or cut to no answer, and max |activation| per site kind;
preference pairs and DPO; the FP16 verdict; the export check; eval and gate results
when those stages have run; where the data, model and plots are. A missing report
prints "not run". Not a DVC stage: it only reads. `make run` ends with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERATE = "data/synth/*/stats.json"
REPORTS = {
    "dedup": "data/dedup/dedup_stats.json",
    "review": "data/review/review_stats.json",
    "mix": "data/mix/mix_stats.json",
    "prefs": "data/prefs/prefs_stats.json",
    "pair_review": "data/prefs/review/review_stats.json",
    "dpo": "outputs/dpo/dpo_metrics.json",
    "train": "outputs/sft/train_metrics.json",
    "activations": "outputs/sft/activation_stats.json",
    "audit": "outputs/audit/fp16_audit.json",
    "export": "outputs/export/export_report.json",
    "eval": "outputs/eval/eval_report.json",
    "gate": "outputs/gate/gate_report.json",
}
WHERE = [
    ("data", ["data/synth", "data/dedup", "data/review", "data/mix", "data/prefs"]),
    ("model", ["outputs/sft/final", "outputs/dpo/final", "outputs/export/profiles"]),
    ("reports", ["outputs/sft", "outputs/dpo", "outputs/audit", "outputs/export", "outputs/eval", "outputs/gate"]),
    ("plots", ["reports", "outputs/audit/fp16_audit.png", "outputs/eval/plots"]),
]
NAME = 11  # label column width


def add_arguments(parser) -> None:
    parser.add_argument("--root", default=".", help="the project folder the stages wrote into")


def main(args) -> int:
    print("\n".join(summary(Path(args.root))))
    return 0


def summary(root: Path) -> list[str]:
    reports = {name: _read(root / path) for name, path in REPORTS.items()}
    lines = [f"posttrain summary of {root.resolve()}"]
    for section in (generation, dedup, review, mix, train, preferences, audit, export, evaluation, gate):
        try:
            lines += section(root, reports)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A stage changed its report's shape: say so and keep going.
            lines.append(_row(section.__name__, f"unexpected report shape ({exc!r})"))
    lines += where(root)
    return lines


# ------------------------------------------------------------------ sections
def generation(root: Path, _reports) -> list[str]:
    stats = sorted(root.glob(GENERATE))
    if not stats:
        return [_row("generate", f"not run (no {GENERATE})")]
    lines = [_row("generate", "accepted / generated, top reject reason")]
    for path in stats:
        s = _read(path) or {}
        reasons = s.get("reject_reasons") or {}
        top = max(reasons.items(), key=lambda kv: kv[1]) if reasons else None
        lines.append((f"  {path.parent.name:<14}{s.get('accepted', '?'):>5} / {s.get('generated', '?'):<5}"
                      + (f" {top[0]} ({top[1]})" if top else "")).rstrip())
    return lines


def dedup(_root, reports) -> list[str]:
    d = reports["dedup"]
    if d is None:
        return [_missing("dedup")]
    removed = ", ".join(f"{k} {v}" for k, v in (d.get("removed") or {}).items()) or "none"
    return [_row("dedup", f"{d['input']} in, {d['kept']} kept; removed: {removed}")]


def review(_root, reports) -> list[str]:
    r = reports["review"]
    if r is None:
        return [_missing("review")]
    buckets = ", ".join(f"{b} {r[b]}" for b in ("accepted", "corrected", "rejected", "pending") if b in r)
    how = f" (mode {r['mode']}" + (f", server {r['server']})" if r.get("server") else ", no server)") \
        if "mode" in r else ""
    return [_row("review", f"{r['total']} in: {buckets}{how}")]


def mix(_root, reports) -> list[str]:
    m = reports["mix"]
    if m is None:
        return [_missing("mix")]
    per = ", ".join(f"{c} {v['in_mix']}" for c, v in (m.get("per_category") or {}).items())
    return [_row("mix", f"train {m['train']}, eval {m['eval']}, unused {m['unused']}"
                 + (f"; by category {per}" if per else ""))]


def train(_root, reports) -> list[str]:
    t = reports["train"]
    if t is None:
        return [_missing("train")]
    lines = [_row("train", f"{t.get('mode', '?')}, {t.get('global_step', '?')} steps, "
                  f"loss {_num(t.get('first_loss'))} -> {_num(t.get('final_loss'))}"
                  + _truncation(t.get("truncation"), "train"))]
    by_kind = (t.get("activation_loss") or {}).get("max_abs") or {
        kind: max((v for v in layers.values() if v is not None), default=None)
        for kind, layers in (reports["activations"] or {}).items()}
    if by_kind:
        alpha = (t.get("activation_loss") or {}).get("alpha")
        lines.append(_row("activation", "max |activation| in training: "
                          + ", ".join(f"{k} {_num(v)}" for k, v in by_kind.items())
                          + (f" (alpha {alpha:g})" if alpha is not None else "")))
    else:
        lines.append(_row("activation", "activation loss off: maxima in the FP16 audit"))
    return lines


def preferences(_root, reports) -> list[str]:
    p, r, d = reports["prefs"], reports["pair_review"], reports["dpo"]
    if p is None:
        return [_missing("prefs")]
    per = ", ".join(f"{name} {c['pairs']}/{c['prompts']}" for name, c in p["pipelines"].items())
    lines = [_row("prefs", f"{p['pairs']} pairs (pairs / prompts: {per})")]
    if r is not None:
        buckets = ", ".join(f"{b} {r[b]}" for b in ("accepted", "corrected", "rejected", "pending") if b in r)
        lines.append(_row("", f"pair review: {buckets}"))
    if d is None:
        lines.append(_missing("dpo"))
    elif not d.get("enabled"):
        lines.append(_row("dpo", "off (dpo.enabled: false): audit, eval and export use the SFT model"))
    else:
        lines.append(_row("dpo", f"{d.get('global_step', '?')} steps on {d.get('pairs', '?')} pairs, reward "
                          f"margin {_num(d.get('margin_first'))} -> {_num(d.get('margin_last'))}, accuracy "
                          f"{_num(d.get('accuracy_first'))} -> {_num(d.get('accuracy_last'))}"
                          + _truncation(d.get("truncation"))))
    return lines


def audit(_root, reports) -> list[str]:
    a = reports["audit"]
    if a is None:
        return [_missing("audit")]
    verdict = "fp16-safe" if a["fp16_safe"] else "NOT fp16-safe"
    offending = [o["site"] for o in a.get("offending") or []]
    kinds = ", ".join(f"{k} {_num(v)}" for k, v in (a.get("max_abs_by_kind") or {}).items())
    lines = [_row("fp16 audit", f"{verdict}, max |activation| {_num(a.get('max_abs'))}, "
                  f"fp16 vs fp32 max |logit diff| {_num((a.get('logits') or {}).get('max_abs_diff'))}")]
    if kinds:
        lines.append(_row("", f"by site kind: {kinds}"))
    if offending:
        lines.append(_row("", f"offending: {', '.join(offending[:6])}"
                          + (f" and {len(offending) - 6} more" if len(offending) > 6 else "")))
    return lines


def export(_root, reports) -> list[str]:
    e = reports["export"]
    if e is None:
        return [_missing("export")]
    parts = []
    for profile, p in e["profiles"].items():
        if "skipped" in p:
            continue
        tolerance = p.get("tolerance", e.get("tolerance"))
        parts.append(f"{profile} {_num(p['max_abs_logit_diff'])} "
                     + ("ok" if p["passed"] else f"FAILED (tolerance {_num(tolerance)})"))
    verdict = "passed" if all(p.get("passed", True) for p in e["profiles"].values()) else "FAILED"
    effect = e.get("adapter_effect_max_abs_logit_diff")
    return [_row("export", f"{verdict} ({e.get('kind', '?')}): max |logit diff| " + ", ".join(parts)
                 + (f"; adapter effect {_num(effect)}" if effect is not None else ""))]


def evaluation(_root, reports) -> list[str]:
    """One line per suite: its headline numbers before -> after. Skipped when not run."""
    e = reports["eval"]
    if e is None:
        return []
    lines = [_row("eval", "before -> after")]
    for suite, sides in (e.get("suites") or {}).items():
        after = _leaves(sides.get("after"))
        before = _leaves(sides.get("before"))
        shown = [k for k in after if k.split(".")[0] in ("overall", "average")] or list(after)
        text = ", ".join(f"{k or suite} {_num(before.get(k))} -> {_num(after[k])}" for k in shown[:3])
        lines.append(f"  {suite:<14}{text or 'no scores'}")
    return lines


def gate(_root, reports) -> list[str]:
    g = reports["gate"]
    if g is None:
        return []
    checks = g.get("checks") or []
    failed = [c.get("name", "?") for c in checks if not c.get("passed")]
    text = (f"passed all {len(checks)} checks" if g.get("passed") else
            f"FAILED {len(failed)} of {len(checks)} checks: {', '.join(failed)}"
            + ("" if g.get("enforce", True) else " (not enforced)"))
    return [_row("gate", text)]


def where(root: Path) -> list[str]:
    lines = []
    for label, paths in WHERE:
        present = [p for p in paths if (root / p).exists()]
        if present:
            lines.append(_row(label, "  ".join(p + ("/" if (root / p).is_dir() else "") for p in present)))
    if lines:
        lines.append(_row("more", "dvc metrics show; dvc plots show --open"))
    return lines


# ------------------------------------------------------------------- helpers
def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(label: str, text: str) -> str:
    return f"{label:<{NAME}}{text}"


def _missing(name: str) -> str:
    return _row(name, f"not run (no {REPORTS[name]})")


def _truncation(report: Any, split: str | None = None) -> str:
    """'; max_length 1024: 3 truncated, 1 answer cut, 1 skipped' from a trainer's
    `truncation` report ('' from a report written before there was one)."""
    if not report:
        return ""
    counts = report[split] if split else report
    return (f"; max_length {report['max_length']}: {counts['truncated']} truncated, "
            f"{counts['answer_cut']} answer cut, {counts['skipped']} skipped")


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.4g}"


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Numeric leaves of a nested dict as {"a.b": value} ("" for a bare number)."""
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix: tree}
    if not isinstance(tree, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out

