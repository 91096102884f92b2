"""Standard errors of the suites' metrics, in each metric's own unit (percent for the
generation suites, nats/token for the losses). Every suite's `metrics` carries them as
`stderr`, nested like the metrics they belong to.

- A mean over items (a task x length cell, a BFCL category, IFEval's prompt level):
  lm-evaluation-harness's closed form, the sample standard deviation over sqrt(n)
  (`lm_eval.api.metrics.mean_stderr`). Fewer than two items: None (lm-eval prints N/A).
- A ratio of sums (a token-weighted loss; IFEval's instruction level, instructions
  over prompts): the ratio estimator's standard error with the item (or the cluster
  of items sharing a context) as the sampling unit,
  sqrt(n / (n - 1) * sum((y_i - R x_i)^2)) / sum(x_i). With equal x_i it is the
  closed form above of y_i / x_i.
- An unweighted mean of k independent means (BFCL's simple over its languages, its
  Non-Live AST summary, RULER's average over tasks): sqrt(sum(se_i^2)) / k; None when
  any part has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def of_mean(values: Sequence[float]) -> float | None:
    """lm-eval's closed form for the standard error of a mean (N/A below 2 items)."""
    from lm_eval.api.metrics import mean_stderr

    return round(float(mean_stderr(list(values))), 4) if len(values) > 1 else None


def of_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Standard error of sum(numerators) / sum(denominators), one pair per unit."""
    n, total = len(numerators), float(sum(denominators))
    if n < 2 or total <= 0:
        return None
    ratio = sum(numerators) / total
    spread = sum((y - ratio * x) ** 2 for y, x in zip(numerators, denominators, strict=True))
    return round(math.sqrt(n / (n - 1) * spread) / total, 4)


def of_mean_of_means(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of the unweighted mean of independent means."""
    if not stderrs or any(s is None for s in stderrs):
        return None
    return round(math.sqrt(sum(s * s for s in stderrs)) / len(stderrs), 4)
