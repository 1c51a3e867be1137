"""The pipeline driver: select -> sft -> pref -> generate -> judge for one point (k, SFT step).

Each ``*_stage`` function makes sure its upstream stages are done (finished ones are skipped through their
manifests), runs its own stage in ``<run_dir>/<stage>/<label>-<key>/`` and returns the stage's manifest.
Trials of a search that share k share one selection and one SFT run, because their select and sft
configs and inputs are the same. ``run_experiment`` runs the search over every point, then the report.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from . import embed, endpoints, formats, generate, judge, models, report, search, select, train
from .config import ExperimentConfig, config_dict
from .manifest import fingerprint, run_stage, write_json

log = logging.getLogger("alignment")


class PipelineError(RuntimeError):
    pass


def _run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run_dir).resolve()


def _resources(cfg: ExperimentConfig) -> dict[str, Any]:
    return config_dict(cfg.resources)


def _storage(cfg: ExperimentConfig, stage_dir: Path) -> str:
    """Where Ray Train persists this stage's checkpoints: beside the manifest, or under resources.storage_path."""
    from urllib.parse import urlsplit, urlunsplit

    if cfg.resources.storage_path is None:
        return str(stage_dir / "ray")
    root = cfg.resources.storage_path
    rel = stage_dir.relative_to(_run_dir(cfg)).as_posix()
    if "://" not in root:  # a local path ('?' and '#' are plain characters there)
        return root.rstrip("/") + "/" + rel
    parts = urlsplit(root)  # a URI's options (?region=...) stay at its end
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + rel))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _files(patterns: list[str], what: str) -> dict[str, str]:
    if not patterns:
        raise PipelineError(f"no {what} configured (data.{what})")
    return {p: fingerprint(p) for p in formats.expand_paths(patterns)}


# ---------------------------------------------------------------------------------------------- stages


def select_stage(cfg: ExperimentConfig, k: int | None = None) -> dict[str, Any]:
    k = k or cfg.select.k
    s = cfg.select
    uses_tokens = ("length" in s.scorers and s.length_unit == "tokens") or s.max_tokens is not None
    tokenizer = models.resolve(cfg.model.base) if uses_tokens else None
    resolved: dict[str, Any] = {"deita": config_dict(s.deita), "rating": config_dict(s.rating),
                                "embedding": config_dict(s.embedding)}
    inputs = _files(cfg.data.sft, "sft")
    if tokenizer:
        inputs["tokenizer"] = fingerprint(tokenizer)
    if s.max_tokens and cfg.model.chat_template:
        inputs["chat_template"] = fingerprint(cfg.model.chat_template)
    if "deita" in s.scorers:
        for key in ("complexity_model", "quality_model"):
            resolved["deita"][key] = models.resolve(getattr(s.deita, key))
            inputs[f"deita_{key}"] = fingerprint(resolved["deita"][key])
    if "rating" in s.scorers and s.rating.backend == "transformers":
        resolved["rating"]["model"] = models.resolve(s.rating.model)
        inputs["rating_model"] = fingerprint(resolved["rating"]["model"])
    if s.selector in ("repr_filter", "kmeans"):
        resolved["embedding"]["model"] = s.embedding.model_name(cfg.model.base)
        inputs["embedding_model"] = fingerprint(embed.model_path(resolved["embedding"]["model"]))
    spec = select.spec(scorers=list(s.scorers), ranking=s.ranking(), length_unit=s.length_unit,
                       tokenizer=tokenizer, seed=cfg.seed, selector=s.selector, tau=s.tau, max_tokens=s.max_tokens,
                       dedup=config_dict(s.dedup), clusters=s.clusters, kmeans_fit_rows=s.kmeans_fit_rows,
                       export=list(s.export), chat_template=cfg.model.chat_template if s.max_tokens else None,
                       **resolved)
    conf = {"k": k, "format": cfg.data.sft_format, "allow_fewer": s.allow_fewer,
            "tokenizer": cfg.model.base if tokenizer else None,
            **{key: value for key, value in spec.items() if key != "tokenizer"}}
    return run_stage(cfg.run_dir, "select", f"k{k}", conf, inputs,
                     lambda d: select.run_select(cfg.data.sft, cfg.data.sft_format, k, spec, d, s.allow_fewer,
                                                 s.batch_size))


def _training_outputs(d: Path, run: dict[str, Any]) -> dict[str, Any]:
    """A training stage's outputs: every checkpoint (step, path, train and eval loss), the per-step metrics
    (written to ``metrics.jsonl``) and the TensorBoard events (in the latest checkpoint)."""
    _write_jsonl(d / "metrics.jsonl", run["history"])
    ckpts = [{"step": c["step"], "path": c["path"], "train_loss": c["metrics"].get("loss"),
              "eval_loss": c["metrics"].get("eval_loss")} for c in run["checkpoints"]]
    return {"checkpoints": ckpts, "metrics_log": str(d / "metrics.jsonl"), "tensorboard": run["tensorboard"]}


def sft_stage(cfg: ExperimentConfig, k: int | None = None) -> dict[str, Any]:
    k = k or cfg.select.k
    sel = select_stage(cfg, k)
    selected = sel["outputs"]["selected"]
    base = models.resolve(cfg.model.base)
    settings = train.train_settings(config_dict(cfg.sft), cfg.seed, "sft")
    save_steps = cfg.sft.checkpoint_steps()
    res = _resources(cfg)
    conf = {"settings": settings, "save_steps": save_steps, "eval_rows": cfg.sft.eval_rows, "model": cfg.model.base,
            "chat_template": cfg.model.chat_template, "num_workers": res["num_workers"], "use_gpu": res["use_gpu"],
            "strategy": res["strategy"]}
    inputs = {"selected": fingerprint(selected), "model": fingerprint(base)}

    def work(d: Path) -> dict[str, Any]:
        rows = [{"id": r["id"], "messages": r["messages"]} for r in pq.read_table(selected).to_pylist()]
        rows, held = train.split_rows(rows, cfg.seed, cfg.sft.eval_rows, None)
        run = train.fit("sft", rows, base, settings, save_steps, _storage(cfg, d), res, cfg.model.chat_template,
                        eval_rows=held)
        return {
            "outputs": _training_outputs(d, run),
            "counts": {"rows": len(rows) + len(held), "train_rows": len(rows), "eval_rows": len(held),
                       "checkpoints": len(run["checkpoints"])},
            "metrics": {"final": run["checkpoints"][-1]["metrics"], **run["facts"]},
        }

    return run_stage(cfg.run_dir, "sft", f"k{k}", conf, inputs, work)


def _pick_checkpoint(sft: dict[str, Any], step: int | str) -> dict[str, Any]:
    ckpts = sft["outputs"]["checkpoints"]
    if step == "last":
        return ckpts[-1]
    for c in ckpts:
        if c["step"] == step:
            return c
    raise PipelineError(f"SFT step {step} was not saved; saved steps: {[c['step'] for c in ckpts]} ({sft['dir']})")


def read_preferences(cfg: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    good, bad = formats.read_rows(cfg.data.preferences, "preference", cfg.data.preferences_format)
    return good, bad


def pref_stage(cfg: ExperimentConfig, k: int | None = None, sft_step: int | str | None = None,
               method: str | None = None, num_pairs: int | None = None) -> dict[str, Any]:
    """Preference tuning with ``method`` (default pref.method) on ``num_pairs`` rows (default pref.num_pairs),
    from the scenario's start: an SFT checkpoint, model.base or model.instruct."""
    p = cfg.pref
    sft_step = p.sft_step if sft_step is None else sft_step
    method = method or p.method
    num_pairs = p.num_pairs if num_pairs is None else num_pairs
    if p.start_from == "sft":
        k = k or cfg.select.k
        ckpt = _pick_checkpoint(sft_stage(cfg, k), sft_step)
        start, label = ckpt["path"], f"k{k}-step{ckpt['step']}"
        start_info = {"from": "sft", "sft_step": ckpt["step"], "checkpoint": start}
    else:
        name = cfg.model.base if p.start_from == "base" else cfg.model.instruct
        start, label = models.resolve(name), p.start_from
        start_info = {"from": p.start_from, "model": name}
    label += f"-{method}" + (f"-n{num_pairs}" if num_pairs else "")
    params = p.method_params(method)
    settings = train.train_settings(config_dict(p), cfg.seed, method, params)
    save_steps = p.checkpoint_steps()
    res = _resources(cfg)
    conf = {"method": method, "settings": settings, "save_steps": save_steps, "num_pairs": num_pairs,
            "eval_rows": p.eval_rows, "format": cfg.data.preferences_format, "start": start_info,
            "chat_template": cfg.model.chat_template, "num_workers": res["num_workers"], "use_gpu": res["use_gpu"],
            "strategy": res["strategy"]}
    inputs = {**_files(cfg.data.preferences, "preferences"), "start": fingerprint(start)}

    def work(d: Path) -> dict[str, Any]:
        pairs, bad = read_preferences(cfg)
        _write_jsonl(d / "set_aside.jsonl", bad)
        if not pairs:
            raise PipelineError(f"no valid preference rows in {cfg.data.preferences} ({len(bad)} set aside, "
                                f"see {d / 'set_aside.jsonl'})")
        try:
            used, held = train.split_rows(pairs, cfg.seed, p.eval_rows, num_pairs)
        except train.TrainError as e:
            raise PipelineError(f"{e} ({cfg.data.preferences}: {len(pairs)} valid rows)") from None
        keep = ("id", "prompt", "chosen", "rejected", "completion", "label")
        run = train.fit(method, [{k_: r[k_] for k_ in keep if k_ in r} for r in used], start, settings, save_steps,
                        _storage(cfg, d), res, cfg.model.chat_template,
                        eval_rows=[{k_: r[k_] for k_ in keep if k_ in r} for r in held])
        return {
            "outputs": {"model": run["checkpoints"][-1]["path"], "start": start_info,
                        "set_aside": str(d / "set_aside.jsonl"), **_training_outputs(d, run)},
            "counts": {"pairs_read": len(pairs) + len(bad), "pairs_kept": len(pairs), "pairs_set_aside": len(bad),
                       "pairs_used": len(used), "pairs_eval": len(held)},
            "metrics": {"final": run["checkpoints"][-1]["metrics"], "params": params, **run["facts"]},
        }

    return run_stage(cfg.run_dir, "pref", label, conf, inputs, work)


def eval_prompts(cfg: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    if not cfg.data.eval_prompts:
        raise PipelineError("no eval prompt set configured (data.eval_prompts)")
    good, bad = formats.read_rows(cfg.data.eval_prompts, "eval")
    ids = [r["id"] for r in good]
    if len(set(ids)) != len(ids):
        raise PipelineError(f"{cfg.data.eval_prompts}: prompt ids are not unique")
    n = cfg.data.max_eval_prompts
    return (good[:n] if n else good), bad


def generate_stage(cfg: ExperimentConfig, model: str, label: str) -> dict[str, Any]:
    """Answers of ``model`` (a resolved path, URI or hub id) to the eval prompts."""
    g = config_dict(cfg.generate)
    conf = {"backend": g["backend"], "max_new_tokens": g["max_new_tokens"], "max_eval_prompts": cfg.data.max_eval_prompts,
            "model": model}
    inputs = {"prompts": fingerprint(cfg.data.eval_prompts), "model": fingerprint(model)}

    def work(d: Path) -> dict[str, Any]:
        prompts, bad = eval_prompts(cfg)
        out = generate.generate(model, [{"id": r["id"], "messages": r["messages"]} for r in prompts], g)
        rows = [{"id": r["id"], "messages": r["messages"], "answer": o["answer"], "num_new_tokens": o["num_new_tokens"]}
                for r, o in zip(prompts, out)]
        _write_jsonl(d / "answers.jsonl", rows)
        _write_jsonl(d / "set_aside.jsonl", bad)
        lengths = [r["num_new_tokens"] for r in rows]
        return {"outputs": {"answers": str(d / "answers.jsonl"), "set_aside": str(d / "set_aside.jsonl")},
                "counts": {"prompts_read": len(prompts) + len(bad), "prompts_answered": len(rows),
                           "prompts_set_aside": len(bad)},
                "metrics": {"mean_new_tokens": sum(lengths) / max(len(lengths), 1)}}

    return run_stage(cfg.run_dir, "generate", label, conf, inputs, work)


def baseline_model(cfg: ExperimentConfig) -> str:
    return models.resolve(cfg.judge.baseline or cfg.model.base)


def judge_stage(cfg: ExperimentConfig, target: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    j = cfg.judge
    judge_model = models.resolve(j.model) if j.backend == "local" else j.model
    conf = {k: v for k, v in config_dict(j).items() if k not in ("timeout_s",)}
    conf["judge_model"] = judge_model
    inputs = {"target": fingerprint(target["outputs"]["answers"]), "baseline": fingerprint(baseline["outputs"]["answers"])}
    if j.backend == "local":
        inputs["judge"] = fingerprint(judge_model)

    def work(d: Path) -> dict[str, Any]:
        t_rows = _read_jsonl(target["outputs"]["answers"])
        b = {r["id"]: r["answer"] for r in _read_jsonl(baseline["outputs"]["answers"])}
        missing = [r["id"] for r in t_rows if r["id"] not in b]
        if missing:
            raise PipelineError(f"baseline answers lack prompts {missing[:5]}")
        requests = judge.build_requests(t_rows, {r["id"]: r["answer"] for r in t_rows}, b, j.format_example)
        msgs = [{"id": r["id"], "messages": r["messages"]} for r in requests]
        if j.backend == "local":
            outs = generate.generate(judge_model, msgs, {**config_dict(cfg.generate), "max_new_tokens": j.max_new_tokens})
        else:
            outs = endpoints.complete_openai(msgs, j.model, endpoints.Endpoint(j.api_base_env, j.api_key_env),
                                             j.max_new_tokens, j.timeout_s)
        verdicts, summary = judge.score(requests, outs, j.rule)
        _write_jsonl(d / "verdicts.jsonl", verdicts)
        return {"outputs": {"verdicts": str(d / "verdicts.jsonl"), "target": target["dir"], "baseline": baseline["dir"]},
                "counts": {"prompts": summary["prompts"], "valid": summary["valid"], "invalid": summary["invalid"],
                           "unparsed_judgements": summary["unparsed_judgements"]},
                "metrics": summary}

    return run_stage(cfg.run_dir, "judge", target["label"], conf, inputs, work)


# ------------------------------------------------------------------------------------------ composition


def trained_model(cfg: ExperimentConfig, k: int | None = None, sft_step: int | str | None = None,
                  method: str | None = None, num_pairs: int | None = None) -> tuple[str, str]:
    pref = pref_stage(cfg, k, sft_step, method, num_pairs)
    return pref["outputs"]["model"], f"{pref['label']}-{Path(pref['dir']).name.rsplit('-', 1)[-1]}"


def run_point(cfg: ExperimentConfig, k: int | None = None, sft_step: int | str | None = None,
              method: str | None = None, num_pairs: int | None = None) -> dict[str, Any]:
    """select -> sft -> pref -> generate (trained and baseline) -> judge; returns the point's results."""
    model, label = trained_model(cfg, k, sft_step, method, num_pairs)
    target = generate_stage(cfg, model, label)
    base = generate_stage(cfg, baseline_model(cfg), "baseline")
    verdict = judge_stage(cfg, target, base)
    m = verdict["metrics"]
    return {"k": k or cfg.select.k, "sft_step": cfg.pref.sft_step if sft_step is None else sft_step,
            "method": method or cfg.pref.method,
            "num_pairs": cfg.pref.num_pairs if num_pairs is None else num_pairs,
            "start_from": cfg.pref.start_from, "metric": m.get(cfg.search.metric), **m,
            "model": model, "judge_dir": verdict["dir"]}


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """The search over (k, SFT step) on Ray Tune, each trial a pipeline point; then the report."""
    results, timings = search.run_search(cfg, run_point)
    write_search_results(cfg, results, timings)
    paths = _write_report(cfg, results)
    failed = [r for r in results if r.get("error")]
    if failed:
        raise PipelineError(f"{len(failed)} of {len(results)} search trials failed (report: {paths['markdown']}); "
                            f"first: k={failed[0]['k']}, sft_step={failed[0]['sft_step']}: {failed[0]['error']}")
    return {"results": results, "report": paths}


def report_only(cfg: ExperimentConfig) -> dict[str, str]:
    results_path = _run_dir(cfg) / "search" / "results.json"
    if not results_path.is_file():
        raise PipelineError(f"no search results at {results_path}; run `alignment run` or `alignment search` first")
    results = json.loads(results_path.read_text())["trials"]
    return _write_report(cfg, results)


def write_search_results(cfg: ExperimentConfig, results: list[dict], timings: dict) -> Path:
    """The search's manifest: config, every trial's results, counts and timings."""
    path = _run_dir(cfg) / "search" / "results.json"
    failed = sum(1 for r in results if r.get("error"))
    write_json(path, {"config": config_dict(cfg), "trials": results, "timings": timings,
                      "counts": {"trials": len(results), "succeeded": len(results) - failed, "failed": failed}})
    return path


def _write_report(cfg: ExperimentConfig, results: list[dict]) -> dict[str, str]:
    out = _run_dir(cfg) / "report"
    started = time.time()
    paths = report.write_report(results, config_dict(cfg), out)
    results_path = _run_dir(cfg) / "search" / "results.json"
    write_json(out / "manifest.json", {
        "stage": "report", "status": "complete", "config": config_dict(cfg),
        "inputs": {"search_results": fingerprint(results_path) if results_path.is_file() else None},
        "outputs": paths, "counts": {"trials": len(results)},
        "timings": {"started": started, "seconds": round(time.time() - started, 3)}})
    return paths
