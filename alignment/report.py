"""The reports, as Markdown and HTML: the search's results, with a plot of the win rate against k and SFT step
(:func:`write_report`); and ``alignment evaluate``'s, a table per judge suite across models with its plots and the
lm-eval table (:func:`write_evaluate_report`)."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from .evaluate import JUDGES

# The grid point's columns; the judge's own follow, as its entry in JUDGES declares them, then the held-out
# preference metrics where the points have them.
POINT_COLUMNS = [("k", "k"), ("sft_step", "SFT step"), ("method", "method"), ("num_pairs", "pairs")]
HELDOUT_COLUMNS = [("pref_accuracy", "held-out pref. accuracy"), ("pref_margin", "held-out margin"),
                   ("sft_eval_loss", "held-out SFT loss")]
TITLES = {"pref_accuracy": "held-out preference accuracy", "pref_margin": "held-out implicit-reward margin"}
VERDICT_COLORS = (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red"), ("invalid", "white"))
# Metrics in percent (alpaca_eval's), though named *_rate: every other *_rate, score and accuracy is a fraction.
PERCENT = ("alpaca_win_rate", "discrete_win_rate", "lc_win_rate", "lc_win_rate_estimate")


def is_fraction(metric: str) -> bool:
    """Whether a (search) metric lies in 0..1; ``<suite>/<metric>`` is its metric's."""
    name = metric.rpartition("/")[2]
    return name not in PERCENT and (name.endswith("_rate") or name in ("score", "pref_accuracy",
                                                                         "win_rate_adjusted", "verbosity_agreement"))


def _varied(results: list[dict]) -> set[str]:
    """Which of method and pairs the search varied."""
    return {key for key in ("method", "num_pairs") if len({str(r.get(key)) for r in results}) > 1}


def _columns(results: list[dict], protocol: str) -> list[tuple[str, str]]:
    """The table's columns: method and pairs only where the search varied them, then the judge's (as an evaluate
    suite's table shows them), the held-out metrics where points have them, and the suites' metrics."""
    varied = _varied(results)
    point = [(k, n) for k, n in POINT_COLUMNS if k not in ("method", "num_pairs") or k in varied]
    held = [c for c in HELDOUT_COLUMNS if any(r.get(c[0]) is not None for r in results)]
    suites = sorted({k for r in results for k in r if "/" in k and not k.endswith("_reason")})
    return point + suite_columns(protocol, results) + held + [(k, k.replace("_", " ")) for k in suites]


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
    if is_fraction(metric):
        ax.set_ylim(-0.02, 1.02)  # a fraction; a margin, a 1-10 score or a percentage has its own scale
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no point has a {metric}", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(TITLES.get(metric, f"{metric.replace('_', ' ')} against the baseline"))

    flat = len(results) > 4  # more than four bars lie on their side, one line each, so long labels stay readable
    labels = bar_labels(results, ", " if flat else "\n")
    bottom = [0] * len(results)
    for key, color in VERDICT_COLORS:
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
    page = _page("Alignment report", f"<h1>Alignment report</h1>{intro_html}<table><tr>{cells}</tr>{body_rows}"
                 f"</table><p><img alt='{metric}' src='data:image/png;base64,{img}'></p><ul>{errors}</ul>")
    (out_dir / "report.html").write_text(page)
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html"), "plot": str(png)}


# ------------------------------------------------------------------------------------- the alignment evaluate report

# The generate stage's numbers on each model's answers, after the judge's columns: (part, key, heading).
ANSWER_COLUMNS = (("counts", "prompts_answered", "answered"), ("counts", "empty_answers", "empty answers"),
                  ("metrics", "mean_new_tokens", "mean new tokens"), ("metrics", "mean_chars", "mean chars"))
ABSENT = "-"  # a key the summary does not hold at all (a None is "n/a", with its reason)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def evaluated_models(results: dict) -> list[str]:
    """Every model label of an evaluate results.json, in order of first appearance: ``models`` (where given), then
    each suite's, then the benchmarks'. A model some part lacks is shown as missing there, not dropped."""
    labels = list(results.get("models") or [])
    for suite in (results.get("suites") or {}).values():
        labels += list(suite.get("models") or {})
    labels += list(results.get("benchmarks") or {})
    return list(dict.fromkeys(labels))


def null_reason(summary: dict, key: str) -> str:
    """Why ``summary[key]`` is None: the summary's own reason (``<key>_reason`` or ``reasons[key]``; else no valid
    item, or the summary's other reasons), with the estimate beside it where it holds one (``<key>_estimate``)."""
    reasons = summary.get("reasons") if isinstance(summary.get("reasons"), dict) else {}
    why = next((v for v in (summary.get(f"{key}_reason"), reasons.get(key)) if isinstance(v, str) and v), None)
    if why is None and summary.get("valid") == 0:
        why = "no valid prompt (every judgement was unparsed or failed)"
    if why is None:
        why = "the judge's summary holds no value and no reason"
    estimate = summary.get(f"{key}_estimate")
    if _is_number(estimate):
        why += f" (estimate beside it: {_fmt(estimate)})"
    return why


def suite_columns(protocol: str, summaries: list[dict]) -> list[tuple[str, str]]:
    """A suite table's judge columns: as the protocol's JUDGES entry declares them, but an optional number that no
    summary has nor says why (the verbosity check not asked for, an estimate not needed); for a protocol without
    an entry, every number (or None) of the summaries, in their order."""
    if protocol in JUDGES:
        kind = JUDGES[protocol]
        return [(k, h) for k, h in kind.columns
                if k not in kind.optional or any(s.get(k) is not None or s.get(f"{k}_reason") for s in summaries)]
    keys = dict.fromkeys(k for s in summaries for k, v in s.items() if v is None or _is_number(v))
    return [(k, k.replace("_", " ")) for k in keys]


def _answers_value(entry: dict, part: str, key: str) -> Any:
    answers = entry.get("answers") if isinstance(entry.get("answers"), dict) else {}
    values = answers.get(part) if isinstance(answers.get(part), dict) else {}
    return values.get(key)


def plot_categories(models: list[str], summaries: dict[str, dict], baseline: str, path: Path) -> Path:
    """MT-Bench's per-category means, grouped bars: one per model and one for the baseline (as graded in the first
    judge run that holds it). A model without a summary is named in the title as missing."""
    plt = _pyplot()
    cats = {m: s["mt_bench_categories"] for m, s in summaries.items() if isinstance(s.get("mt_bench_categories"), dict)}
    categories = list(dict.fromkeys(c for v in cats.values() for side in ("target", "baseline")
                                    for c in (v.get(side) or {})))
    base = next((v["baseline"] for v in cats.values() if v.get("baseline")), {})
    series = [(m, cats[m].get("target") or {}, None) for m in models if m in cats]
    series.append((f"baseline: {baseline}", base, "//"))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(categories) + 3), 4))
    width = 0.8 / len(series)
    for i, (label, values, hatch) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        ys = [math.nan if values.get(c) is None else values[c] for c in categories]
        ax.bar(xs, ys, width, label=label, hatch=hatch, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("mean rating (1-10)")
    ax.grid(axis="y", alpha=0.3)
    missing = [m for m in models if m not in cats]
    ax.set_title("MT-Bench per category" + (f" (missing: {', '.join(missing)})" if missing else ""))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_verdicts(models: list[str], summaries: dict[str, dict], path: Path) -> Path:
    """Left: win/tie/loss/invalid per model, stacked; right, where the summaries hold it: the share of valid prompts
    whose two orders disagree (the judge's position bias). A model without a summary is a labelled empty row."""
    plt = _pyplot()
    bias = any("order_disagreement_rate" in s for s in summaries.values())
    fig, axes = plt.subplots(1, 2 if bias else 1, figsize=(11 if bias else 7, max(3.0, 1.5 + 0.45 * len(models))),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2]} if bias else None)
    labels = [m if m in summaries else f"{m} (missing)" for m in models]
    ys = list(range(len(models)))  # numeric rows, so that a model without numbers keeps its row in both panels
    ax = axes[0][0]
    left = [0.0] * len(models)
    for key, color in VERDICT_COLORS:
        vals = [(summaries.get(m) or {}).get(key) or 0 for m in models]
        ax.barh(ys, vals, left=left, color=color, edgecolor="black", linewidth=0.5, label=key)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(ys, labels)
    ax.set_ylim(len(models) - 0.5, -0.5)  # the first model on top, as in the table
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("prompts")
    ax.set_title("verdicts against the baseline")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.3 if len(models) < 4 else -0.15), ncol=4)
    if bias:
        pos = axes[0][1]
        rates = [(summaries.get(m) or {}).get("order_disagreement_rate") for m in models]
        pos.barh(ys, [math.nan if r is None else r for r in rates], color="tab:orange", edgecolor="black",
                 linewidth=0.5)
        for y, r, m in zip(ys, rates, models):
            if r is None:
                pos.text(0.02, y, "n/a" if m in summaries else "missing", va="center")
        pos.set_xlim(0, 1)
        pos.set_yticks(ys, [])
        pos.set_ylim(len(models) - 0.5, -0.5)
        pos.set_xlabel("share of valid prompts")
        pos.set_title("orders disagree (position bias)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _suite_blocks(name: str, suite: dict, models: list[str], out_dir: Path,
                  slug: str) -> tuple[list[tuple], dict[str, str]]:
    """One suite's section (intro, table, notes, plots) and the plots written."""
    protocol = suite.get("protocol") or "?"
    judge = JUDGES.get(protocol)
    entries = suite.get("models") or {}
    baseline = suite.get("baseline") or "?"
    rows_for = [m for m in models if m in entries or m != baseline]  # the baseline is the comparison, not a row
    summaries = {m: e["metrics"] for m, e in entries.items()
                 if isinstance(e, dict) and isinstance(e.get("metrics"), dict)}
    columns = suite_columns(protocol, list(summaries.values()))
    answer_cols = [c for c in ANSWER_COLUMNS if any(isinstance(e, dict) and _answers_value(e, c[0], c[1]) is not None
                                                   for e in entries.values())]
    intro = f"Protocol `{protocol}` on `{suite.get('prompts') or '?'}`, baseline `{baseline}`."
    if suite.get("judge"):
        intro += f" Judge: {str(suite['judge']).rstrip('.')}."
    blocks: list[tuple] = [("h2", f"Suite {name}"), ("p", intro)]
    blocks.append(("p", judge.note if judge else f"No JUDGES entry for `{protocol}`: the table shows every number of "
                   "its summaries."))
    rows, notes = [], []
    for m in rows_for:
        entry = entries.get(m)
        if entry is None:
            rows.append([m, *["missing"] * (len(columns) + len(answer_cols))])
            notes.append(f"`{m}`: missing, not judged on this suite.")
            continue
        if m not in summaries:
            rows.append([m, *["failed"] * len(columns), *[ABSENT] * len(answer_cols)])
            notes.append(f"`{m}`: no summary ({entry.get('error') or 'the judge stage recorded none'}).")
            continue
        s = summaries[m]
        nulls: dict[str, list[str]] = {}
        for key, heading in columns:
            if key in s and s[key] is None:
                nulls.setdefault(null_reason(s, key), []).append(heading)
        notes += [f"`{m}`: {', '.join(h)} n/a: {why}." for why, h in nulls.items()]
        cells = [_fmt(s[key]) if key in s else ABSENT for key, _ in columns]
        cells += [_fmt(_answers_value(entry, part, key)) for part, key, _ in answer_cols]
        rows.append([m, *cells])
    blocks.append(("table", ["model", *(h for _, h in columns), *(h for *_, h in answer_cols)], rows))
    if notes:
        blocks.append(("ul", notes))
    plots: dict[str, str] = {}
    if any(isinstance(s.get("mt_bench_categories"), dict) for s in summaries.values()):
        bases = [s["mt_bench_categories"].get("baseline") for s in summaries.values()
                 if isinstance(s.get("mt_bench_categories"), dict)]
        png = plot_categories(rows_for, summaries, baseline, out_dir / f"{slug}_categories.png")
        plots[f"categories:{name}"] = str(png)
        blocks.append(("img", f"{name}: MT-Bench per category", png.name))
        if any(b != bases[0] for b in bases[1:]):
            blocks.append(("p", "The baseline's per-category means differ between the models' judge runs; the plot "
                           "shows the first's."))
    if any(all(k in s for k in ("win", "tie", "loss")) for s in summaries.values()):
        png = plot_verdicts(rows_for, summaries, out_dir / f"{slug}_verdicts.png")
        plots[f"verdicts:{name}"] = str(png)
        blocks.append(("img", f"{name}: verdicts and position bias", png.name))
    return blocks, plots


def _chat_template(v: Any) -> str:
    if isinstance(v, str) and v:
        return f"yes ({v})"
    return "yes" if v else "no"


def _value_stderr(m: Any) -> str:
    if not isinstance(m, dict) or m.get("value") is None:
        return "n/a"
    return f"{_fmt(m['value'])} ± {_fmt(m.get('stderr'))}"


def _benchmark_blocks(results: dict, models: list[str]) -> list[tuple]:
    """The lm-eval table: a row per task, metric, few-shot count and chat template; a column per model."""
    blocks: list[tuple] = [("h2", "Benchmarks (lm-eval)")]
    bench = results.get("benchmarks") or {}
    if not bench:
        return [*blocks, ("p", "No lm-eval benchmarks in these results.")]
    rows: dict[tuple[str, str, str, str], dict[str, str]] = {}
    notes = []
    for m in models:
        b = bench.get(m)
        if not isinstance(b, dict) or not isinstance(b.get("tasks"), dict):
            why = b.get("error") if isinstance(b, dict) and b.get("error") else "no benchmark results for it"
            notes.append(f"`{m}`: missing ({why}).")
            continue
        common = b.get("settings") or {}
        notes.append(f"`{m}`: `{b.get('model', '?')}`, {common.get('model_type', '?')} ({common.get('dtype', '?')}), "
                     f"limit {common.get('limit')}, few-shot as multi-turn {common.get('fewshot_as_multiturn')}, "
                     f"lm-eval {common.get('lm_eval', '?')}.")
        for task, t in b["tasks"].items():
            s = {**common, **(t.get("settings") or {})}
            shots = "task default" if s.get("num_fewshot") is None else str(s["num_fewshot"])
            chat = _chat_template(s.get("apply_chat_template"))
            for metric, value in (t.get("metrics") or {}).items():
                rows.setdefault((task, metric, shots, chat), {})[m] = _value_stderr(value)
    has = {m for m in models if isinstance(bench.get(m), dict) and isinstance(bench[m].get("tasks"), dict)}
    table = [[*key, *(cells.get(m, ABSENT) if m in has else "missing" for m in models)] for key, cells in rows.items()]
    blocks.append(("p", "Each cell: value ± standard error (n/a where lm-eval computed none); *-* where that model "
                   "has no such row (another task, few-shot count or chat template)."))
    blocks.append(("table", ["task", "metric", "few-shot", "chat template", *models], table))
    return [*blocks, ("ul", notes)]


def _inline_html(text: str) -> str:
    """The few Markdown marks the report's text uses (bold, italics, code) as HTML."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", out)


def _render_md(blocks: list[tuple]) -> str:
    def cell(v: str) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines: list[str] = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            lines += ["| " + " | ".join(cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b[2]] + [""]
        elif b[0] == "ul":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif b[0] == "img":
            lines += [f"![{b[1]}]({b[2]})", ""]
    return "\n".join(lines)


def _render_html(blocks: list[tuple], out_dir: Path, title: str) -> str:
    parts = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            parts.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b[0] == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "img":
            img = base64.b64encode((out_dir / b[2]).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(b[1])}' src='data:image/png;base64,{img}'></p>")
    return _page(title, "".join(parts))


def _page(title: str, body: str) -> str:
    """A self-contained HTML page of the reports' style."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}</style></head><body>" + body + "</body></html>"
    )


def write_evaluate_report(results: dict, out_dir: Path) -> dict[str, str]:
    """``alignment evaluate``'s report from its results.json (``{"suites": {name: {"protocol", "prompts",
    "baseline", "judge", "models": {label: {"metrics", "dir", "answers"}}}}, "benchmarks": {label: lm-eval
    results}}``): report.md, report.html, and per suite an MT-Bench per-category plot (``<suite>_categories.png``,
    where the summaries hold categories) and a win/tie/loss and position-bias plot (``<suite>_verdicts.png``, where
    they hold win, tie and loss). Returns the paths written: ``markdown``, ``html``, ``categories:<suite>``,
    ``verdicts:<suite>``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = evaluated_models(results)
    suites = results.get("suites") or {}
    summary = f"Models: {', '.join(f'`{m}`' for m in models) or 'none'}. "
    named = ", ".join(f"{n} ({s.get('protocol')})" for n, s in suites.items())
    summary += f"Judge suites: {named}. " if suites else "No judge suites. "
    summary += f"Benchmarks: {len(results.get('benchmarks') or {})} model(s) through lm-eval."
    blocks: list[tuple] = [("h1", "Evaluation report"), ("p", summary)]
    paths: dict[str, str] = {}
    slugs: set[str] = set()
    for name, suite in suites.items():
        slug = base = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_.") or "suite"
        n = 1
        while slug in slugs:  # two names that differ only in odd characters
            n += 1
            slug = f"{base}_{n}"
        slugs.add(slug)
        section, plots = _suite_blocks(str(name), suite, models, out_dir, slug)
        blocks += section
        paths.update(plots)
    blocks += _benchmark_blocks(results, models)
    (out_dir / "report.md").write_text(_render_md(blocks))
    (out_dir / "report.html").write_text(_render_html(blocks, out_dir, "Evaluation report"))
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html"), **paths}
