"""The reports, as Markdown and HTML: the search's results, with a plot of the metric against k and SFT step, the
metric against the SFT step with and without preference tuning, and the selection against a random selection per k
(:func:`write_report`); and ``alignment evaluate``'s, a table per judge suite across models with its plots and the
lm-eval table (:func:`write_evaluate_report`)."""

from __future__ import annotations

import base64
import html
import math
import os
import re
import statistics
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


def _num(v: Any) -> float | None:
    """A finite number as a float; None for None, NaN, a bool or anything else."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _order(v: Any) -> tuple:
    """A sort key over mixed values: numbers by value, then the rest by their text."""
    n = _num(v)
    return (0, n, "") if n is not None else (1, 0.0, str(v))


def _varied(results: list[dict], keys: tuple[str, ...] = ("method", "num_pairs", "beta", "selection")) -> set[str]:
    """Which of ``keys`` the rows hold more than one value of (a row without the key takes no part)."""
    return {key for key in keys if len({str(r[key]) for r in results if r.get(key) is not None}) > 1}


def _has_baseline(results: list[dict]) -> bool:
    return any(r.get("baseline") for r in results)


def _columns(results: list[dict], protocol: str, metric: str = "metric") -> list[tuple[str, str]]:
    """The table's columns: the trial (where rows name it), k and the SFT step; method, pairs, beta and the
    selection only where the search varied them, the random selection's seed where baseline rows exist, whether
    the scheduler stopped the trial early where one was; then the judge's (as an evaluate suite's table shows
    them), the held-out metrics where points have them, the SFT checkpoint's own metric where rows hold it, and
    the suites' metrics."""
    varied = _varied(results)
    point = [("trial_id", "trial")] if any(r.get("trial_id") is not None for r in results) else []
    point += [(k, n) for k, n in POINT_COLUMNS if k not in ("method", "num_pairs") or k in varied]
    if "beta" in varied:
        point.append(("beta", "beta"))
    if "selection" in varied or _has_baseline(results):
        point.append(("selection", "selection"))
    if _has_baseline(results):
        point.append(("selection_seed", "seed"))
    if any(r.get("stopped_early") for r in results):
        point.append(("stopped_early", "stopped early"))
    held = [c for c in HELDOUT_COLUMNS if any(r.get(c[0]) is not None for r in results)]
    if any("sft_metric" in r for r in results):
        held.append(("sft_metric", f"{metric} of the SFT checkpoint alone"))
    suites = sorted({k for r in results for k in r if "/" in k and not k.endswith("_reason")})
    judge = suite_columns(protocol, results) if _judged(results) else []
    return point + judge + held + [(k, k.replace("_", " ")) for k in suites]


def _judged(results: list[dict]) -> bool:
    """Whether the points ran the judge section (search.judge; a held-out metric's search may not)."""
    return not results or any(r.get("judge_dir") or r.get("prompts") is not None for r in results)


def _cell(r: dict, key: str) -> str:
    """A table cell: a flag as yes/no, the seed of a row that has none (the configured selection's) as a dash."""
    v = r.get(key)
    if key == "stopped_early":
        return "yes" if v else "no"
    if key == "selection_seed" and v is None:
        return "-"
    return _fmt(v)


def _beta(v: Any) -> str:
    return f"{v:g}" if _num(v) is not None else str(v)


def _point(r: dict, sep: str = ", ") -> str:
    """A row's name: k and SFT step; method, pairs and beta where present; the selection (random and its seed for
    a baseline row)."""
    parts = [f"k = {_fmt(r.get('k'))}", f"SFT step = {_fmt(r.get('sft_step'))}"]
    if r.get("method"):
        parts.append(f"method = {r['method']}")
    if r.get("num_pairs"):
        parts.append(f"pairs = {r['num_pairs']}")
    if r.get("beta") is not None:
        parts.append(f"beta = {_beta(r['beta'])}")
    if r.get("baseline"):
        seed = r.get("selection_seed")
        parts.append("random selection" + (f" (seed {seed})" if seed is not None else ""))
    elif r.get("selection"):
        parts.append(f"selection = {r['selection']}")
    return sep.join(parts)


def bar_labels(results: list[dict], sep: str) -> list[str]:
    """Each row's short name: k and SFT step, and method, pairs, beta and the selection only where the search
    varied them (a random-baseline row always says so)."""
    hide = {key: None for key in ("method", "num_pairs", "beta", "selection") if key not in _varied(results)}
    return [_point({**r, **hide}, sep).replace(" = ", "=").replace("SFT step", "step") for r in results]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def metric_reason(r: dict, metric: str) -> str | None:
    """Why a row has no metric, where it says: its error, ``metric_reason`` or ``<metric>_reason``, or for a
    held-out preference metric ``heldout_reason``."""
    if r.get("error"):
        return f"failed: {r['error']}"
    for key in ("metric_reason", f"{metric}_reason") + (("heldout_reason",) if metric in TITLES else ()):
        if isinstance(r.get(key), str) and r[key]:
            return r[key]
    return None


def best_row(results: list[dict]) -> dict | None:
    """The row with the highest metric over all rows (every SFT step of every trial), random-baseline rows
    excluded; the first of equals; None where no row has a metric. The search's manifest's ``best``."""
    ok = [r for r in results if not r.get("baseline") and _num(r.get("metric")) is not None]
    return max(ok, key=lambda r: _num(r["metric"])) if ok else None


def trials(results: list[dict]) -> list[list[dict]]:
    """The rows grouped by trial: by ``trial_id`` within the search or its random baseline (a row without one is a
    trial of its own), in the order each trial first appears."""
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(results):
        tid = f"{bool(r.get('baseline'))}/{r['trial_id']}" if r.get("trial_id") is not None else f"row:{i}"
        groups.setdefault(tid, []).append(r)
    return list(groups.values())


def trial_counts(results: list[dict]) -> tuple[int, int]:
    """(trials stopped early by the scheduler, trials); a trial is stopped early where any of its rows says
    ``stopped_early``."""
    groups = trials(results)
    return sum(any(r.get("stopped_early") for r in rows) for rows in groups), len(groups)


def selection_vs_random(results: list[dict]) -> list[dict]:
    """Per k, where random-baseline rows exist (else ``[]``): the selection's best metric over its SFT steps and
    downstream settings at that k (``selection``, with its row ``selection_row`` and ``selection_rows`` counted);
    each random seed's best over the same (``random_by_seed``), their mean (``random_mean``), sample standard
    deviation where more than one seed has a value (``random_std``, else None) and count (``seeds``); and
    ``difference`` = selection - random mean (None where either is missing)."""
    if not _has_baseline(results):
        return []
    out = []
    for k in sorted({r["k"] for r in results if r.get("k") is not None}, key=_order):
        sel = [r for r in results if r.get("k") == k and not r.get("baseline") and _num(r.get("metric")) is not None]
        best = max(sel, key=lambda r: _num(r["metric"])) if sel else None
        by_seed: dict[Any, float] = {}
        for r in results:
            v = _num(r.get("metric"))
            if r.get("k") == k and r.get("baseline") and v is not None:
                seed = r.get("selection_seed")
                by_seed[seed] = max(by_seed.get(seed, -math.inf), v)
        values = [by_seed[s] for s in sorted(by_seed, key=_order)]
        mean = statistics.fmean(values) if values else None
        chosen = _num(best["metric"]) if best else None
        out.append({"k": k, "selection": chosen, "selection_row": best, "selection_rows": len(sel),
                    "random_by_seed": {s: by_seed[s] for s in sorted(by_seed, key=_order)}, "random_mean": mean,
                    "random_std": statistics.stdev(values) if len(values) > 1 else None, "seeds": len(values),
                    "difference": chosen - mean if chosen is not None and mean is not None else None})
    return out


def _save(fig: Any, path: Path) -> Path:
    """Save the figure as PNG through a temporary file, so that a report rewritten while the search runs never
    shows half a plot."""
    plt = _pyplot()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _line_key(r: dict) -> tuple:
    return (bool(r.get("baseline")), r.get("selection_seed"), r.get("selection"), r.get("k"), r.get("method"),
            r.get("beta"), r.get("num_pairs"))


def plot(results: list[dict], metric: str, path: Path) -> Path:
    """Left: the metric against the SFT step, one line per k (and method, pairs, beta and selection where they
    vary), the configured selection's rows only where random-baseline rows are beside them (those are in the
    SFT-step and selection-vs-random plots). Right: win/tie/loss/invalid counts per row, where rows hold them."""
    plt = _pyplot()
    verdicts = any(r.get(key) is not None for r in results for key in ("win", "tie", "loss"))
    flat = len(results) > 4  # more than four bars lie on their side, one line each, so long labels stay readable
    height = min(24.0, max(4.0, 1.5 + 0.28 * len(results))) if flat and verdicts else 4.0
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [3, 2]})
    steps = sorted({r.get("sft_step") for r in results if r.get("sft_step") is not None}, key=_order)
    shown = [r for r in results if not r.get("baseline")] or results
    lines = sorted({_line_key(r) for r in shown}, key=str)
    varied = _varied(shown)
    # Lines side by side by a few hundredths of a step (a third of a step at most), so that equal values (common
    # on small eval sets) do not hide one another.
    dodge = min(0.04, 0.3 / len(lines)) if len(lines) > 1 else 0.0
    for i, key in enumerate(lines):
        shift = dodge * (i - (len(lines) - 1) / 2)
        pts = [(steps.index(r["sft_step"]) + shift, _num(r.get("metric"))) for r in shown
               if _line_key(r) == key and r.get("sft_step") is not None]
        pts = [(x, y) for x, y in sorted(pts, key=lambda p: p[0]) if y is not None]
        baseline, seed, selection, k, method, beta, n = key
        label = f"k = {k}" + (f", {method}" if "method" in varied else "") \
            + (f", {n} pairs" if "num_pairs" in varied else "") \
            + (f", beta {_beta(beta)}" if "beta" in varied else "") \
            + (f", random (seed {seed})" if baseline else f", {selection}" if "selection" in varied else "")
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="s" if baseline else "o",
                    linestyle=":" if baseline else "-", label=label)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_xlabel("SFT checkpoint step that preference tuning starts from")
    ax.set_ylabel(metric.replace("_", " "))
    if is_fraction(metric):
        ax.set_ylim(-0.02, 1.02)  # a fraction; a margin, a 1-10 score or a percentage has its own scale
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small" if len(ax.lines) > 6 else None)
    else:
        ax.text(0.5, 0.5, f"no point has a {metric}", ha="center", va="center", transform=ax.transAxes)
    title = TITLES.get(metric, f"{metric.replace('_', ' ')} against the baseline")
    ax.set_title(title + (" (selection; random baseline below)" if shown is not results else ""))

    if not verdicts:
        bars.text(0.5, 0.5, "no judge verdicts in these rows", ha="center", va="center", transform=bars.transAxes)
        bars.set_axis_off()
        fig.tight_layout()
        return _save(fig, path)
    labels = bar_labels(results, ", " if flat else "\n")
    ys = list(range(len(results)))  # positions, not labels: two rows of one name keep a bar each
    bottom = [0] * len(results)
    for key, color in VERDICT_COLORS:
        vals = [r.get(key) or 0 for r in results]
        style = {"color": color, "edgecolor": "black", "linewidth": 0.5, "label": key}
        if flat:
            bars.barh(ys, vals, left=bottom, **style)
        else:
            bars.bar(ys, vals, bottom=bottom, **style)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if flat:
        bars.set_yticks(ys, labels, fontsize="small" if len(results) > 12 else None)
        bars.set_xlabel("prompts")
        bars.invert_yaxis()  # the first row on top, as in the table
    else:
        bars.set_xticks(ys, labels)
        bars.set_ylabel("prompts")
    bars.set_title("verdicts per row")
    bars.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, clear of labels
    fig.tight_layout()
    return _save(fig, path)


MARKERS = ("o", "^", "D", "v", "P", "X", "<", ">", "h", "*")
PREF_METRICS = ("pref_accuracy", "pref_margin")


def _setting(r: dict) -> tuple:
    """The downstream setting of a row: method, beta, pairs."""
    return (r.get("method"), r.get("beta"), r.get("num_pairs"))


def _steps(results: list[dict]) -> list:
    return sorted({r["sft_step"] for r in results if r.get("sft_step") is not None}, key=_order)


def _lighter(color: str, amount: float = 0.5) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(c + (1 - c) * amount for c in to_rgb(color))  # type: ignore[return-value]


def plot_sft_steps(results: list[dict], metric: str, path: Path) -> Path:
    """The metric against the SFT step (Deita's issue 21): one line per selection, k and downstream setting
    (method, beta, pairs where they vary), solid with preference tuning, dashed for the SFT checkpoint alone
    (``sft_metric``); random-baseline lines in the same colour, lighter and thinner, at the mean over seeds with
    the sample standard deviation as error bars; hollow markers for the points of trials stopped early. A
    selection line has a marker per row and runs through their mean where several rows share a step."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    steps = _steps(results)
    numeric = all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
    pos = {s: (s if numeric else i) for i, s in enumerate(steps)}
    rows = [r for r in results if r.get("sft_step") in pos and r.get("k") is not None]
    varied = _varied(rows)
    colors = {k: f"C{i % 10}" for i, k in enumerate(sorted({r["k"] for r in rows}, key=_order))}
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sorted({_setting(r) for r in rows}, key=str))}

    def label(baseline: bool, selection: Any, k: Any, setting: tuple | None, seeds: int) -> str:
        name = ("random" if baseline else str(selection or "selection")) + f", k = {k}"
        if setting is not None:
            method, beta, pairs = setting
            name += (f", {method}" if "method" in varied else "") \
                + (f", beta {_beta(beta)}" if "beta" in varied else "") \
                + (f", {pairs} pairs" if "num_pairs" in varied else "")
        else:
            name += ", SFT alone"
        return name + (f" ({seeds} seeds)" if baseline and seeds > 1 else "")

    tuned: dict[tuple, dict[Any, list[tuple[float, bool, Any]]]] = {}
    alone: dict[tuple, dict[Any, dict[Any, float]]] = {}
    for r in rows:
        baseline, step = bool(r.get("baseline")), r["sft_step"]
        v = _num(r.get("metric"))
        if v is not None:
            key = (baseline, None if baseline else r.get("selection"), r["k"], _setting(r))
            tuned.setdefault(key, {}).setdefault(step, []).append((v, bool(r.get("stopped_early")),
                                                                   r.get("selection_seed")))
        s = _num(r.get("sft_metric"))
        if s is not None:  # the checkpoint's own value: the same for every downstream setting at its step
            key = (baseline, None if baseline else r.get("selection"), r["k"])
            alone.setdefault(key, {}).setdefault(step, {}).setdefault(r.get("selection_seed"), s)

    fig, ax = plt.subplots(figsize=(11, 4.8))
    stopped_any = False
    for (baseline, selection, k, setting), by_step in sorted(tuned.items(), key=lambda kv: str(kv[0])):
        color = _lighter(colors[k]) if baseline else colors[k]
        pts = sorted(by_step.items(), key=lambda kv: pos[kv[0]])
        xs = [pos[s] for s, _ in pts]
        ys = [statistics.fmean(v for v, *_ in vals) for _, vals in pts]
        err = [statistics.stdev([v for v, *_ in vals]) if len(vals) > 1 else 0.0 for _, vals in pts]
        seeds = len({seed for _, vals in pts for *_, seed in vals})
        style = {"color": color, "marker": markers[setting], "linewidth": 1.2 if baseline else 2.0,
                 "markersize": 5 if baseline else 7, "label": label(baseline, selection, k, setting, seeds)}
        hollow_style = {"linestyle": "none", "marker": markers[setting], "markersize": style["markersize"] + 2,
                        "markerfacecolor": "white", "markeredgecolor": color, "markeredgewidth": 1.5}
        if baseline:  # the mean over seeds, hollow where a seed's trial was stopped early
            if any(err):
                ax.errorbar(xs, ys, yerr=err, capsize=3, **style)
            else:
                ax.plot(xs, ys, **style)
            hollow = [(x, y) for x, y, (_, vals) in zip(xs, ys, pts) if any(st for _, st, _ in vals)]
        else:  # the line through the mean, a marker per row: two trials of one setting keep their own
            ax.plot([], [], **style)  # the legend's entry
            ax.plot(xs, ys, color=color, linewidth=style["linewidth"])
            every = [(pos[s], v, st) for s, vals in pts for v, st, _ in vals]
            ax.plot([x for x, _, st in every if not st], [v for _, v, st in every if not st], linestyle="none",
                    marker=markers[setting], markersize=style["markersize"], color=color)
            hollow = [(x, v) for x, v, st in every if st]
        if hollow:
            stopped_any = True
            ax.plot([x for x, _ in hollow], [y for _, y in hollow], **hollow_style)
    for (baseline, selection, k), by_step in sorted(alone.items(), key=lambda kv: str(kv[0])):
        color = _lighter(colors[k]) if baseline else colors[k]
        pts = sorted(by_step.items(), key=lambda kv: pos[kv[0]])
        xs = [pos[s] for s, _ in pts]
        ys = [statistics.fmean(seeds.values()) for _, seeds in pts]
        err = [statistics.stdev(seeds.values()) if len(seeds) > 1 else 0.0 for _, seeds in pts]
        nseeds = len({seed for _, seeds in pts for seed in seeds})
        style = {"color": color, "marker": "x", "linestyle": "--", "linewidth": 1.0 if baseline else 1.6,
                 "label": label(baseline, selection, k, None, nseeds)}
        if baseline and any(err):
            ax.errorbar(xs, ys, yerr=err, capsize=3, **style)
        else:
            ax.plot(xs, ys, **style)

    ax.set_xticks([pos[s] for s in steps], [str(s) for s in steps])
    ax.set_xlabel("SFT step (the checkpoint preference tuning starts from)")
    ax.set_ylabel(metric.replace("_", " "))
    if is_fraction(metric):
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{TITLES.get(metric, metric.replace('_', ' '))} against the SFT step")
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        guide = [Line2D([], [], color="black", linewidth=2.0, label="with preference tuning")]
        if alone:
            guide.append(Line2D([], [], color="black", linestyle="--", marker="x", label="SFT checkpoint alone"))
        if _has_baseline(rows):
            guide.append(Line2D([], [], color=_lighter("black", 0.55), linewidth=1.2,
                                label="random baseline (lighter: mean over seeds ± std)"))
        if stopped_any:
            guide.append(Line2D([], [], linestyle="none", marker="o", markersize=8, markerfacecolor="white",
                                markeredgecolor="black", markeredgewidth=1.5, label="stopped by ASHA"))
        entries = handles + guide
        ax.legend(handles=entries, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncol=2 if len(entries) > 18 else 1)
    else:
        ax.text(0.5, 0.5, f"no row has a {metric} yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def plot_selection_vs_random(comparison: list[dict], metric: str, path: Path, selection: str = "selection") -> Path:
    """Grouped bars per k: the selection's best metric and the random baseline's mean over seeds (error bars: the
    sample standard deviation where more than one seed has a value; dots: each seed's value)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(comparison) + 2.5), 4))
    xs = list(range(len(comparison)))
    width = 0.38
    sel = [math.nan if c["selection"] is None else c["selection"] for c in comparison]
    rnd = [math.nan if c["random_mean"] is None else c["random_mean"] for c in comparison]
    ax.bar([x - width / 2 for x in xs], sel, width, color="C0", edgecolor="black", linewidth=0.5,
           label=f"{selection} (best)")
    ax.bar([x + width / 2 for x in xs], rnd, width, color=_lighter("C0", 0.6), hatch="//", edgecolor="black",
           linewidth=0.5, label="random (mean over seeds)")
    spread = [(x + width / 2, c["random_mean"], c["random_std"]) for x, c in zip(xs, comparison)
              if c["random_std"] is not None]
    if spread:
        ax.errorbar([x for x, *_ in spread], [m for _, m, _ in spread], yerr=[s for *_, s in spread],
                    fmt="none", ecolor="black", capsize=4, label="± sample std over seeds")
    dots = [(x + width / 2, v) for x, c in zip(xs, comparison) if c["seeds"] > 1 for v in c["random_by_seed"].values()]
    if dots:
        ax.plot([x for x, _ in dots], [v for _, v in dots], linestyle="none", marker=".", color="black",
                label="a seed")
    for x, c in zip(xs, comparison):
        for dx, v in ((-width / 2, c["selection"]), (width / 2, c["random_mean"])):
            if v is None:
                ax.text(x + dx, 0, "n/a", ha="center", va="bottom", fontsize="small")
    ax.set_xticks(xs, [f"k = {c['k']}" for c in comparison])
    ax.set_ylabel(metric.replace("_", " "))
    if is_fraction(metric):
        ax.set_ylim(0, 1.02)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{selection} vs random selection, per k")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def _search_line(search: dict) -> str | None:
    """The search's settings: algorithm, scheduler, samples, the random baseline."""
    parts = []
    if search.get("algorithm"):
        parts.append(f"{search['algorithm']} search")
    if search.get("scheduler"):
        parts.append(f"scheduler {search['scheduler']}")
    if search.get("num_samples") not in (None, 1):
        parts.append(f"{search['num_samples']} samples")
    if search.get("baseline_selection"):
        seeds = search.get("baseline_seeds")
        parts.append(f"a {search['baseline_selection']}-selection baseline at every k with the same downstream "
                     "settings" + (f" (seeds {', '.join(str(s) for s in seeds)})" if seeds else ""))
    return ("Search: " + ", ".join(parts) + ".") if parts else None


def _sft_steps_blocks(results: list[dict], cfg: dict, metric: str, out_dir: Path) -> tuple[list[tuple], Path | None]:
    """The SFT-step section: the plot and its caption, or a line saying why there is none."""
    blocks: list[tuple] = [("h2", "The metric against the SFT step")]
    path = out_dir / "sft_steps.png"
    steps = _steps(results)
    if len(steps) < 2:
        path.unlink(missing_ok=True)  # a plot an earlier write of this report left
        why = f"every row is at SFT step {steps[0]}" if steps else "no row has an SFT step yet"
        return [*blocks, ("p", f"No SFT-step plot: {why}.")], None
    png = plot_sft_steps(results, metric, path)
    caption = (f"{metric} at each SFT step: solid lines with preference tuning from that step's checkpoint, dashed "
               "the SFT checkpoint alone (no preference tuning); a marker per row, the line through their mean where "
               "several share a step.")
    if _has_baseline(results):
        caption += (" The random-selection baseline's lines are lighter and thinner, in the colour of their k: the "
                    "mean over seeds (a marker per step), error bars the sample standard deviation.")
    if any(r.get("stopped_early") for r in results):
        caption += (" Hollow markers: points of trials the scheduler (ASHA) stopped early (on a baseline line: a "
                    "seed's trial among those averaged).")
    if metric in PREF_METRICS:
        base = (cfg.get("model") or {}).get("base")
        caption += (f" The SFT checkpoint alone's {metric} is measured against model.base (`{base}`) as the "
                    "reference model; with preference tuning, against the SFT checkpoint preference tuning "
                    "started from.")
    blocks += [("img", f"{metric} against the SFT step", png.name), ("p", caption)]
    reasons: dict[str, int] = {}
    for r in results:
        if "sft_metric" in r and _num(r.get("sft_metric")) is None and not r.get("error"):
            why = r.get("sft_metric_reason") or "no reason recorded"
            reasons[why] = reasons.get(why, 0) + 1
    if not any(_num(r.get("sft_metric")) is not None for r in results):
        blocks.append(("p", "No row has a value for the SFT checkpoint alone (sft_metric), so no dashed line."))
    if reasons:
        blocks.append(("ul", [f"SFT checkpoint alone n/a in {_count(n, 'row')}: {why}"
                              for why, n in reasons.items()]))
    return blocks, png


def _comparison_blocks(results: list[dict], cfg: dict, metric: str, out_dir: Path) -> tuple[list[tuple], Path | None]:
    """The selection against the random baseline per k: a table and grouped bars; nothing without baseline rows."""
    path = out_dir / "selection_vs_random.png"
    comparison = selection_vs_random(results)
    if not comparison:
        path.unlink(missing_ok=True)
        return [], None
    names = sorted({str(r["selection"]) for r in results if not r.get("baseline") and r.get("selection")})
    selection = "+".join(names) if len(names) == 1 else ("selection" if not names else " / ".join(names))
    expected = len((cfg.get("search") or {}).get("baseline_seeds") or [])
    rows = []
    for c in comparison:
        best = c["selection_row"]
        at = "n/a" if best is None else _point({**best, "selection": None}).partition(", ")[2]
        if c["seeds"] > 1:
            spread = f"std {c['random_std']:.3f}, n = {c['seeds']} seeds"
        else:
            spread = "one seed" if c["seeds"] == 1 else "no seed has a value yet"
        if expected > c["seeds"]:
            spread += f" (of {expected})"
        rows.append([str(c["k"]), _fmt(c["selection"]), at, str(c["selection_rows"]), _fmt(c["random_mean"]),
                     _signed(c["difference"]), spread])
    png = plot_selection_vs_random(comparison, metric, path, selection)
    blocks: list[tuple] = [
        ("h2", "Selection vs random selection"),
        ("p", f"Per k: {selection}'s {metric} is the best over its SFT steps and downstream settings at that k (its "
              "rows counted); the random baseline's is each seed's best over the same, averaged over the seeds, "
              "with their sample standard deviation where more than one seed ran. Difference: selection - random."),
        ("table", ["k", f"{selection} (best)", "best at", "rows", "random (mean over seeds)", "difference",
                   "random spread"], rows),
        ("img", f"{selection} vs random selection", png.name),
    ]
    return blocks, png


def write_report(results: list[dict], cfg: dict[str, Any], out_dir: Path, *, partial: bool = False) -> dict[str, str]:
    """Write report.md, report.html and winrate.png into ``out_dir``; with rows at more than one SFT step
    sft_steps.png (the metric against the SFT step, with preference tuning and without), and with random-baseline
    rows selection_vs_random.png. Renders from any list of rows, failed, unfinished or partial; ``partial``: the
    search is still running (the report says so). Returns the paths written (markdown, html, plot, and where
    written sft_steps, selection_vs_random)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    search = cfg.get("search") or {}
    metric = search.get("metric") or "win_rate"
    # The configured selection's rows first, then the random baseline's, each in the order given.
    results = sorted(results, key=lambda r: bool(r.get("baseline")))
    png = plot(results, metric, out_dir / "winrate.png")
    judge_cfg = cfg["judge"]
    kind = JUDGES[judge_cfg["protocol"]]
    baseline = judge_cfg.get("baseline") or cfg["model"]["base"]
    best = best_row(results)
    failed = [r for r in results if r.get("error")]

    sel = cfg["select"]
    weights = sel.get("rank_by") or {sel["scorers"][0]: 1}
    ranking = " + ".join(f"{w:g} x {n}" if w != 1 else n for n, w in weights.items())
    ranking = ranking.replace("length", f"length ({sel['length_unit']})")
    intro = [
        f"Experiment **{cfg['name']}**: model `{cfg['model']['base']}`, selection ranked by {ranking} "
        f"({sel['selector']}), preference method {', '.join(search.get('method') or [cfg['pref']['method']])}, "
        f"starting from {cfg['pref']['start_from']}.",
        *([f"Judge: `{judge_cfg['model']}` ({judge_cfg['backend']}), {kind.describe(judge_cfg)}; baseline: "
           f"`{baseline}`.", kind.note] if _judged(results) else
          ["No judge ran at the points (search.judge: the search metric needs none)."]),
        _search_line(search),
    ]
    stopped, trials = trial_counts(results)
    if partial:
        intro.append(f"The search is still running: {_count(len(results), 'row')} of {_count(trials, 'trial')} so "
                     "far; this report is rewritten as trials finish.")
    if best:
        ok = sum(1 for r in results if not r.get("baseline") and _num(r.get("metric")) is not None)
        trial = f" (trial {best['trial_id']})" if best.get("trial_id") is not None else ""
        intro.append(f"Best{' so far' if partial else ''}: {metric} = {_fmt(_num(best['metric']))} at {_point(best)}"
                     f"{trial}, over the {ok} rows with a value (every SFT step of every trial; random-baseline rows "
                     "excluded).")
    elif not results:
        intro.append("No trial has reported yet.")
    elif metric in TITLES:
        why = next((r["heldout_reason"] for r in results if r.get("heldout_reason")), "see the pref manifests")
        intro.append(f"No point has a {metric}: {why}.")
    elif partial:
        intro.append(f"No row has a {metric} yet.")
    else:
        intro.append(f"No point has a valid {metric}: every judgement was unparsed or failed.")
    if search.get("scheduler") == "asha" or stopped:
        intro.append(f"{stopped} of {trials} trials stopped early by ASHA.")

    columns = _columns(results, judge_cfg["protocol"], metric)
    table = [[_cell(r, key) for key, _ in columns] for r in results]
    blocks: list[tuple] = [("h1", "Alignment report"), *(("p", p) for p in intro if p),
                           ("table", [name for _, name in columns], table), ("img", metric, png.name)]
    notes = [f"{_point(r)} failed: {r['error']}" for r in failed]
    unexplained = 0
    for r in results:
        if not r.get("error") and _num(r.get("metric")) is None:
            why = metric_reason(r, metric)
            if why:
                notes.append(f"{_point(r)}: {metric} n/a: {why}")
            else:
                unexplained += 1
    if unexplained:
        notes.append(f"{unexplained} row{'s have' if unexplained > 1 else ' has'} no {metric} and no recorded reason.")
    if notes:
        blocks.append(("ul", notes))
    paths = {"plot": str(png)}
    steps_blocks, steps_png = _sft_steps_blocks(results, cfg, metric, out_dir)
    blocks += steps_blocks
    if steps_png:
        paths["sft_steps"] = str(steps_png)
    comparison_blocks, comparison_png = _comparison_blocks(results, cfg, metric, out_dir)
    blocks += comparison_blocks
    if comparison_png:
        paths["selection_vs_random"] = str(comparison_png)
    _write_text(out_dir / "report.md", _render_md(blocks))
    _write_text(out_dir / "report.html", _render_html(blocks, out_dir, "Alignment report"))
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html"), **paths}


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
