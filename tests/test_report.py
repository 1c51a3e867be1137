"""The report's labels and plot."""

from __future__ import annotations

from alignment import report


def test_report_plot_names_only_what_the_search_varied(tmp_path):
    point = {"win": 2, "tie": 1, "loss": 1, "invalid": 0, "win_rate": 0.5, "method": "dpo", "num_pairs": 64}
    grid = [{**point, "k": k, "sft_step": s} for k in (16, 48) for s in (3, 6)]
    assert report.bar_labels(grid, "\n") == ["k=16\nstep=3", "k=16\nstep=6", "k=48\nstep=3", "k=48\nstep=6"]
    wider = [{**r, "method": m} for r in grid for m in ("dpo", "kto")]
    assert report.bar_labels(wider, ", ")[:2] == ["k=16, step=3, method=dpo", "k=16, step=3, method=kto"]
    png = report.plot(wider, "win_rate", tmp_path / "winrate.png")  # eight bars: on their side
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
