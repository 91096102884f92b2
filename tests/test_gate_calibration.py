"""The gate's decision rule, proven with the real gate code on simulated per-item
verdicts at the SmolLM2 proof recipe's item counts (recipes/smollm2-proof.yaml):

- harmless runs (a share of the items answered afresh, no real change) are blocked at
  most 5 % of the time, at every noise level from a few items changed to every item
  drawn afresh;
- runs with a true drop of the size a check states it can detect ("detectable", read
  off the report of that base and a harmless rerun of it) are blocked at least 80 % of
  the time.

The base's per-item outcomes are drawn at rates measured on SmolLM2-135M-Instruct
(see BASE below); what the gate sees is exactly what `posttrain eval` writes per item.
`bench/gate_calibration.py` runs the same simulation with 1,000 runs per case; here
fewer runs keep CI short, with the same seeds every time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gate_calibration import block_rate, load_counts, power  # noqa: E402

RUNS = 200


@pytest.fixture(scope="module")
def setting():
    return load_counts(ROOT / "recipes/smollm2-proof.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("redraw", [0.1, 0.5, 1.0])
def test_harmless_runs_are_blocked_at_most_5_percent_of_the_time(setting, redraw):
    rate, blocked_by = block_rate(setting, runs=RUNS, redraw=redraw, seed=1)
    print(f"redraw {redraw}: {rate:.1%} of {RUNS} harmless runs blocked {blocked_by}")
    assert rate <= 0.05


@pytest.mark.slow
@pytest.mark.parametrize("check", ["ifeval.prompt_strict", "retention.average.2048", "heldout_loss.overall"])
def test_a_true_drop_of_the_stated_detectable_size_is_blocked_80_percent_of_the_time(setting, check):
    rate, blocked_by, size = power(setting, check, runs=RUNS, seed=2)
    print(f"{check}: true drop of the stated size (median {size:.3g}): {rate:.1%} of {RUNS} runs blocked {blocked_by}")
    assert rate >= 0.8
    # The drop is found by the check it was put in (a drop in a length's average is a
    # drop in its tasks too, whose own checks may block it as well).
    assert blocked_by.get(check, 0) == max(blocked_by.values())


def test_a_drop_half_the_margin_is_never_blocked(setting):
    """The margin is a floor: however significant, a drop within it passes."""
    rate, _ = block_rate(setting, runs=20, redraw=0.0, seed=3, drop={"ifeval.prompt_strict": 2.0})
    assert rate == 0.0
