"""How far reviewers agree beyond chance: Fleiss' kappa per question, from statsmodels.

Argilla gives each record to whichever reviewers pick it up, so the raters differ
from record to record: Fleiss' kappa fits that (Cohen's needs the same two raters
throughout). It needs the same number of answers per record, so every record
answered by at least two reviewers contributes the answers of its first k reviewers
(by user id), k being the fewest any such record has; `raters` says which k.

kappa is 1 for perfect agreement, 0 for what chance alone would give, below 0 for
less. When every answer is the same category, chance agreement is 1 too and kappa is
undefined: it is reported as null with that reason, and `observed` (the share of
agreeing rater pairs) still says how much reviewers agreed.
"""

from __future__ import annotations

from typing import Any


def fleiss_by_question(answers: dict[str, dict[str, dict]], questions: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """answers: record id -> user id -> {question: value}; one summary per question."""
    return {question: fleiss(_ratings(answers, question)) for question in questions}


def _ratings(answers: dict[str, dict[str, dict]], question: str) -> list[list[str]]:
    rated = []
    for by_user in answers.values():
        values = [str(a[question]) for _, a in sorted(by_user.items()) if a.get(question) is not None]
        if len(values) >= 2:
            rated.append(values)
    return rated


def fleiss(rated: list[list[str]]) -> dict[str, Any]:
    """Fleiss' kappa of records' categorical answers (each a list of >= 2 answers)."""
    import numpy as np
    from statsmodels.stats.inter_rater import fleiss_kappa

    if len(rated) < 2:
        return {"kappa": None, "records": len(rated), "note": "needs two or more records with two or more answers"}
    k = min(len(values) for values in rated)
    categories = sorted({v for values in rated for v in values[:k]})
    table = np.array([[values[:k].count(c) for c in categories] for values in rated])
    # Share of agreeing rater pairs per record, averaged: Fleiss' observed agreement.
    observed = float(np.mean((np.sum(table * table, axis=1) - k) / (k * (k - 1))))
    summary: dict[str, Any] = {"records": len(rated), "raters": k, "categories": categories,
                               "observed": round(observed, 4), "method": "fleiss (statsmodels)"}
    if len(categories) == 1:
        return {"kappa": None, **summary, "note": "every answer the same: kappa undefined"}
    return {"kappa": round(float(fleiss_kappa(table, method="fleiss")), 4), **summary}
