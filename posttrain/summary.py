"""`posttrain summary [--root .]`: what the last run produced, in about 30 lines.

Reads the reports the stages write (at the paths dvc.yaml gives them) and prints the
numbers a person checks first: per pipeline accepted / generated and the top reject
reason; dedup, review buckets and the mix; training loss first -> last, the records
max_length truncated or cut to no answer, and max |activation| per site kind;
preference pairs and DPO; GRPO's rewards; the FP16 verdict; the export check; eval and gate results
when those stages have run; where the data, model and plots are. A missing report
prints "not run"; a report that breaks the contract (pipeline.contract, which reads
every one) prints the contract's error on its section's line. Not a DVC stage: it only
reads. `make run` ends with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.contract import ARTIFACTS, GenerateStats, Report, ReviewStats, Truncation, read_report
from pipeline.records import InputError

GENERATE = "data/synth/*/stats.json"
REPORTS = {
    "dedup": "data/dedup/dedup_stats.json",
    "review": "data/review/review_stats.json",
    "mix": "data/mix/mix_stats.json",
    "prefs": "data/prefs/prefs_stats.json",
    "pair_review": "data/prefs/review/review_stats.json",
    "dpo": "outputs/dpo/dpo_metrics.json",
    "grpo": "outputs/grpo/grpo_metrics.json",
    "train": "outputs/sft/train_metrics.json",
    "activations": "outputs/sft/activation_stats.json",
    "audit": "outputs/audit/fp16_audit.json",
    "export": "outputs/export/export_report.json",
    "eval": "outputs/eval/eval_report.json",
    "gate": "outputs/gate/gate_report.json",
}
WHERE = [
    ("data", ["data/synth", "data/dedup", "data/review", "data/mix", "data/prefs"]),
    ("model", ["outputs/sft/final", "outputs/dpo/final", "outputs/grpo/final", "outputs/export/profiles"]),
    ("reports", ["outputs/sft", "outputs/dpo", "outputs/grpo", "outputs/audit", "outputs/export", "outputs/eval", "outputs/gate"]),
    ("plots", ["reports", "outputs/audit/fp16_audit.png", "outputs/eval/plots"]),
]
NAME = 11  # label column width


def add_arguments(parser) -> None:
    parser.add_argument("--root", default=".", help="the project folder the stages wrote into")


def main(args) -> int:
    print("\n".join(summary(Path(args.root))))
    return 0


class Reports(dict):
    """Report name -> the report as read through the contract (None: not written yet),
    read when a section first asks, so a broken report fails only its own section."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Any:
        self[name] = _read(self.root / REPORTS[name], ARTIFACTS[REPORTS[name]].model)
        return self[name]


def summary(root: Path) -> list[str]:
    reports = Reports(root)
    lines = [f"posttrain summary of {root.resolve()}"]
    for section in (generation, dedup, review, mix, train, preferences, grpo, audit, export, evaluation, gate):
        try:
            lines += section(root, reports)
        except InputError as exc:
            lines.append(_row(section.__name__, str(exc)))
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
        s = read_report(path, GenerateStats)
        top = max(s.reject_reasons.items(), key=lambda kv: kv[1]) if s.reject_reasons else None
        lines.append((f"  {path.parent.name:<14}{s.accepted:>5} / {s.generated:<5}"
                      + (f" {top[0]} ({top[1]})" if top else "")).rstrip())
    return lines


def dedup(_root, reports) -> list[str]:
    d = reports["dedup"]
    if d is None:
        return [_missing("dedup")]
    removed = ", ".join(f"{k} {v}" for k, v in d.removed.items()) or "none"
    return [_row("dedup", f"{d.input} in, {d.kept} kept; removed: {removed}")]


REVIEW_BUCKETS = ("accepted", "corrected", "rejected", "disputed", "pending")


def review(_root, reports) -> list[str]:
    r = reports["review"]
    if r is None:
        return [_missing("review")]
    how = f" (mode {r.mode}" + (f", server {r.server})" if r.server else ", no server)") \
        if "mode" in r.model_fields_set else ""
    return [_row("review", f"{r.total} in: {_buckets(r)}{how}")] + _kappa_lines(r)


def _buckets(r: ReviewStats) -> str:
    return ", ".join(f"{b} {getattr(r, b)}" for b in REVIEW_BUCKETS)


def _kappa_lines(r: ReviewStats) -> list[str]:
    """Reviewer agreement (Fleiss' kappa) where several reviewers answered records."""
    parts = []
    for pipeline, by_question in (r.kappa or {}).items():
        for question, k in by_question.items():
            if k.records:
                kappa = "n/a" if k.kappa is None else f"{k.kappa:.2f}"
                parts.append(f"{pipeline} {question} {kappa} (n={k.records})")
    return [_row("", "agreement (kappa): " + ", ".join(parts))] if parts else []


def mix(_root, reports) -> list[str]:
    m = reports["mix"]
    if m is None:
        return [_missing("mix")]
    per = ", ".join(f"{c} {v.in_mix}" for c, v in (m.per_category or {}).items())
    return [_row("mix", f"train {m.train}, eval {m.eval}, unused {m.unused}"
                 + (f"; by category {per}" if per else ""))]


def train(_root, reports) -> list[str]:
    t = reports["train"]
    if t is None:
        return [_missing("train")]
    lines = [_row("train", f"{t.mode}, {t.global_step} steps, "
                  f"loss {_num(t.first_loss)} -> {_num(t.final_loss)}"
                  + _truncation(t.truncation, "train"))]
    maxima = reports["activations"]
    by_kind = (t.activation_loss and t.activation_loss.max_abs) or {
        kind: max((v for v in layers.values() if v is not None), default=None)
        for kind, layers in (maxima.root if maxima is not None else {}).items()}
    if by_kind:
        alpha = t.activation_loss.alpha if t.activation_loss else None
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
    per = ", ".join(f"{name} {c.pairs}/{c.prompts}" for name, c in p.pipelines.items())
    lines = [_row("prefs", f"{p.pairs} pairs (pairs / prompts: {per})")]
    if r is not None:
        lines.append(_row("", f"pair review: {_buckets(r)}"))
        lines += _kappa_lines(r)
    if d is None:
        lines.append(_missing("dpo"))
    elif not d.enabled:
        lines.append(_row("dpo", "off (dpo.enabled: false): audit, eval and export use the SFT model"))
    else:
        lines.append(_row("dpo", f"{_given(d, 'global_step')} steps on {_given(d, 'pairs')} pairs, reward "
                          f"margin {_num(d.margin_first)} -> {_num(d.margin_last)}, accuracy "
                          f"{_num(d.accuracy_first)} -> {_num(d.accuracy_last)}"
                          + _truncation(d.truncation)))
    return lines


def grpo(_root, reports) -> list[str]:
    g = reports["grpo"]
    if g is None:
        return [_missing("grpo")]
    if not g.enabled:
        return [_row("grpo", "off (grpo.enabled: false): audit, eval and export use the model before it")]
    share = g.activation_loss_share_mean
    steps = "?" if g.global_step is None else g.global_step
    prompts = "?" if g.prompts is None else g.prompts
    rows = [_row("grpo", f"{steps} steps on {prompts} prompts, reward "
                 f"{_num(g.reward_first)} -> {_num(g.reward_last)}"
                 + (f", activation loss {_num(share)} of the loss" if share is not None else ""))]
    h = g.heldout_reward
    if h is not None:
        rows.append(_row("", f"held-out reward {_num(h.before)} -> {_num(h.after)} "
                         f"({h.delta:+.3g} [{h.low:+.3g}, {h.high:+.3g}], p {h.p:.2g}, {h.prompts} prompts)"))
    return rows


def audit(_root, reports) -> list[str]:
    a = reports["audit"]
    if a is None:
        return [_missing("audit")]
    verdict = "fp16-safe" if a.fp16_safe else "NOT fp16-safe"
    offending = [o.site for o in a.offending]
    kinds = ", ".join(f"{k} {_num(v)}" for k, v in (a.max_abs_by_kind or {}).items())
    lines = [_row("fp16 audit", f"{verdict}, max |activation| {_num(a.max_abs)}, "
                  f"fp16 vs fp32 max |logit diff| {_num(a.logits.max_abs_diff if a.logits else None)}")]
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
    for profile, p in e.profiles.items():
        if "skipped" in p.model_fields_set:
            continue
        tolerance = p.tolerance if "tolerance" in p.model_fields_set else e.tolerance
        parts.append(f"{profile} {_num(p.max_abs_logit_diff)} "
                     + ("ok" if p.passed else f"FAILED (tolerance {_num(tolerance)})"))
    # A skipped profile has no verdict: it fails nothing.
    verdict = "passed" if all(p.passed or "passed" not in p.model_fields_set
                              for p in e.profiles.values()) else "FAILED"
    effect = e.adapter_effect_max_abs_logit_diff
    return [_row("export", f"{verdict} ({_given(e, 'kind')}): max |logit diff| " + ", ".join(parts)
                 + (f"; adapter effect {_num(effect)}" if effect is not None else ""))]


# The metrics each suite shows first in the summary (the gate's checks).
HEADLINES = ("retention.average.", "ifeval.prompt_strict", "tool_calls.non_live_ast",
             "tool_calls.irrelevance", "heldout_loss.overall", "forgetting.overall")


def evaluation(_root, reports) -> list[str]:
    """The gate's headline metrics: before -> after, the change with its 95 % interval,
    the p-value and the item count. Skipped when not run."""
    e = reports["eval"]
    if e is None:
        return []
    comparisons = e.comparisons
    lines = [_row("eval", "before -> after (change [95% interval], p, items)")]
    for name, c in comparisons.items():
        if not name.startswith(HEADLINES):
            continue
        lines.append(f"  {name:<26}{_num(c.before)} -> {_num(c.after)} "
                     f"({c.delta:+.3g} [{_num(c.low)}, {_num(c.high)}], p {_num(c.p)}, "
                     f"{c.items})")
    if not comparisons:
        lines.append("  no paired comparisons (re-run the gate stage)")
    return lines


def gate(_root, reports) -> list[str]:
    g = reports["gate"]
    if g is None:
        return []
    checks = g.checks
    failed = [c.name for c in checks if not c.passed]
    uninformative = g.uninformative
    if g.passed:
        text = f"passed {len(checks) - len(uninformative)} of {len(checks)} checks"
    else:
        text = (f"FAILED {len(failed)} of {len(checks)} checks: {', '.join(failed)}"
                + ("" if g.enforce else " (not enforced)"))
    lines = [_row("gate", text)]
    if uninformative:
        lines.append(_row("", f"uninformative (base no better than an empty answer): {', '.join(uninformative)}"))
    if g.off:
        lines.append(_row("", f"off: {', '.join(g.off)}"))
    return lines


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
def _read(path: Path, model) -> Any:
    """The report through the contract, or None when the stage has not written it."""
    return read_report(path, model) if path.is_file() else None


def _row(label: str, text: str) -> str:
    return f"{label:<{NAME}}{text}"


def _missing(name: str) -> str:
    return _row(name, f"not run (no {REPORTS[name]})")


def _truncation(report: Truncation | None, split: str | None = None) -> str:
    """'; max_length 1024: 3 truncated, 1 answer cut, 1 skipped' from a trainer's
    `truncation` report ('' from a report written before there was one)."""
    if report is None:
        return ""
    counts = getattr(report, split) if split else report
    return (f"; max_length {report.max_length}: {counts.truncated} truncated, "
            f"{counts.answer_cut} answer cut, {counts.skipped} skipped")


def _given(report: Report, field: str) -> Any:
    """An optional field as the report gave it, '?' where it left the key out."""
    return getattr(report, field) if field in report.model_fields_set else "?"


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.4g}"
