"""The one figure helper every plot goes through (pipeline/plotting.py): a figure is
written where asked, and one whose drawing fails writes nothing and stays open in no
long-running process (the gate and DPO draw several)."""

from __future__ import annotations

import pytest

from pipeline.plotting import figure


def test_a_figure_is_written_and_closed_and_a_failed_one_is_neither_written_nor_left_open(tmp_path):
    import matplotlib.pyplot as plt

    with figure(tmp_path / "sub" / "ok.png", (3, 2), rows=2, sharex=True) as (_, (top, bottom)):
        top.plot([1, 2], [3, 4])
        bottom.bar([1, 2], [1, 0])
    assert (tmp_path / "sub" / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="bad data"):
        with figure(tmp_path / "bad.png", (3, 2)) as (_, ax):
            ax.plot([1], [1])
            raise ValueError("bad data")
    assert not (tmp_path / "bad.png").exists()
    assert plt.get_fignums() == []
