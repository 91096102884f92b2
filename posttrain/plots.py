"""`posttrain plots`: the DAG's plots, as DVC plot data (JSON rows) and as PNG.

`dvc plots show` writes HTML that loads its chart library from a CDN, which is blank
offline, so the same data is also drawn here with matplotlib: the training loss
curve, per-layer activation maxima against FP16's limit, and acceptance per pipeline.
Each input is optional: a plot whose data is missing is skipped and said so.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from pipeline.contract import ActivationStats, GenerateStats, LossCurve, LossPoint, read_report
from pipeline.plotting import figure
from pipeline.records import write_json

log = logging.getLogger(__name__)
FP16_MAX = 65504.0


def add_arguments(parser) -> None:
    parser.add_argument("--loss", default="outputs/sft/loss_curve.json")
    parser.add_argument("--activations", default="outputs/sft/activation_stats.json")
    parser.add_argument("--acceptance", nargs="+", default=["data/synth/*/stats.json"],
                        help="per-pipeline stats.json files (globs allowed)")
    parser.add_argument("--out", default="reports")


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if Path(args.loss).is_file():
        written.append(plot_loss(read_report(args.loss, LossCurve).root, out / "loss.png"))
    if Path(args.activations).is_file():
        maxima = read_report(args.activations, ActivationStats).root
        write_json(out / "activation_maxima.json", [
            {"site": f"{kind}/{key}", "max_abs": value}
            for kind, layers in maxima.items() for key, value in layers.items()
        ])
        written.append(plot_activations(maxima, out / "activation_maxima.png"))
    stats = {Path(p).parent.name: read_report(p, GenerateStats) for g in args.acceptance for p in sorted(glob.glob(g))}
    if stats:
        write_json(out / "acceptance.json", [
            {"pipeline": name, "acceptance_rate": s.acceptance_rate, "accepted": s.accepted, "rejected": s.rejected}
            for name, s in sorted(stats.items())
        ])
        written.append(plot_acceptance(stats, out / "acceptance.png"))
    for path in written:
        print(path)
    if not written:
        log.warning("no plot data found (%s, %s, %s)", args.loss, args.activations, args.acceptance)
    return 0


def plot_loss(rows: list[LossPoint], path: Path) -> Path:
    with figure(path, (6, 3.5), dpi=110) as (_, ax):
        ax.plot([r.step for r in rows], [r.loss for r in rows], marker="o", ms=3)
        ax.set(xlabel="step", ylabel="training loss", title="SFT loss")
        ax.grid(alpha=0.3)
    return path


def plot_activations(stats: dict[str, dict[str, float | None]], path: Path) -> Path:
    """One bar group per site kind; log scale, with FP16's maximum as a line."""
    kinds = [k for k, v in stats.items() if v]
    with figure(path, (7, 2.4 * max(1, len(kinds))), rows=len(kinds) or 1, dpi=110, squeeze=False) as (_, axes):
        for ax, kind in zip(axes[:, 0], kinds):
            keys = sorted(stats[kind],
                          key=lambda k: [int(x) for x in k.split(".")] if k.replace(".", "").isdigit() else [k])
            values = [stats[kind][k] if stats[kind][k] is not None else FP16_MAX * 10 for k in keys]
            colors = ["tab:red" if v >= FP16_MAX else "tab:blue" for v in values]
            ax.bar(range(len(keys)), values, color=colors)
            ax.axhline(FP16_MAX, color="tab:red", ls="--", lw=1, label="fp16 max 65,504")
            ax.set_yscale("log")
            ax.set_xticks(range(len(keys)), keys, fontsize=7, rotation=90 if len(keys) > 16 else 0)
            ax.set_ylabel(f"{kind}\nmax |act|")
            ax.legend(fontsize=7, loc="upper left")
        axes[0, 0].set_title("max |activation| per layer during training")
    return path


def plot_acceptance(stats: dict[str, GenerateStats], path: Path) -> Path:
    names = sorted(stats)
    accepted = [stats[n].accepted for n in names]
    rejected = [stats[n].rejected for n in names]
    with figure(path, (6, 3.5), dpi=110) as (_, ax):
        ax.bar(names, accepted, label="accepted", color="tab:green")
        ax.bar(names, rejected, bottom=accepted, label="rejected", color="tab:gray")
        for i, n in enumerate(names):
            rate = stats[n].acceptance_rate
            if rate is not None:
                ax.text(i, accepted[i] + rejected[i], f"{rate:.0%}", ha="center", va="bottom", fontsize=8)
        ax.set(ylabel="records", title="synthetic data: acceptance per pipeline")
        ax.legend()
    return path
