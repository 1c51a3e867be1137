"""The selection report: what the select stage read, set aside, scored and kept, in numbers and plots.

``select_report.md`` (counts, set-aside reasons, dedup, score summaries of pool vs selection) and
``select_report.png``: one histogram per score (pool vs selection, each normalised to its own size), the
response length of pool vs selection, and, for the kmeans selector, rows per cluster in pool and selection.
The pool's columns are read from ``scored.parquet`` column by column (floats only), so a million-row pool
costs a few MB here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _score_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if (f.name.startswith("score") and f.name != "score_error"
                                       and pa.types.is_floating(f.type))]


def _summary(values: np.ndarray) -> str:
    v = values[~np.isnan(values)]
    if not len(v):
        return "n/a"
    q = np.percentile(v, [0, 50, 100])
    return f"{q[0]:.4g} / {q[1]:.4g} / {q[2]:.4g} (mean {v.mean():.4g})"


def plot(pool: dict[str, np.ndarray], chosen: dict[str, np.ndarray], clusters: dict[str, Any] | None,
         path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in pool if c != "chars"] + (["chars"] if "chars" in pool else [])
    n = len(panels) + (1 if clusters else 0)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, col in zip(axes, panels):
        p, c = pool[col][~np.isnan(pool[col])], chosen[col][~np.isnan(chosen[col])]
        if not len(p):
            ax.set_visible(False)
            continue
        lo, hi = float(p.min()), float(p.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(p, bins=bins, density=True, alpha=0.55, label=f"pool ({len(p):,})")
        ax.hist(c, bins=bins, density=True, alpha=0.55, label=f"selected ({len(c):,})")
        ax.set_title("response length (characters, all assistant turns)" if col == "chars" else col)
        ax.legend(fontsize=8)
    if clusters:
        ax = axes[len(panels)]
        x = np.arange(clusters["clusters"])
        pool_n = np.asarray(clusters["pool_per_cluster"], float)
        sel_n = np.asarray(clusters["selected_per_cluster"], float)
        ax.bar(x, pool_n / pool_n.sum(), width=0.9, alpha=0.55, label="pool")
        ax.bar(x, sel_n / max(sel_n.sum(), 1), width=0.5, alpha=0.8, label="selected")
        ax.set_title(f"share of rows per cluster ({int((sel_n > 0).sum())} of {len(x)} clusters covered)")
        ax.set_xlabel("cluster")
        ax.legend(fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out_dir: Path, scored: Path, selected: pa.Table, counts: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write ``select_report.md`` and ``select_report.png`` in ``out_dir``; returns the Markdown path."""
    cols = []
    pool: dict[str, np.ndarray] = {}
    if scored.exists():
        schema = pq.read_schema(scored)
        cols = _score_columns(schema) + (["chars"] if "chars" in schema.names else [])
        if len(metrics["ranking"]) == 1:  # ``score`` is then the one ranking column again
            cols.remove("score")
        t = pq.read_table(scored, columns=cols)
        pool = {c: t[c].to_numpy(zero_copy_only=False).astype(float) for c in cols}
    chosen = {c: (selected[c].to_numpy(zero_copy_only=False).astype(float) if c in selected.column_names
                  else np.zeros(0)) for c in cols}
    lines = [
        "# Selection report", "",
        f"Selector `{metrics['selector']}`, ranking by {json.dumps(metrics['ranking'])} (scorers: "
        f"{', '.join(metrics['scorers'])}).", "",
        "| rows | count |", "|---|---|",
        *[f"| {k.removeprefix('rows_').replace('_', ' ')} | {counts[k]:,} |" for k in
          ("rows_read", "rows_duplicate", "rows_invalid", "rows_unscored", "rows_set_aside", "rows_kept",
           "rows_selected") if k in counts],
        "", f"rows read = kept + set aside: {counts['rows_read']:,} = {counts['rows_kept']:,} + "
            f"{counts['rows_set_aside']:,}.", "",
    ]
    if counts.get("set_aside_reasons"):
        lines += ["| set aside because | rows |", "|---|---|",
                  *[f"| {k} | {v:,} |" for k, v in sorted(counts["set_aside_reasons"].items(), key=lambda x: -x[1])],
                  "", "Each one, with its file, row and reason: `set_aside.jsonl`.", ""]
    if counts.get("dedup"):
        d = counts["dedup"]
        lines += [f"Dedup ({d['mode']}): {d['exact']:,} exact and {d['near']:,} near duplicates removed"
                  + (f" (MinHash LSH, Jaccard threshold {d['threshold']}, {d['num_perm']} permutations, "
                     f"{d['bands']} bands of {d['rows_per_band']}, {d['ngram']}-word shingles)" if d["mode"] == "near"
                     else "") + ".", ""]
    dup_ids = counts.get("duplicate_ids") or {}
    if dup_ids.get("rows"):
        shown = "; ".join(f"`{i}` at {', '.join(where)}" for i, where in dup_ids["examples"].items())
        lines += [f"Duplicate ids: {dup_ids['rows']:,} kept rows share their id with another row ({dup_ids['ids']:,} "
                  f"ids, e.g. {shown}). Ids key the random scorer, k-means sampling and the training splits: "
                  "make them unique.", ""]
    for fmt, n in (counts.get("export_set_aside") or {}).items():
        lines += [f"{n:,} selected rows left out of the {fmt} export (the format cannot hold them); each one with "
                  f"its rank and reason: `selected.{fmt}.set_aside.jsonl`.", ""]
    if counts.get("repr_filter"):
        r = counts["repr_filter"]
        lines += [f"Repr filter: {r['scanned']:,} rows scanned in score order, {r['kept']:,} kept, "
                  f"{r['rejected_as_similar']:,} rejected as too similar to a kept row.", ""]
    if counts.get("kmeans"):
        km = counts["kmeans"]
        covered = sum(1 for x in km["selected_per_cluster"] if x)
        lines += [f"k-means: {km['clusters']} clusters fitted on {km['fit_rows']:,} rows; the selection covers "
                  f"{covered} of them (rows per cluster in the pool: {min(km['pool_per_cluster'])} to "
                  f"{max(km['pool_per_cluster'])}).", ""]
    if cols:
        lines += ["| column | pool: min / median / max | selected: min / median / max |", "|---|---|---|",
                  *[f"| {c} | {_summary(pool[c])} | {_summary(chosen[c])} |" for c in cols], ""]
        png = plot(pool, chosen, counts.get("kmeans"), out_dir / "select_report.png")
        lines += [f"![scores, lengths and clusters of pool vs selection]({png.name})", ""]
    path = out_dir / "select_report.md"
    path.write_text("\n".join(lines))
    return path
