"""One place for the project's figures: headless matplotlib (the Agg backend: no
display on a training node or in CI), one figure per file, laid out, saved and closed
even when drawing fails. The stages draw their own reports' plots with it (the audit,
the gate, DPO) and `posttrain plots` the training ones; what a plot shows stays with
the stage that owns the numbers."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def figure(path: str | Path, figsize: tuple[float, float], rows: int = 1, dpi: int = 100,
           **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """(figure, axes) of `rows` stacked plots; on leaving, written to `path` (its folder
    made) at `dpi`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=figsize, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
