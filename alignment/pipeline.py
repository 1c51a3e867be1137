"""The pipeline driver: select -> sft -> pref -> generate -> judge for one point (k, SFT step).

Each ``*_stage`` function makes sure its upstream stages are done (finished ones are skipped through their
manifests), runs its own stage in ``<run_dir>/<stage>/<label>-<key>/`` and returns the stage's manifest.
Trials of a search that share k share one selection and one SFT run, because their select and sft
configs and inputs are the same. ``run_experiment`` runs the search over every point, then the report.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from . import endpoints, formats, models, report, search, select, train
from .config import DEFAULT_SENTENCE_MODEL, ConfigError, EvalModelConfig, ExperimentConfig, ResourcesConfig, config_dict
from .errors import AlignmentError
from .evaluate import COUNTS, JUDGES, METRICS, benchmarks, generate, heldout, sources
from .evaluate.generate import category_temperature, generate_turns
from .manifest import digest, fingerprint, run_stage, write_json

log = logging.getLogger("alignment")


class PipelineError(AlignmentError, RuntimeError):
    pass


def _run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run_dir).resolve()


def _logprobs_dir(cfg: ExperimentConfig) -> str:
    """Where the held-out scoring keeps each model's log-probabilities, for every stage of the run."""
    return str(_run_dir(cfg) / "logprobs")


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


# Endpoint settings of how requests are sent, left out of a stage's key (``select.rating``, ``judge``).
SENDING = ("timeout_s", "concurrency", "max_retries", "retry_backoff_s", "max_failed_fraction", "tasks")


def _files(patterns: list[str], what: str, run_dir: str | None = None) -> dict[str, str]:
    """The input files of ``patterns`` with their fingerprints, listed once, before the stage's directory
    exists, and never anything under ``run_dir`` (a stage's own outputs are no input data); the stage reads
    exactly these files."""
    if not patterns:
        raise PipelineError(f"no {what} configured (data.{what})")
    return {p: fingerprint(p) for p in formats.expand_paths(patterns, exclude=[run_dir] if run_dir else None)}


# ---------------------------------------------------------------------------------------------- stages


def select_stage(cfg: ExperimentConfig) -> dict[str, Any]:
    """The selection of select.k rows of data.sft."""
    s = cfg.select
    files = _files(cfg.data.sft, "sft", cfg.run_dir)
    inputs = dict(files)
    names = select.model_names(cfg)
    paths = {field: models.resolve(name) for field, (_, name) in names.items()}
    inputs.update({field: fingerprint(path) for field, path in paths.items()})
    embedding = s.embedding.model_name(cfg.model.base) if select.SELECTORS[s.selector].embeds else None
    if embedding:
        inputs["embedding_model"] = fingerprint(select.embed.model_path(embedding))
    template = cfg.model.chat_template if s.max_tokens else None
    if template:
        inputs["chat_template"] = fingerprint(template)
    seed = cfg.seed if s.seed is None else s.seed
    resolved = select.Resolved(files=tuple(files), format=cfg.data.sft_format, seed=seed, chat_template=template,
                               embedding_model=embedding, **paths)
    # The key: the section as configured (model names: their contents are fingerprinted in inputs) and what
    # was resolved beside it. Rows per Ray Data batch and how endpoint requests are sent (as for the judge) are
    # not what is selected: a re-run with more retries or a higher max_failed_fraction keeps the stage's
    # directory and the answers a failed run stored there.
    conf = {key: ({k: v for k, v in value.items() if k not in SENDING} if isinstance(value, dict) else value)
            for key, value in config_dict(s).items() if key != "batch_size"}
    conf.update(format=resolved.format, seed=resolved.seed, chat_template=template, embedding_model=embedding,
                models={field: name for field, (_, name) in names.items()})
    return run_stage(cfg.run_dir, "select", f"k{s.k}", conf, inputs, lambda d: select.run_select(s, resolved, d))


def _training_outputs(d: Path, run: dict[str, Any]) -> dict[str, Any]:
    """A training stage's outputs: every checkpoint (step, path, train and eval loss), the per-step metrics
    (written to ``metrics.jsonl``) and the TensorBoard events (in the latest checkpoint)."""
    _write_jsonl(d / "metrics.jsonl", run["history"])
    ckpts = [{"step": c["step"], "path": c["path"], "train_loss": c["metrics"].get("loss"),
              "eval_loss": c["metrics"].get("eval_loss")} for c in run["checkpoints"]]
    return {"checkpoints": ckpts, "metrics_log": str(d / "metrics.jsonl"), "tensorboard": run["tensorboard"]}


def _reasons(aside: list[dict]) -> dict[str, int]:
    """Set-aside rows counted by kind (:func:`formats.reason_key`)."""
    out: dict[str, int] = {}
    for r in aside:
        key = formats.reason_key(r["field"], r["error"])
        out[key] = out.get(key, 0) + 1
    return out


def _trainable(cfg: ExperimentConfig, d: Path, method: str, rows: list[dict], aside: list[dict], model_name: str,
               max_length: int) -> tuple[list[dict], list[dict]]:
    """The rows that can train (counted with the tokenizer of ``model_name``, the model the start weights come
    from), and every set-aside record so far, written to ``set_aside.jsonl``."""
    tok = train.chat_tokenizer(models.resolve(model_name), cfg.model.chat_template)  # the trainers' own check
    rows, untrainable = train.trainable_rows(method, rows, tok, max_length)
    aside = aside + untrainable
    _write_jsonl(d / "set_aside.jsonl", aside)
    if untrainable:
        log.warning("%s: %d rows set aside before training (%s); see %s", method, len(untrainable),
                    _reasons(untrainable), d / "set_aside.jsonl")
    return rows, aside


_TRAIN_KEYS = ("id", "messages", "prompt", "chosen", "rejected", "completion", "label")


def _fit(cfg: ExperimentConfig, d: Path, method: str, rows: list[dict], held: list[dict], start: str,
         settings: dict[str, Any], save_steps: list[int], res: ResourcesConfig,
         heldout_rows: list[dict] | None = None) -> dict[str, Any]:
    """``train.fit`` once there are rows for a step on every worker (``heldout_rows``: preference pairs scored in
    the training worker after training, ``run["heldout"]``). A run stopped by a non-finite value leaves its log
    (``metrics.jsonl``, TensorBoard events in ``tensorboard/``, the NaN included) before the stage fails."""
    try:
        train.check_batch(len(train.method_dataset(rows, method)), settings, res.num_workers, method)
    except train.TrainError as e:
        raise PipelineError(str(e)) from None

    def slim(rs: list[dict]) -> list[dict]:
        return [{k: r[k] for k in _TRAIN_KEYS if k in r} for r in rs]

    try:
        return train.fit(method, slim(rows), start, settings, save_steps, _storage(cfg, d), res,
                         cfg.model.chat_template, eval_rows=slim(held),
                         heldout_rows=slim(heldout_rows) if heldout_rows else None,
                         heldout_fn=functools.partial(heldout.heldout, cache_dir=_logprobs_dir(cfg)))
    except train.NonFiniteError as e:
        _write_jsonl(d / "metrics.jsonl", e.history)
        train.write_tensorboard(e.history, d / "tensorboard")
        raise PipelineError(f"{e}; the log up to that step: {d / 'metrics.jsonl'}") from None


def sft_stage(cfg: ExperimentConfig) -> dict[str, Any]:
    """SFT on the selection of select.k rows, a checkpoint at every step of sft's schedule."""
    k = cfg.select.k
    sel = select_stage(cfg)
    selected = sel["outputs"]["selected"]
    base = models.resolve(cfg.model.base)
    settings = train.train_settings(cfg.sft, cfg.seed, "sft")
    save_steps = cfg.sft.checkpoint_steps()
    res = cfg.resources
    conf = {"settings": settings, "save_steps": save_steps, "eval_rows": cfg.sft.eval_rows,
            "eval_at_checkpoints": cfg.sft.eval_at_checkpoints, "model": cfg.model.base,
            "chat_template": cfg.model.chat_template, "num_workers": res.num_workers, "use_gpu": res.use_gpu,
            "strategy": res.strategy}
    inputs = {"selected": fingerprint(selected), "model": fingerprint(base)}

    def work(d: Path) -> dict[str, Any]:
        rows = [{"id": r["id"], "messages": r["messages"]} for r in pq.read_table(selected).to_pylist()]
        rows, aside = _trainable(cfg, d, "sft", rows, [], cfg.model.base, cfg.sft.max_length)
        rows, held = train.split_rows(rows, cfg.seed, cfg.sft.eval_rows, None)
        run = _fit(cfg, d, "sft", rows, held if cfg.sft.eval_at_checkpoints else [], base, settings, save_steps, res)
        return {
            "outputs": {**_training_outputs(d, run), "set_aside": str(d / "set_aside.jsonl")},
            "counts": {"rows": len(rows) + len(held) + len(aside), "train_rows": len(rows), "eval_rows": len(held),
                       "rows_set_aside": len(aside), "set_aside_reasons": _reasons(aside),
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


def read_preferences(cfg: ExperimentConfig, files: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """The preference rows of ``files`` (as :func:`_files` listed them; default: data.preferences, outside
    run_dir): (good rows, set-aside rows)."""
    return formats.read_rows(files or cfg.data.preferences, "preference", cfg.data.preferences_format,
                             exclude=[cfg.run_dir])


def pref_stage(cfg: ExperimentConfig) -> dict[str, Any]:
    """Preference tuning with pref.method on pref.num_pairs rows, from the scenario's start: the SFT checkpoint
    pref.sft_step (of the selection of select.k rows), model.base or model.instruct."""
    p = cfg.pref
    method, num_pairs = p.method, p.num_pairs
    if p.start_from == "sft":
        ckpt = _pick_checkpoint(sft_stage(cfg), p.sft_step)
        start, label = ckpt["path"], f"k{cfg.select.k}-step{ckpt['step']}"
        start_info = {"from": "sft", "sft_step": ckpt["step"], "checkpoint": start}
    else:
        name = cfg.model.base if p.start_from == "base" else cfg.model.instruct
        start, label = models.resolve(name), p.start_from
        start_info = {"from": p.start_from, "model": name}
    label += f"-{method}" + (f"-n{num_pairs}" if num_pairs else "")
    settings = train.train_settings(p, cfg.seed, method)
    params = settings["params"]
    save_steps = p.checkpoint_steps()
    res = cfg.resources
    conf = {"method": method, "settings": settings, "save_steps": save_steps, "num_pairs": num_pairs,
            "eval_rows": p.eval_rows, "eval_at_checkpoints": p.eval_at_checkpoints,
            "format": cfg.data.preferences_format, "start": start_info,
            "chat_template": cfg.model.chat_template, "num_workers": res.num_workers, "use_gpu": res.use_gpu,
            "strategy": res.strategy, "heldout": list(heldout.METRICS)}
    files = _files(cfg.data.preferences, "preferences", cfg.run_dir)
    inputs = {**files, "start": fingerprint(start)}

    def work(d: Path) -> dict[str, Any]:
        pairs, bad = read_preferences(cfg, list(files))
        tokenizer_model = cfg.model.instruct if p.start_from == "instruct" else cfg.model.base
        pairs, aside = _trainable(cfg, d, method, pairs, bad, tokenizer_model, p.max_length)
        if not pairs:
            raise PipelineError(f"no usable preference rows in {cfg.data.preferences} ({len(aside)} set aside: "
                                f"{_reasons(aside)}; see {d / 'set_aside.jsonl'})")
        try:
            used, held = train.split_rows(pairs, cfg.seed, p.eval_rows, num_pairs)
        except train.TrainError as e:
            raise PipelineError(f"{e} ({cfg.data.preferences}: {len(pairs)} usable rows, {len(aside)} set aside: "
                                f"{_reasons(aside)})") from None
        # The held-out pairs are scored in the training worker once it has trained (no process of their own);
        # a run resumed from a checkpoint an earlier worker group saved is scored in a task, as before.
        run = _fit(cfg, d, method, used, held if p.eval_at_checkpoints else [], start, settings, save_steps, res,
                   heldout_rows=held if any("chosen" in r for r in held) else None)
        held = [{k: r[k] for k in _TRAIN_KEYS if k in r} for r in held]
        _write_jsonl(d / "heldout.jsonl", held)  # the SFT checkpoint alone is scored on them too (sft_alone)
        scores = run.get("heldout") or _heldout(cfg, run["checkpoints"][-1]["path"], start, held)
        return {
            "outputs": {"model": run["checkpoints"][-1]["path"], "start": start_info,
                        "heldout": str(d / "heldout.jsonl"), "set_aside": str(d / "set_aside.jsonl"),
                        **_training_outputs(d, run)},
            "counts": {"pairs_read": len(pairs) + len(aside), "pairs_kept": len(pairs), "pairs_set_aside": len(aside),
                       "set_aside_reasons": _reasons(aside), "pairs_used": len(used), "pairs_eval": len(held),
                       "pairs_unused": len(pairs) - len(used) - len(held)},
            "metrics": {"final": run["checkpoints"][-1]["metrics"], "params": params, "heldout": scores,
                        **run["facts"]},
        }

    return run_stage(cfg.run_dir, "pref", label, conf, inputs, work)


def _heldout(cfg: ExperimentConfig, policy: str, reference: str, held: list[dict]) -> dict[str, Any]:
    """Held-out preference accuracy and margin of the trained model against the weights it started from, on the
    stage's held-out rows, in a Ray task with a training worker's resources (its GPU, where it has one)."""
    import ray

    rows = [{k: r[k] for k in _TRAIN_KEYS if k in r} for r in held]
    res, max_length = cfg.resources, cfg.pref.max_length
    if not any("chosen" in r for r in rows):  # nothing to load the models for
        return heldout.heldout(policy, reference, rows, max_length)
    # DEFAULT scheduling: inside a search trial the task would otherwise be placed in the trial's own small bundle.
    task = ray.remote(heldout.heldout).options(num_cpus=res.cpus_per_worker, num_gpus=1 if res.use_gpu else 0,
                                               scheduling_strategy="DEFAULT")
    return ray.get(task.remote(policy, reference, rows, max_length, cfg.model.chat_template, res.use_gpu,
                               res.cpus_per_worker, _logprobs_dir(cfg)))


def eval_prompts(cfg: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    """The eval prompts (the first data.max_eval_prompts) and the set-aside rows; a prompt whose id an earlier
    one has is set aside (answers and verdicts are keyed by id)."""
    if not cfg.data.eval_prompts:
        raise PipelineError("no eval prompt set configured (data.eval_prompts)")
    good, bad = formats.read_rows(cfg.data.eval_prompts, "eval", exclude=[cfg.run_dir])
    n = cfg.data.max_eval_prompts
    return (good[:n] if n else good), bad


def _turns_prompt(r: dict) -> dict:
    """What :func:`generate_turns` asks of an eval row: its prompt, and for an MT-Bench row (``question_turns``)
    the later turns at its category's temperature."""
    if "question_turns" not in r:
        return {"id": r["id"], "messages": r["messages"]}
    return {"id": r["id"], "messages": r["messages"], "next_turns": r["question_turns"][1:],
            "temperature": category_temperature(r["category"])}


def _answer_row(r: dict, o: dict) -> dict:
    """An answers.jsonl row. ``answer`` is turn 1's, the answer to ``messages`` that the single-turn judges read;
    an MT-Bench row adds its ``category``, ``question_turns``, ``turns`` (the answer to each) and their lengths."""
    row = {"id": r["id"], "messages": r["messages"], "answer": o["turns"][0], "num_new_tokens": o["num_new_tokens"][0]}
    if "question_turns" in r:
        row.update(category=r["category"], question_turns=r["question_turns"], turns=o["turns"],
                   turns_new_tokens=o["num_new_tokens"], temperature=category_temperature(r["category"]))
    return row


def generate_stage(cfg: ExperimentConfig, model: str, label: str) -> dict[str, Any]:
    """Answers of ``model`` (a resolved path, URI or hub id) to the eval prompts."""
    return answers_stage(cfg, EvalModelConfig(name=model), label)


def answers_stage(cfg: ExperimentConfig, src: EvalModelConfig, label: str, stage: str = "generate") -> dict[str, Any]:
    """Answers of ``src`` to the eval prompts (``data.eval_prompts``): generated by the model it names (resolved
    here), asked of its endpoint, or read from its answers file, in ``<run_dir>/<stage>/<label>-<key>/``."""
    g = cfg.generate
    kind = src.kind
    # The seed: MT-Bench's sampled categories draw from it (greedy answers do not depend on it).
    conf: dict[str, Any] = {"max_eval_prompts": cfg.data.max_eval_prompts}
    if kind == "local":
        model = models.resolve(src.name)
        conf.update(backend=g.backend, max_new_tokens=g.max_new_tokens, model=model, seed=cfg.seed)
    elif kind == "endpoint":
        # The server (scheme and host) and a hash of its whole URL: a path or query may carry a token.
        url = urlsplit(endpoints.Endpoint(src.endpoint.api_base_env, src.endpoint.api_key_env).url)
        conf.update(endpoint=f"{url.scheme}://{url.hostname}#{digest(url.geturl())}", model=src.name,
                    max_new_tokens=g.max_new_tokens, seed=cfg.seed)
    else:
        conf.update(answers=src.answers)
    prompt_files = _files([cfg.data.eval_prompts] if cfg.data.eval_prompts else [], "eval_prompts", cfg.run_dir)
    # One file: its fingerprint, as before; a directory or glob: its files' (never the run's own outputs).
    prompts_fp = (prompt_files[cfg.data.eval_prompts] if list(prompt_files) == [cfg.data.eval_prompts]
                  else digest(prompt_files))
    inputs = {"prompts": prompts_fp,
              **({"model": fingerprint(model)} if kind == "local" else {}),
              **({"answers": fingerprint(src.answers)} if kind == "answers" else {})}

    def work(d: Path) -> dict[str, Any]:
        prompts, bad = eval_prompts(cfg)
        asked = [_turns_prompt(r) for r in prompts]
        unused = None
        if kind == "local":
            out = generate_turns(model, asked, g, cfg.seed, generate_fn=generate)
        elif kind == "endpoint":
            def ask(name: str, ps: list[dict], gen: Any) -> list[dict]:
                return sources.served_answers(name, ps, src.endpoint, gen.max_new_tokens, d / "responses.jsonl")

            out = generate_turns(src.name, asked, g, cfg.seed, generate_fn=ask)
        else:
            out, unused = sources.match(prompts, sources.read_answers(src.answers), src.answers)
        rows = [_answer_row(r, o) for r, o in zip(prompts, out, strict=True)]
        _write_jsonl(d / "answers.jsonl", rows)
        _write_jsonl(d / "set_aside.jsonl", bad)
        lengths = [r["num_new_tokens"] for r in rows if r["num_new_tokens"] is not None]
        empty = sum(any(not t.strip() for t in r.get("turns", [r["answer"]])) for r in rows)
        metrics = {"mean_new_tokens": sum(lengths) / len(lengths) if lengths else None,
                   "mean_chars": sum(len(r["answer"]) for r in rows) / len(rows) if rows else None}
        if kind == "answers":
            metrics["mean_new_tokens_reason"] = "an answers file does not say how many tokens its answers took"
        elif not lengths and rows:
            metrics["mean_new_tokens_reason"] = "the endpoint reported no token counts (usage)"
        return {"outputs": {"answers": str(d / "answers.jsonl"), "set_aside": str(d / "set_aside.jsonl")},
                "counts": {"prompts_read": len(prompts) + len(bad), "prompts_answered": len(rows),
                           "prompts_set_aside": len(bad), "empty_answers": empty,
                           **({"answers_unused": unused} if unused is not None else {})},
                "metrics": metrics}

    return run_stage(cfg.run_dir, stage, label, conf, inputs, work)


def baseline_model(cfg: ExperimentConfig) -> str:
    return models.resolve(cfg.judge.baseline or cfg.model.base)


def judgement_cache(cfg: ExperimentConfig, judge_id: str) -> Path:
    """Where the judge ``judge_id`` names keeps its judgements, for every stage of the run: ``<run_dir>/judgements/
    <judge>-<hash>.jsonl``, each judgement filed under a hash of the judge and the full request (the prompt as the
    protocol's template made it, so another template version is another request)."""
    path = _run_dir(cfg) / "judgements" / f"{_model_label(judge_id.split('#')[0])}-{digest(judge_id)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _judge_local(msgs: list[dict], judge_model: str, judge_id: str, gen: Any, cache_path: Path) -> list[dict]:
    """The local judge's answers: those in ``cache_path`` (judged by the same model, weights and backend, at the
    same length) as they are, the others generated and added to it."""
    cache = endpoints.read_cache(cache_path)
    keys = [endpoints.request_key(judge_id, m["messages"], gen.max_new_tokens) for m in msgs]
    todo = [(m, k) for m, k in zip(msgs, keys, strict=True) if k not in cache]
    outs = generate(judge_model, [m for m, _ in todo], gen) if todo else []
    with open(cache_path, "a") as f:
        for (_, key), o in zip(todo, outs, strict=True):
            cache[key] = {"answer": o["answer"], "num_new_tokens": o["num_new_tokens"]}
            f.write(endpoints.cache_line(key, o["answer"], o["num_new_tokens"]))
            f.flush()  # one append a line: trials running side by side share the file
    return [{"id": m["id"], **cache[k]} for m, k in zip(msgs, keys, strict=True)]


def _judge_openai(msgs: list[dict], j: Any, cache_path: Path,
                  top_logprobs: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """The judge endpoint's answers and the requests' counts. Each answer is stored in ``cache_path`` (the run's
    judgement cache) as it arrives, so that a re-run of a failed stage, or another stage asking the same, sends only
    the requests without one; more than ``judge.max_failed_fraction`` of the requests failed after their retries
    fails the stage. ``top_logprobs`` > 0 (a judge that reads log-probabilities): one token is asked for, with its
    top log-probabilities."""
    outs = endpoints.complete_cached(msgs, j.model, endpoints.Endpoint(j.api_base_env, j.api_key_env),
                                     1 if top_logprobs else j.max_new_tokens, cache_path, timeout=j.timeout_s,
                                     workers=j.concurrency, retry=endpoints.Retry(j.max_retries, j.retry_backoff_s),
                                     top_logprobs=top_logprobs)
    failed: dict[str, int] = {}
    for o in outs:
        if o["error"]:
            failed[o["error_kind"]] = failed.get(o["error_kind"], 0) + 1
    errors = [o["error"] for o in outs if o["error"]]
    # The endpoint's own error, rather than a request given up on after it
    first = next((o["error"] for o in outs if o["error"] and o["error_kind"] != endpoints.NOT_SENT),
                 errors[0] if errors else None)
    why = endpoints.failure_message("judge", failed, len(outs), first, "judge.max_failed_fraction",
                                    j.max_failed_fraction, len(outs) - len(errors), cache_path)
    if why:
        raise PipelineError(why)
    return outs, {"requests": len(outs), "answered_earlier": sum(o["cached"] for o in outs), "failed": failed}


def judge_stage(cfg: ExperimentConfig, target: dict[str, Any], baseline: dict[str, Any],
                stage: str = "judge") -> dict[str, Any]:
    """The judge's verdicts on ``target``'s answers against ``baseline``'s (generate stages' results), by the
    protocol ``judge.protocol`` names; the local judge generates with ``judge.generate`` (default: ``generate``).
    ``results.json`` holds the summary, ``verdicts.jsonl`` the per-item verdicts."""
    j = cfg.judge
    kind = JUDGES[j.protocol]
    judge_model = models.resolve(j.model) if j.backend == "local" else j.model
    # How requests are sent is not what they ask: a change to these keeps the stage's directory, so a re-run
    # with, say, more retries still finds the answers stored by the failed run. Of the local generation
    # settings, only the backend changes the answers (batches and actors do not), as in generate_stage's key.
    conf = {k: v for k, v in config_dict(j).items() if k not in SENDING and k != "generate"}
    if not j.verbosity_check:  # added later: off, a judge stage keeps the key it had before the option existed
        del conf["verbosity_check"]
    conf["judge_model"] = judge_model
    inputs = {"target": fingerprint(target["outputs"]["answers"]),
              "baseline": fingerprint(baseline["outputs"]["answers"])}
    if j.prompts:  # the prompt texts, not only their file's name: an edited file is another judge
        inputs["prompts"] = fingerprint(j.prompts)
    if j.references:  # likewise the reference answers mt_bench grades against
        inputs["references"] = fingerprint(j.references)
    gen = j.generation(cfg.generate)
    if j.backend == "local":
        conf["generation_backend"] = gen.backend
        inputs["judge"] = fingerprint(judge_model)

    def work(d: Path) -> dict[str, Any]:
        t_rows = _read_jsonl(target["outputs"]["answers"])
        b_rows = {r["id"]: r for r in _read_jsonl(baseline["outputs"]["answers"])}
        missing = [r["id"] for r in t_rows if r["id"] not in b_rows]
        if missing:
            raise PipelineError(f"baseline answers lack prompts {missing[:5]}")
        # A protocol that grades every turn gets the answer rows (per-turn answers); the others the answer texts.
        if kind.answer_rows:
            requests = kind.build(t_rows, {r["id"]: r for r in t_rows}, b_rows, j)
        else:
            requests = kind.build(t_rows, {r["id"]: r["answer"] for r in t_rows},
                                  {i: r["answer"] for i, r in b_rows.items()}, j)
        msgs = [{"id": r["id"], "messages": r["messages"]} for r in requests]
        requested: dict[str, Any] = {}
        judge_id = j.model if j.backend == "openai" else f"{judge_model}#{inputs['judge']}#{gen.backend}"
        cache_path = judgement_cache(cfg, judge_id)
        if j.backend == "local" and kind.logprobs:  # the judgement is the first token's top log-probabilities
            from .evaluate.generate import next_token_logprobs

            outs = next_token_logprobs(judge_model, msgs, kind.logprobs, gen)
        elif j.backend == "local":
            outs = _judge_local(msgs, judge_model, judge_id, gen, cache_path)
        else:
            outs, requested = _judge_openai(msgs, j, cache_path, kind.logprobs)
        verdicts, summary = kind.score(requests, outs, j)
        _write_jsonl(d / "verdicts.jsonl", verdicts)
        write_json(d / "results.json", summary)
        return {"outputs": {"verdicts": str(d / "verdicts.jsonl"), "results": str(d / "results.json"),
                            "target": target["dir"], "baseline": baseline["dir"],
                            **({"judgements": str(cache_path)} if not kind.logprobs or requested else {})},
                "counts": {**{c: summary[c] for c in COUNTS},
                           **({"endpoint_requests": requested} if requested else {})},
                "metrics": summary}

    return run_stage(cfg.run_dir, stage, target["label"], conf, inputs, work)


def _model_label(name: str) -> str:
    """A directory-safe label of a model name, path or URI: its last part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.rstrip("/").rsplit("/", 1)[-1]).strip("-") or "model"


def benchmarks_stage(cfg: ExperimentConfig, model: str, label: str | None = None) -> dict[str, Any]:
    """lm-eval on ``model`` (a checkpoint, registry name or hub id) as ``evaluate.benchmarks`` says, in a Ray task:
    ``results.json`` (every number with its settings) in ``<run_dir>/evaluate/benchmarks/<model>-<key>/``."""
    b = cfg.evaluate.benchmarks
    path = models.resolve(model)
    # Resources and batch size do not change the numbers; everything else is the key.
    conf = {"model": model, **{k: v for k, v in config_dict(b).items()
                               if k not in ("num_cpus", "num_gpus", "batch_size")}}
    files = [t[len(benchmarks.BIGBENCH):] for t in b.tasks if t.startswith(benchmarks.BIGBENCH)]
    inputs = {"model": fingerprint(path), **{f: fingerprint(f) for f in files},
              **{d: fingerprint(d) for d in b.include_path}}  # every file there: task YAMLs and their data

    def work(d: Path) -> dict[str, Any]:
        res = benchmarks.evaluate(path, b)
        write_json(d / "results.json", res)
        values = {f"{task}/{m}": v["value"] for task, t in res["tasks"].items() for m, v in t["metrics"].items()}
        return {"outputs": {"results": str(d / "results.json")}, "counts": {"tasks": len(res["tasks"])},
                "metrics": values}

    return run_stage(cfg.run_dir, "evaluate/benchmarks", label or _model_label(model), conf, inputs, work)


def suite_baseline(cfg: ExperimentConfig, suite: str) -> EvalModelConfig:
    """What ``evaluate.suites.<suite>``'s models are compared with: its baseline, else the judge's, else the base."""
    s = cfg.evaluate.suites[suite]
    return s.baseline or EvalModelConfig(name=cfg.suite_judge(suite).baseline or cfg.model.base)


def suite_stages(cfg: ExperimentConfig, suite: str, src: EvalModelConfig, label: str | None = None) -> dict[str, Any]:
    """``src`` on ``evaluate.suites.<suite>``: its answers (``evaluate/<suite>/answers/``), the baseline's, and the
    judge's verdicts (``evaluate/<suite>/<label>-<key>/``; the label defaults to the model's name's last part);
    ``{"answers", "baseline", "judge"}`` manifests."""
    scfg = cfg.suite(suite)
    where = f"evaluate/{suite}/answers"
    base_src = suite_baseline(cfg, suite)
    baseline = answers_stage(scfg, base_src, base_src.title, where)
    answers = answers_stage(scfg, src, label or src.title, where)
    judged = judge_stage(scfg, answers, baseline, f"evaluate/{suite}")
    return {"answers": answers, "baseline": baseline, "judge": judged}


def evaluate_models(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """``alignment evaluate``: each of ``evaluate.models`` on each of ``evaluate.suites`` and through
    ``evaluate.benchmarks`` (the models loaded here), one stage directory each; then ``evaluate/results.json``
    and the report. Returns the judge and benchmark manifests."""
    _check_evaluate(cfg)
    ev = cfg.evaluate
    results: dict[str, Any] = {"suites": {}, "benchmarks": {}}
    done = []
    for name, suite in ev.suites.items():
        j = cfg.suite_judge(name)
        entry = results["suites"][name] = {
            "protocol": j.protocol, "prompts": suite.prompts, "baseline": suite_baseline(cfg, name).title,
            "judge": JUDGES[j.protocol].describe(config_dict(j)), "models": {}}
        for m in ev.models:
            st = suite_stages(cfg, name, m)
            entry["models"][m.title] = {
                "metrics": st["judge"]["metrics"], "dir": st["judge"]["dir"],
                "answers": {"counts": st["answers"]["counts"], "metrics": st["answers"]["metrics"]}}
            done.append(st["judge"])
    if ev.benchmarks.tasks:
        for m in ev.models:
            if m.kind != "local":  # lm-eval scores a model's own log-probabilities
                what = "a served model" if m.kind == "endpoint" else "an answers file"
                results["benchmarks"][m.title] = {
                    "error": f"not run: lm-eval needs the model's own weights, and this is {what}"}
                continue
            bench = benchmarks_stage(cfg, m.name, m.title)
            results["benchmarks"][m.title] = json.loads(Path(bench["outputs"]["results"]).read_text())
            done.append(bench)
    out = _run_dir(cfg) / "evaluate"
    write_json(out / "results.json", results)
    report.write_evaluate_report(results, out)
    return done


# ------------------------------------------------------------------------------------------ composition


def _trained(pref: dict[str, Any]) -> tuple[str, str]:
    return pref["outputs"]["model"], f"{pref['label']}-{Path(pref['dir']).name.rsplit('-', 1)[-1]}"


def trained_model(cfg: ExperimentConfig) -> tuple[str, str]:
    """The preference-tuned model of the config's point (its stages first): its path and its label."""
    return _trained(pref_stage(cfg))


def generate_point(cfg: ExperimentConfig) -> dict[str, Any]:
    """The answers at the config's point: ``{model, pref, target, baseline}``, the trained model's path, its pref
    manifest and the generate manifests of its answers and of the baseline's (the stages before first)."""
    pref = pref_stage(cfg)
    model, label = _trained(pref)
    return {"model": model, "pref": pref, "target": generate_stage(cfg, model, label),
            "baseline": generate_stage(cfg, baseline_model(cfg), "baseline")}


def judge_point(cfg: ExperimentConfig) -> dict[str, Any]:
    """:func:`generate_point`'s, and ``judge``: the judge manifest of the trained model against the baseline."""
    answers = generate_point(cfg)
    return {**answers, "judge": judge_stage(cfg, answers["target"], answers["baseline"])}


def _judged(cfg: ExperimentConfig) -> bool:
    """Whether a search point runs the judge section: search.judge, by default when the metric is the judge's."""
    if cfg.search.judge is not None:
        return cfg.search.judge
    return cfg.search.metric not in heldout.METRICS and "/" not in cfg.search.metric


def _suite_metrics(cfg: ExperimentConfig, model: str, label: str) -> dict[str, Any]:
    """Every suite of search.suites on ``model``: its metrics (and their reasons) as <suite>/<metric>."""
    m = {}
    for name in cfg.search.suites:
        judged = suite_stages(cfg, name, EvalModelConfig(name=model), label)["judge"]
        m.update({f"{name}/{k}": v for k, v in judged["metrics"].items()
                  if k in JUDGES[cfg.suite_judge(name).protocol].metrics or k.endswith("_reason")})
    return m


def sft_alone(cfg: ExperimentConfig, pref: dict[str, Any]) -> dict[str, Any]:
    """The search metric of the SFT checkpoint ``pref`` (the preference stage's manifest) started from, without the
    preference tuning: ``{sft_metric, sft_metric_reason}``. The held-out preference metrics (cheap: a forward pass)
    score it against model.base on the preference stage's held-out pairs; a suite's metric runs the suite on it; the
    judge section's metrics are not measured on it (null, with the reason)."""
    start = pref["outputs"]["start"]
    metric = cfg.search.metric
    if start["from"] != "sft":
        return {"sft_metric": None, "sft_metric_reason": f"pref.start_from is {start['from']}: no SFT checkpoint"}
    ckpt, label = start["checkpoint"], f"k{cfg.select.k}-step{start['sft_step']}-sft"
    if metric in heldout.METRICS:
        held_path = pref["outputs"].get("heldout")
        if not held_path:
            return {"sft_metric": None, "sft_metric_reason": f"the preference stage {pref['dir']} predates keeping its "
                    "held-out pairs"}
        base = models.resolve(cfg.model.base)
        conf = {"checkpoint": ckpt, "reference": cfg.model.base, "max_length": cfg.pref.max_length,
                "chat_template": cfg.model.chat_template, "heldout": list(heldout.METRICS)}
        inputs = {"heldout": fingerprint(held_path), "checkpoint": fingerprint(ckpt), "reference": fingerprint(base)}
        scored = run_stage(cfg.run_dir, "sft_eval", label, conf, inputs, lambda d: {
            "metrics": _heldout(cfg, ckpt, base, _read_jsonl(held_path))})["metrics"]
        return {"sft_metric": scored.get(metric), "sft_metric_reason": scored.get("heldout_reason")}
    if "/" in metric:
        m = _suite_metrics(cfg, ckpt, label)
        return {"sft_metric": m.get(metric), "sft_metric_reason": m.get(f"{metric}_reason")}
    return {"sft_metric": None, "sft_metric_reason": f"{metric} is the judge section's, which judges preference-tuned "
            "models only; a suite's metric (search.suites, search.metric: <suite>/<metric>) scores SFT checkpoints "
            "alone too"}


def run_point(cfg: ExperimentConfig) -> dict[str, Any]:
    """select -> sft -> pref -> generate (trained and baseline) -> judge at the config's point (a search trial
    runs it at ``cfg.at(point)``; the judge where :func:`_judged`), search.suites on the trained model, and the
    SFT checkpoint alone (:func:`sft_alone`); returns the point's results."""
    pref = pref_stage(cfg)
    model, label = _trained(pref)
    # The held-out preference metrics (a pref stage from before them has none: null), then the judge's summary.
    m = {**dict.fromkeys(heldout.METRICS), **pref["metrics"].get("heldout", {})}
    judge_dir = None
    if _judged(cfg):
        target = generate_stage(cfg, model, label)
        judged = judge_stage(cfg, target, generate_stage(cfg, baseline_model(cfg), "baseline"))
        m.update(judged["metrics"])
        judge_dir = judged["dir"]
    # The held-out SFT loss of the checkpoint preference tuning started from (sft.eval_rows; a loss, lower is
    # better, so a column beside the objective rather than one: the search maximises).
    start = _pick_checkpoint(sft_stage(cfg), cfg.pref.sft_step) if cfg.pref.start_from == "sft" else {}
    m["sft_eval_loss"] = start.get("eval_loss")
    if m["sft_eval_loss"] is None:
        m["sft_eval_loss_reason"] = (f"pref.start_from is {cfg.pref.start_from}: no SFT checkpoint"
                                     if cfg.pref.start_from != "sft" else "sft.eval_rows is 0, or "
                                     "sft.eval_at_checkpoints is false: no held-out loss at the checkpoint")
    m.update(_suite_metrics(cfg, model, label))
    m.update(sft_alone(cfg, pref))
    step = pref["outputs"]["start"].get("sft_step", cfg.pref.sft_step)
    return {"k": cfg.select.k, "sft_step": step, "method": cfg.pref.method, "beta": cfg.pref.beta,
            "num_pairs": cfg.pref.num_pairs, "start_from": cfg.pref.start_from, "metric": m.get(cfg.search.metric),
            **m, "model": model, "judge_dir": judge_dir}


def _search(cfg: ExperimentConfig) -> tuple[list[dict], Path]:
    storage = _storage(cfg, _run_dir(cfg) / "search")

    def refresh(rows: list[dict]) -> None:  # the report as trials finish, while the search runs
        report.write_report(rows, config_dict(cfg), _run_dir(cfg) / "report", partial=True)

    results, timings = search.run_search(cfg, run_point, storage, on_rows=refresh)
    return results, write_search_results(cfg, results, timings)


def _fail_if_a_trial_failed(results: list[dict], where: str) -> None:
    failed = [r for r in results if r.get("error")]
    if failed:
        raise search_error(f"{len(failed)} of {len(results)} search trials failed ({where})", failed)


def run_search(cfg: ExperimentConfig) -> dict[str, Any]:
    """The search on Ray Tune, each trial :func:`run_point` at a point of the grid; its results, written to
    ``<run_dir>/search/results.json`` (a failed trial fails the search once every trial ran)."""
    results, path = _search(cfg)
    _fail_if_a_trial_failed(results, f"results: {path}")
    return {"results": results, "written": str(path)}


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """The search, then the report (of the failed trials too, before their error is raised)."""
    results, _ = _search(cfg)
    paths = _write_report(cfg, results)
    _fail_if_a_trial_failed(results, f"report: {paths['markdown']}")
    return {"results": results, "report": paths}


def search_error(message: str, failed: list[dict]) -> PipelineError:
    """The error of a search whose ``failed`` trials failed: the first one's error follows ``message``, and the
    exit code is the config/data/model one when every failed trial failed on those."""
    first = failed[0]
    err = PipelineError(f"{message}; first: k={first['k']}, sft_step={first.get('sft_step')}: {first['error']}")
    err.exit_code = min(r.get("exit_code", err.exit_code) for r in failed)
    return err


# ------------------------------------------------------------------------------------------- preflight

_STAGES = ("select", "sft", "pref", "generate", "judge")  # a command runs its stage and those before it


def preflight(cfg: ExperimentConfig, command: str) -> None:
    """Check what ``command`` (a stage, ``search`` or ``run``) will read, before Ray starts: every data path,
    glob and directory holds files of a known type, every model name is a registry name, a local model, a cloud
    URI or a model of the Hugging Face hub (or its local cache), a chat template file exists and an endpoint's
    URL is set. A typo then fails in a second, naming its key, instead of inside a Ray task minutes later."""
    if command == "evaluate":
        _check_evaluate(cfg)
        return
    if command not in _STAGES and command not in ("search", "run"):
        return  # report reads the search's results only
    stages = set(_STAGES[:_STAGES.index(command) + 1] if command in _STAGES else _STAGES)
    if cfg.pref.start_from != "sft" and "pref" in stages:
        stages -= {"select", "sft"}  # scenarios 2 and 3 start from model.base or model.instruct
    s, data, names = cfg.select, {}, {}
    if "select" in stages:
        data["data.sft"] = cfg.data.sft
        names.update(dict(select.model_names(cfg).values()))  # what the scorers and max_tokens need
        for section in select.endpoint_sections(s):
            endpoint = getattr(s, section)
            _endpoint_set(f"select.{section}", endpoint.api_base_env, endpoint.api_key_env)
        if select.SELECTORS[s.selector].embeds:
            name = s.embedding.model_name(cfg.model.base)
            if name != DEFAULT_SENTENCE_MODEL:  # that one comes from its wheel
                names["select.embedding.model" if s.embedding.model else "model.base"] = name
    if stages & {"sft", "pref"}:
        names["model.base"] = cfg.model.base
    if "pref" in stages:
        data["data.preferences"] = cfg.data.preferences
        if cfg.pref.start_from == "instruct":
            names["model.instruct"] = cfg.model.instruct
    if "generate" in stages:
        data["data.eval_prompts"] = [cfg.data.eval_prompts] if cfg.data.eval_prompts else []
        names["judge.baseline" if cfg.judge.baseline else "model.base"] = cfg.judge.baseline or cfg.model.base
    if "judge" in stages:
        if cfg.judge.backend == "openai":
            _endpoint_set("judge", cfg.judge.api_base_env, cfg.judge.api_key_env)
        else:
            names["judge.model"] = cfg.judge.model
        kind = JUDGES[cfg.judge.protocol]
        _check_protocol("", cfg)
        # A judge metric this protocol does not report would leave every trial's objective empty.
        if command in ("search", "run") and cfg.search.metric in heldout.METRICS and cfg.pref.eval_rows == 0:
            raise ConfigError(f"search.metric: {cfg.search.metric} is measured on held-out preference pairs, and "
                              "pref.eval_rows is 0: hold some out (e.g. pref.eval_rows=32)")
        if command in ("search", "run") and cfg.search.mlflow_tracking_uri:
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:
                raise ConfigError("search.mlflow_tracking_uri: MLflow is not installed; pip install "
                                  "'alignment[tracking]'")
        if command in ("search", "run"):
            for name in cfg.search.suites:
                _check_suite(cfg, name, names)
            suite, _, metric = cfg.search.metric.rpartition("/")
            protocol = cfg.suite_judge(suite).protocol if suite else None
            if suite and metric not in JUDGES[protocol].metrics:
                raise ConfigError(f"search.metric: {metric} is not a metric of the suite {suite}'s protocol "
                                  f"{protocol} ({', '.join(JUDGES[protocol].metrics)})")
        if command in ("search", "run") and cfg.search.metric in METRICS and cfg.search.metric not in kind.metrics:
            raise ConfigError(f"search.metric: {cfg.search.metric} is not a metric of judge.protocol "
                              f"{cfg.judge.protocol} ({', '.join(kind.metrics)})")
    template = cfg.model.chat_template
    reads_template = stages & {"sft", "pref"} or ("select" in stages and s.max_tokens is not None)
    if template and reads_template and "://" not in template and not Path(template).is_file():
        raise ConfigError(f"model.chat_template: file not found: {template}")
    for key, patterns in data.items():
        _check_data(key, patterns, cfg.run_dir)
    by_name: dict[str, list[str]] = {}
    for key, name in names.items():
        by_name.setdefault(name, []).append(key)
    for name, keys in by_name.items():
        try:
            models.check(name)
        except models.ModelError as e:
            raise models.ModelError(f"{', '.join(keys)}: {e}") from None


def _check_evaluate(cfg: ExperimentConfig) -> None:
    """``alignment evaluate`` has models and something to run them on; its models exist, its endpoints are set,
    its answers files answer every prompt of every suite, its prompt sets suit their protocols, lm-eval is
    installed where benchmarks are asked for, and the BIG-bench files and task directories are there."""
    import importlib.util

    ev, b = cfg.evaluate, cfg.evaluate.benchmarks
    if not ev.models:
        raise ConfigError("evaluate.models is empty: name the checkpoints, registry names or hub ids, endpoints or "
                          "answers files to evaluate")
    if not ev.suites and not b.tasks:
        raise ConfigError("nothing to evaluate: set evaluate.suites (judged prompt sets) or evaluate.benchmarks.tasks "
                          "(lm-eval tasks, bigbench:<path> or preset:<name>)")
    labels: dict[str, str] = {}
    for i, m in enumerate(ev.models):
        label = m.title
        if label in labels:
            raise ConfigError(f"evaluate.models[{i}]: {m.name} and {labels[label]} would share the label {label} "
                              "(their output directories and report rows); give one a label")
        labels[label] = m.name
    names: dict[str, str] = {}
    for i, m in enumerate(ev.models):
        _check_source(f"evaluate.models[{i}]", m, names)
    for name in ev.suites:
        _check_suite(cfg, name, names, [(f"evaluate.models[{i}]", m) for i, m in enumerate(ev.models)])
    if b.tasks:
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("evaluate.benchmarks needs lm-eval: pip install 'alignment[eval]'")
        for t in b.tasks:
            if t.startswith(benchmarks.BIGBENCH) and not Path(t[len(benchmarks.BIGBENCH):]).is_file():
                raise ConfigError(f"evaluate.benchmarks.tasks: {t}: file not found")
        for d in b.include_path:
            if not Path(d).is_dir():
                raise ConfigError(f"evaluate.benchmarks.include_path: {d} is not a directory")
    for key, name in names.items():
        try:
            models.check(name)
        except models.ModelError as e:
            raise models.ModelError(f"{key}: {e}") from None


def _check_suite(cfg: ExperimentConfig, name: str, names: dict[str, str],
                 evaluated: list[tuple[str, EvalModelConfig]] | None = None) -> None:
    """``evaluate.suites.<name>``: its prompts, judge, protocol and baseline; the answers files among the baseline
    and ``evaluated`` ((key, model) pairs) answer each of its prompts. Models to load are added to ``names``."""
    key, scfg = f"evaluate.suites.{name}", cfg.suite(name)
    _check_data(f"{key}.prompts", [scfg.data.eval_prompts], cfg.run_dir)
    j = scfg.judge
    if j.backend == "openai":
        _endpoint_set(f"{key}.judge", j.api_base_env, j.api_key_env)
    else:
        names[f"{key}.judge.model"] = j.model
    _check_protocol(key, scfg)
    base = suite_baseline(cfg, name)
    _check_source(f"{key}.baseline", base, names)
    prompts = None
    for what, m in [*(evaluated or []), (f"{key}.baseline", base)]:
        if m.answers:
            prompts = prompts or eval_prompts(scfg)[0]
            try:
                sources.match(prompts, sources.read_answers(m.answers), m.answers)
            except sources.AnswersError as e:
                raise sources.AnswersError(f"{what} on {key}: {e}") from None


def _check_source(key: str, m: EvalModelConfig, names: dict[str, str]) -> None:
    """A model to load is checked with the others; an endpoint's URL must be set; an answers file must exist."""
    if m.kind == "local":
        names[key] = m.name
    elif m.kind == "endpoint":
        _endpoint_set(f"{key}.endpoint", m.endpoint.api_base_env, m.endpoint.api_key_env,
                      f"{key} is a served model")
    elif "://" not in m.answers and not Path(m.answers).is_file():
        raise ConfigError(f"{key}.answers: file not found: {m.answers}")


def _check_protocol(key: str, cfg: ExperimentConfig) -> None:
    """The judge's own files (its check), and prompts of the shape it grades (its ``question``; MT-Bench grading
    needs MT-Bench questions, ``turns`` and ``category``), or they would fail in the judge stage, after generation."""
    kind = JUDGES[cfg.judge.protocol]
    try:
        if kind.check:
            kind.check(cfg.judge)
    except AlignmentError as e:
        if not key:
            raise
        raise type(e)(f"{key}: {e}") from None
    if (kind.question or cfg.judge.protocol == "mt_bench") and cfg.data.eval_prompts:
        _check_data(f"{key}.prompts" if key else "data.eval_prompts", [cfg.data.eval_prompts], cfg.run_dir)
    if kind.question and cfg.data.eval_prompts:
        for row in eval_prompts(cfg)[0]:
            try:
                kind.question(row)
            except AlignmentError as e:
                raise type(e)(f"{key + ': ' if key else ''}{cfg.data.eval_prompts}: {e}") from None
    if cfg.judge.protocol == "mt_bench" and cfg.data.eval_prompts:
        plain = [r["id"] for r in eval_prompts(cfg)[0] if "question_turns" not in r]
        if plain:
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}judge.protocol mt_bench grades MT-Bench questions ({{question_id, category, "
                              f"turns}}), and {len(plain)} prompts of {cfg.data.eval_prompts} are not (first: "
                              f"{plain[0]})")


def _check_data(key: str, patterns: list[str], run_dir: str) -> None:
    """``patterns`` match files of a known type outside ``run_dir``, as the stage will list them (a cloud URI and
    a Hugging Face dataset are read later)."""
    if not patterns:
        raise ConfigError(f"{key} is not set, and this command reads it")
    for pattern in patterns:
        try:
            if pattern.startswith(formats.HF_PREFIX):
                formats.parse_hf_source(pattern)  # loaded (once, then cached) when the stage runs
                continue
            for path in formats.expand_paths([pattern], exclude=[run_dir]):
                if "://" not in path:
                    formats.file_kind(path)
        except formats.DataError as e:
            raise formats.DataError(f"{key}: {e}") from None


def _endpoint_set(section: str, env: str, key_env: str, why: str | None = None) -> None:
    """The endpoint's URL is set and usable, and its key, if any, can be sent (checked as the stage will).
    ``why`` the section needs one (default: its backend is openai)."""
    if not os.environ.get(env):
        raise ConfigError(f"{why or f'{section}.backend is openai'}, but the endpoint URL is not set: export "
                          f"{env}=https://.../v1 (the variable {section}.api_base_env names)")
    try:
        endpoints.Endpoint(env, key_env)
    except endpoints.GenerationError as e:
        raise ConfigError(f"{section}: {e}") from None


def report_only(cfg: ExperimentConfig) -> dict[str, str]:
    results_path = _run_dir(cfg) / "search" / "results.json"
    if not results_path.is_file():
        raise PipelineError(f"no search results at {results_path}; run `alignment run` or `alignment search` first")
    saved = json.loads(results_path.read_text())
    return _write_report(cfg, saved.get("rows", saved.get("trials", [])))


def write_search_results(cfg: ExperimentConfig, results: list[dict], timings: dict) -> Path:
    """The search's manifest (``results.json``: config, every result row, the best, counts and timings) and the
    rows as a table (``results.parquet``, ``results.csv``)."""
    import pandas as pd

    d = _run_dir(cfg) / "search"
    d.mkdir(parents=True, exist_ok=True)
    trials = report.trials(results)
    failed = sum(any(r.get("error") for r in rows) for rows in trials)
    stopped, _ = report.trial_counts(results)
    write_json(d / "results.json", {
        "config": config_dict(cfg), "rows": results, "best": report.best_row(results), "timings": timings,
        "counts": {"trials": len(trials), "rows": len(results), "succeeded": len(trials) - failed,
                   "failed": failed, "stopped_early": stopped,
                   "baseline_trials": sum(bool(rows[0].get("baseline")) for rows in trials)}})
    frame = pd.DataFrame(results)
    for col in frame.columns:  # a column of mixed kinds (an SFT step 'last' beside numbers) is written as text
        kinds = {type(v) for v in frame[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds - {int, float}) and len(kinds) > 1:
            frame[col] = frame[col].map(lambda v: None if v is None else str(v))
    frame.to_parquet(d / "results.parquet", index=False)
    frame.to_csv(d / "results.csv", index=False)
    return d / "results.json"


def _write_report(cfg: ExperimentConfig, results: list[dict]) -> dict[str, str]:
    out = _run_dir(cfg) / "report"
    started = time.time()
    paths = report.write_report(results, config_dict(cfg), out)
    results_path = _run_dir(cfg) / "search" / "results.json"
    write_json(out / "manifest.json", {
        "stage": "report", "status": "complete", "config": config_dict(cfg),
        "inputs": {"search_results": fingerprint(results_path) if results_path.is_file() else None},
        "outputs": paths, "counts": {"trials": report.trial_counts(results)[1], "rows": len(results)},
        "timings": {"started": started, "seconds": round(time.time() - started, 3)}})
    return paths
