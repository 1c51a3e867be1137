"""The report: the search's results as Markdown and HTML, with a plot of the win rate against k and SFT step."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from .evaluate import JUDGES

# The grid point's columns; the judge's own follow, as its entry in JUDGES declares them, then the held-out
# preference metrics where the points have them.
POINT_COLUMNS = [("k", "k"), ("sft_step", "SFT step"), ("method", "method"), ("num_pairs", "pairs")]
HELDOUT_COLUMNS = [("pref_accuracy", "held-out pref. accuracy"), ("pref_margin", "held-out margin")]
TITLES = {"pref_accuracy": "held-out preference accuracy", "pref_margin": "held-out implicit-reward margin"}


def _varied(results: list[dict]) -> set[str]:
    """Which of method and pairs the search varied."""
    return {key for key in ("method", "num_pairs") if len({str(r.get(key)) for r in results}) > 1}


def _columns(results: list[dict], protocol: str) -> list[tuple[str, str]]:
    """The table's columns: method and pairs only where the search varied them, then the judge's."""
    varied = _varied(results)
    point = [(k, n) for k, n in POINT_COLUMNS if k not in ("method", "num_pairs") or k in varied]
    held = [c for c in HELDOUT_COLUMNS if any(r.get(c[0]) is not None for r in results)]
    return point + list(JUDGES[protocol].columns) + held


def _point(r: dict, sep: str = ", ") -> str:
    """A grid point's name: k and SFT step, and the method and size where present."""
    parts = [f"k = {r['k']}", f"SFT step = {r['sft_step']}"]
    if r.get("method"):
        parts.append(f"method = {r['method']}")
    if r.get("num_pairs"):
        parts.append(f"pairs = {r['num_pairs']}")
    return sep.join(parts)


def bar_labels(results: list[dict], sep: str) -> list[str]:
    """Each grid point's short name: k and SFT step, and method and pairs only where the search varied them."""
    hide = {key: None for key in ("method", "num_pairs") if key not in _varied(results)}
    return [_point({**r, **hide}, sep).replace(" = ", "=").replace("SFT step", "step") for r in results]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def plot(results: list[dict], metric: str, path: Path) -> Path:
    """Left: the metric against the SFT step, one line per k. Right: win/tie/loss/invalid counts per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    steps = sorted({r["sft_step"] for r in results}, key=lambda s: (isinstance(s, str), s))
    lines = sorted({(r["k"], r.get("method"), r.get("num_pairs")) for r in results}, key=str)
    # Lines side by side by a few hundredths of a step, so that equal values (common on small eval sets) do not
    # hide one another.
    dodge = 0.04 if len(lines) > 1 else 0.0
    for i, (k, method, n) in enumerate(lines):
        shift = dodge * (i - (len(lines) - 1) / 2)
        pts = [(steps.index(r["sft_step"]) + shift, r.get(metric)) for r in results
               if (r["k"], r.get("method"), r.get("num_pairs")) == (k, method, n)]
        pts = [(x, y) for x, y in sorted(pts) if y is not None and not math.isnan(y)]
        label = f"k = {k}" + (f", {method}" if len({x[1] for x in lines}) > 1 else "") \
            + (f", {n} pairs" if len({x[2] for x in lines}) > 1 else "")
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_xlabel("SFT checkpoint step that preference tuning starts from")
    ax.set_ylabel(metric.replace("_", " "))
    if metric != "pref_margin":  # a rate; the margin is a log-probability difference, unbounded
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no point has a {metric}", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(TITLES.get(metric, f"{metric.replace('_', ' ')} against the baseline"))

    flat = len(results) > 4  # more than four bars lie on their side, one line each, so long labels stay readable
    labels = bar_labels(results, ", " if flat else "\n")
    bottom = [0] * len(results)
    for key, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red"), ("invalid", "white")):
        vals = [r.get(key) or 0 for r in results]
        style = {"color": color, "edgecolor": "black", "linewidth": 0.5, "label": key}
        if flat:
            bars.barh(labels, vals, left=bottom, **style)
        else:
            bars.bar(labels, vals, bottom=bottom, **style)
        bottom = [b + v for b, v in zip(bottom, vals)]
    (bars.set_xlabel if flat else bars.set_ylabel)("prompts")
    if flat:
        bars.invert_yaxis()  # the first grid point on top, as in the table
    bars.set_title("verdicts per grid point")
    bars.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, clear of labels
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: list[dict], cfg: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write report.md, report.html and winrate.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = cfg["search"]["metric"]
    png = plot(results, metric if metric != "score" else "score", out_dir / "winrate.png")
    judge_cfg = cfg["judge"]
    kind = JUDGES[judge_cfg["protocol"]]
    baseline = judge_cfg.get("baseline") or cfg["model"]["base"]
    ok = [r for r in results if r.get("metric") is not None]
    best = max(ok, key=lambda r: r["metric"]) if ok else None
    failed = [r for r in results if r.get("error")]

    sel = cfg["select"]
    weights = sel.get("rank_by") or {sel["scorers"][0]: 1}
    ranking = " + ".join(f"{w:g} x {n}" if w != 1 else n for n, w in weights.items())
    ranking = ranking.replace("length", f"length ({sel['length_unit']})")
    intro = [
        f"Experiment **{cfg['name']}**: model `{cfg['model']['base']}`, selection ranked by {ranking} "
        f"({sel['selector']}), preference method {', '.join(cfg['search'].get('method') or [cfg['pref']['method']])}, "
        f"starting from {cfg['pref']['start_from']}.",
        f"Judge: `{judge_cfg['model']}` ({judge_cfg['backend']}), {kind.describe(judge_cfg)}; baseline: `{baseline}`.",
        kind.note,
    ]
    if best:
        intro.append(f"Best by {metric}: {_point(best)} ({_fmt(best['metric'])}).")
    elif metric in TITLES:
        why = next((r["heldout_reason"] for r in results if r.get("heldout_reason")), "see the pref manifests")
        intro.append(f"No point has a {metric}: {why}.")
    else:
        intro.append(f"No point has a valid {metric}: every judgement was unparsed or failed.")

    columns = _columns(results, judge_cfg["protocol"])
    header = "| " + " | ".join(name for _, name in columns) + " |"
    sep = "|" + "---|" * len(columns)
    rows = ["| " + " | ".join(_fmt(r.get(key)) for key, _ in columns) + " |" for r in results]
    md = ["# Alignment report", "", *intro, "", header, sep, *rows, "", f"![{metric}](winrate.png)", ""]
    for r in failed:
        md.append(f"- {_point(r)} failed: {r['error']}")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")

    img = base64.b64encode(png.read_bytes()).decode()
    cells = "".join(f"<th>{html.escape(n)}</th>" for _, n in columns)
    body_rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in columns) + "</tr>"
                        for r in results)
    errors = "".join(f"<li>{html.escape(_point(r))} failed: {html.escape(r['error'])}</li>" for r in failed)
    intro_html = "".join(f"<p>{html.escape(p).replace('**', '')}</p>" for p in intro)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Alignment report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}</style></head><body>"
        f"<h1>Alignment report</h1>{intro_html}<table><tr>{cells}</tr>{body_rows}</table>"
        f"<p><img alt='{metric}' src='data:image/png;base64,{img}'></p><ul>{errors}</ul></body></html>"
    )
    (out_dir / "report.html").write_text(page)
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html"), "plot": str(png)}
