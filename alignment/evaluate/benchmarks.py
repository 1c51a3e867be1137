"""Benchmarks through lm-eval: its task registry, custom task YAMLs, and BIG-bench's own JSON tasks offline.

Plain functions, with Ray at the edge:

- :func:`bigbench_task` turns a BIG-bench JSON task as published into an lm-eval multiple-choice task (a JSONL
  and a YAML in the cache), so it runs with no dataset hub;
- :func:`run_lm_eval` runs ``lm_eval.simple_evaluate`` on one model in this process and returns every metric
  with its standard error and the settings that produced it (chat template, few-shot, limit, dtype, ...);
- :func:`benchmark_remote` runs one Ray task per model, so several models are evaluated side by side on a
  cluster; :func:`evaluate` is that for one model, the call a pipeline stage makes.

Task specs (``evaluate.benchmarks.tasks``): an lm-eval task or group name, ``bigbench:<path>`` (a BIG-bench JSON
task, ``.json`` or ``.json.gz``), or ``preset:<name>`` (:data:`PRESETS`, each task with its own few-shot count).
Tasks from directories of custom YAMLs are named like any other, their directories given in ``include_path``.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import BenchmarksConfig
from ..errors import InputError

log = logging.getLogger("alignment")


class BenchmarkError(InputError, ValueError):
    """A benchmark task or setting that cannot be used: names the file, example, field or task."""


@dataclass(frozen=True)
class PresetTask:
    task: str  # the lm-eval task (or group) name
    num_fewshot: int
    metric: str  # the number the preset reports, as lm-eval names it: metric, or "metric,filter"


# The Open LLM Leaderboard v1 settings (ARC-challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot
# acc, TruthfulQA mc2 0-shot, Winogrande 5-shot acc, GSM8K 5-shot exact match), no chat template. MMLU: lm-eval's
# `mmlu` group weights subjects by size; the leaderboard averaged the 57 subjects equally (both are returned:
# the group and every subject). GSM8K: the strict "#### <number>" answer, as the leaderboard's harness extracted it.
OPEN_LLM_V1 = (
    PresetTask("arc_challenge", 25, "acc_norm"),
    PresetTask("hellaswag", 10, "acc_norm"),
    PresetTask("mmlu", 5, "acc"),
    PresetTask("truthfulqa_mc2", 0, "acc"),
    PresetTask("winogrande", 5, "acc"),
    PresetTask("gsm8k", 5, "exact_match,strict-match"),
)
# OpenBookQA as lm-eval's own task is set up: 0-shot, the length-normalised choice log-likelihood.
OPENBOOKQA = (PresetTask("openbookqa", 0, "acc_norm"),)
# The BIG-bench Hard subtasks the DPO-variants study reports, as lm-eval's multiple-choice versions (the Open LLM
# Leaderboard v2's): 3-shot with BBH's own exemplars, scored by the choices' log-likelihoods like BIG-bench's
# multiple_choice_grade. (lm-eval's bbh_fewshot_* are the generative versions, exact match on a generated answer.)
BBH = (
    PresetTask("leaderboard_bbh_causal_judgement", 3, "acc_norm"),
    PresetTask("leaderboard_bbh_sports_understanding", 3, "acc_norm"),
    PresetTask("leaderboard_bbh_formal_fallacies", 3, "acc_norm"),
)
PRESETS: dict[str, tuple[PresetTask, ...]] = {
    "open_llm_v1": OPEN_LLM_V1,
    "openbookqa": OPENBOOKQA,
    "bbh": BBH,
    "alignment_studies": OPEN_LLM_V1 + OPENBOOKQA + BBH,
}

BIGBENCH = "bigbench:"
PRESET = "preset:"
# Part of every converted task's cache key: a change to the conversion writes new files instead of reusing old ones.
BIGBENCH_FORMAT = 1
# BIG-bench's defaults for the optional formatting fields of a JSON task (docs/doc.md in google/BIG-bench).
BIGBENCH_DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
                     "choice_prefix": "\n  choice: ", "append_choices_to_input": True,
                     "few_shot_example_separator": "\n"}


# ----------------------------------------------------------------------------------------------- BIG-bench JSON


def _read_bigbench(path: Path) -> tuple[bytes, dict]:
    if not path.is_file():
        raise BenchmarkError(f"{path}: BIG-bench task file not found")
    try:
        raw = path.read_bytes()
        text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        data = json.loads(text)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{path}: not a BIG-bench JSON task (not valid gzip or JSON: {e})") from None
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: not a BIG-bench JSON task: the top level is a {type(data).__name__}, not an "
                             "object with 'examples'")
    return text, data


def _bigbench_rows(path: Path, data: dict) -> tuple[list[dict], dict]:
    """The task's examples as lm-eval documents, and its formatting fields (BIG-bench's defaults filled in)."""
    fmt = dict(BIGBENCH_DEFAULTS)
    for key, default in BIGBENCH_DEFAULTS.items():
        if key in data:
            if not isinstance(data[key], type(default)):
                raise BenchmarkError(f"{path}: field {key!r} must be a {type(default).__name__}, got "
                                     f"{type(data[key]).__name__}")
            fmt[key] = data[key]
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise BenchmarkError(f"{path}: field 'examples' must be a non-empty list of examples"
                             + ("" if "examples" in data else " (missing)"))
    rows = []
    for i, ex in enumerate(examples):
        where = f"{path}: example {i}"
        if not isinstance(ex, dict):
            raise BenchmarkError(f"{where}: must be an object with 'input' and 'target_scores', got "
                                 f"{type(ex).__name__}")
        if not isinstance(ex.get("input"), str):
            raise BenchmarkError(f"{where}: field 'input' must be a string"
                                 + ("" if "input" in ex else " (missing)"))
        scores = ex.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            raise BenchmarkError(f"{where}: field 'target_scores' must map at least two choices to 0 or 1"
                                 + ("" if "target_scores" in ex else " (missing: only multiple-choice tasks run "
                                    "here)"))
        # lm-eval's acc is BIG-bench's multiple_choice_grade (the score of the most likely choice) only when
        # every score is 0 or 1; partial credit would need the grade itself.
        bad = [c for c, s in scores.items() if s not in (0, 1) or isinstance(s, bool)]
        if bad:
            raise BenchmarkError(f"{where}: field 'target_scores' gives {bad[0]!r} the score {scores[bad[0]]!r}; "
                                 "only 0 and 1 are supported (multiple_choice_grade without partial credit)")
        choices = list(scores)
        gold = [j for j, c in enumerate(choices) if scores[c] == 1]
        if not gold:
            raise BenchmarkError(f"{where}: field 'target_scores' has no choice scored 1")
        text = ex["input"]
        if fmt["append_choices_to_input"]:
            # The listed choices in a fixed seeded order, as lm-eval 0.3's BIG-bench port listed them
            # (numpy RandomState(42) over the sorted choices): BIG-bench's own draw is not seeded per example.
            import numpy as np

            shown = np.random.RandomState(42).permutation(sorted(choices))
            text += fmt["choice_prefix"] + fmt["choice_prefix"].join(str(c) for c in shown)
        rows.append({"input": fmt["example_input_prefix"] + text + fmt["example_output_prefix"],
                     "choices": choices, "gold": gold, "answer": choices[gold[0]]})
    return rows, fmt


def _task_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".json"):
        name = name.removesuffix(suffix)
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "task"


def bigbench_task(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """A BIG-bench JSON task (``{examples: [{input, target_scores: {choice: 0|1}}], ...}``, gzip too) as an
    lm-eval multiple-choice task: ``(task name, include dir)``, the directory to give lm-eval's TaskManager.

    Written once, content-addressed by the file's bytes, under ``<cache_dir>/lm_eval_tasks/`` (default:
    ``models.cache_dir()``, which ``ALIGNMENT_CACHE`` moves). The task is named ``bigbench_json_<file stem>``.

    The prompt follows BIG-bench's JSON-task conventions: ``task_prefix`` once at the start (lm-eval's
    ``description``), then each shot as ``example_input_prefix + input [+ choices] + example_output_prefix +
    answer`` joined by ``few_shot_example_separator``, then the question the same way without its answer; the
    choice is scored as the continuation right after the output prefix (no extra delimiter). Shots are drawn
    from the task's other examples (lm-eval's sampler, seeded), as BIG-bench draws them; a shot's answer is its
    first choice scored 1. The metric is lm-eval's ``acc``: the most likely choice (summed log-likelihood, no
    length normalisation) is one scored 1, which is BIG-bench's ``multiple_choice_grade`` for 0/1 scores.
    A malformed file or example is a :class:`BenchmarkError` naming the file, example index and field.
    """
    from .. import models

    src = Path(path).expanduser().resolve()
    text, data = _read_bigbench(src)
    rows, fmt = _bigbench_rows(src, data)
    name = f"bigbench_json_{_task_stem(src)}"
    key = hashlib.sha256(f"bigbench-format-{BIGBENCH_FORMAT}\n{name}\n".encode() + text).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else models.cache_dir()
    target = root / "lm_eval_tasks" / f"{name}-{key}"
    if (target / f"{name}.yaml").is_file():
        return name, target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with open(tmp / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        task = {
            "task": name,
            "dataset_path": "json",
            # The final path: the YAML is read after the rename below. Datasets' own cache stays beside it.
            "dataset_kwargs": {"data_files": {"test": str(target / f"{name}.jsonl")},
                               "cache_dir": str(target / "datasets")},
            "test_split": "test",
            "fewshot_split": "test",
            "output_type": "multiple_choice",
            "description": fmt["task_prefix"],
            "doc_to_text": "input",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": "",
            "fewshot_delimiter": fmt["few_shot_example_separator"],
            "fewshot_config": {"sampler": "default", "doc_to_target": "answer"},
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": BIGBENCH_FORMAT, "source": str(src), "bigbench_name": data.get("name"),
                         "num_examples": len(rows)},
        }
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True, width=1 << 20))
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote the same content first: keep its copy
            if not (target / f"{name}.yaml").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return name, target


# ----------------------------------------------------------------------------------------------- lm-eval runs


@dataclass(frozen=True)
class TaskRun:
    name: str  # the lm-eval task or group name
    spec: str  # as the config gave it
    num_fewshot: int | None  # None: the task's own (its YAML's, else 0)
    metric: str | None  # the preset's headline metric
    include: Path | None  # the directory that defines it, for BIG-bench tasks


def resolve_tasks(tasks: list[str], settings: BenchmarksConfig, cache_dir: str | os.PathLike | None = None
                  ) -> list[TaskRun]:
    """Task specs as :class:`TaskRun` s: presets expanded, BIG-bench files converted (cached).
    ``settings.num_fewshot``, when set, is every task's few-shot count, the presets' included."""
    if not tasks:
        raise BenchmarkError("evaluate.benchmarks.tasks is empty: name lm-eval tasks, bigbench:<path> or "
                             f"preset:<{'|'.join(PRESETS)}>")
    runs: list[TaskRun] = []
    for spec in tasks:
        if spec.startswith(PRESET):
            preset = spec[len(PRESET):]
            if preset not in PRESETS:
                raise BenchmarkError(f"evaluate.benchmarks.tasks: unknown preset {preset!r}; known: "
                                     f"{', '.join(PRESETS)}")
            runs += [TaskRun(p.task, spec, p.num_fewshot, p.metric, None) for p in PRESETS[preset]]
        elif spec.startswith(BIGBENCH):
            name, include = bigbench_task(spec[len(BIGBENCH):], cache_dir)
            runs.append(TaskRun(name, spec, None, "acc", include))
        else:
            runs.append(TaskRun(spec, spec, None, None, None))
    if settings.num_fewshot is not None:
        runs = [TaskRun(r.name, r.spec, settings.num_fewshot, r.metric, r.include) for r in runs]
    seen: dict[str, TaskRun] = {}
    for r in runs:
        first = seen.setdefault(r.name, r)
        if (first.include, first.num_fewshot) != (r.include, r.num_fewshot):
            raise BenchmarkError(f"evaluate.benchmarks.tasks: task {r.name!r} comes from both {first.spec!r} and "
                                 f"{r.spec!r}, as different files or few-shot counts; keep one")
    return list(seen.values())


def task_manager(include: list[str | os.PathLike], names: list[str]):
    """lm-eval's TaskManager over ``include``; its own task registry too only when a name needs it (indexing
    lm-eval's thousands of YAMLs is slow). An unknown name is a :class:`BenchmarkError` with near names."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser().resolve()) for p in include]
    for p in paths:
        if not Path(p).is_dir():
            raise BenchmarkError(f"evaluate.benchmarks.include_path: {p} is not a directory of lm-eval task YAMLs")
    tm = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if tm is None or any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=paths or None)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        near = difflib.get_close_matches(missing[0], tm.all_tasks, n=5)
        raise BenchmarkError(f"evaluate.benchmarks.tasks: unknown lm-eval task {missing[0]!r}"
                             + (f"; near: {', '.join(near)}" if near else "")
                             + (f" (include_path: {', '.join(paths)})" if paths else ""))
    return tm


def model_args(model_path: str, settings: BenchmarksConfig) -> dict[str, Any]:
    """lm-eval's ``model_args`` for ``model_path`` as ``settings`` say (``settings.model_args`` over these)."""
    if settings.model_type == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise BenchmarkError("evaluate.benchmarks.model_type: vllm needs the vllm extra (pip install "
                                 "'alignment[vllm]', GPU machines only)")
        # lm-eval's vLLM data parallelism starts its own Ray tasks and calls ray.shutdown() when done, which
        # would end the Ray session this runs in: models run side by side through benchmark_remote instead.
        if int(settings.model_args.get("data_parallel_size", 1)) > 1:
            raise BenchmarkError("evaluate.benchmarks.model_args.data_parallel_size: lm-eval's vLLM data-parallel "
                                 "mode shuts Ray down; run models in parallel with one Ray task each instead")
    return {"pretrained": model_path, "dtype": settings.dtype, **settings.model_args}


def _metrics(entry: dict) -> dict[str, dict[str, Any]]:
    """lm-eval's ``"acc,none": x, "acc_stderr,none": s`` as ``{"acc": {"value": x, "stderr": s}}`` (a filter
    other than none stays in the name: ``exact_match,strict-match``). A stderr lm-eval did not compute is None."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        stderr = entry.get(f"{metric}_stderr,{filt}")
        name = metric if filt == "none" else key
        out[name] = {"value": value, "stderr": stderr if isinstance(stderr, int | float) else None}
    return out


def run_lm_eval(model_path: str, tasks: list[str], settings: BenchmarksConfig,
                cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on one model, in this process.

    ``tasks``: specs as in ``evaluate.benchmarks.tasks``. Tasks are run in groups of equal few-shot count (one
    ``simple_evaluate`` each, the model loaded once). Returns ``{"model", "settings", "tasks": {name: {"metrics":
    {metric: {"value", "stderr"}}, "settings": {...}, "spec", "metric", "samples", "higher_is_better"}}}``: every
    task's numbers with the settings they were computed under (num_fewshot as lm-eval used it, limit, chat
    template, few-shot as multi-turn, dtype, batch size, seeds, lm-eval's version), groups included.
    """
    import importlib.metadata

    import lm_eval
    from lm_eval.api.registry import get_model

    from .. import models

    path = models.resolve(model_path)
    runs = resolve_tasks(tasks, settings, cache_dir)
    include = [*settings.include_path, *{str(r.include): None for r in runs if r.include}]
    tm = task_manager(include, [r.name for r in runs])
    args = model_args(path, settings)
    device = settings.device or ("cuda" if settings.num_gpus > 0 else "cpu")
    lm = get_model(settings.model_type).create_from_arg_obj(
        args, {"batch_size": settings.batch_size, "device": device if settings.model_type == "hf" else None})
    common = {"limit": settings.limit, "apply_chat_template": settings.apply_chat_template,
              "fewshot_as_multiturn": settings.fewshot_as_multiturn, "system_instruction": settings.system_instruction}
    recorded = {"model_type": settings.model_type, "model_args": {k: v for k, v in args.items() if k != "pretrained"},
                "dtype": settings.dtype, "batch_size": settings.batch_size, "device": device,
                "lm_eval": importlib.metadata.version("lm_eval"), **common}
    groups: dict[int | None, list[TaskRun]] = {}
    for r in runs:
        groups.setdefault(r.num_fewshot, []).append(r)
    out: dict[str, Any] = {}
    for shots, group in groups.items():
        log.info("lm-eval: %s on %s, %s-shot", path, ", ".join(r.name for r in group),
                 "task default" if shots is None else shots)
        res = lm_eval.simple_evaluate(model=lm, tasks=[r.name for r in group], num_fewshot=shots,
                                      batch_size=settings.batch_size, device=device, task_manager=tm,
                                      log_samples=False, **common)
        # lm-eval's own seeds (its defaults: fixed), the few-shot draw's among them.
        recorded.update({k: res["config"].get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")})
        by_name = {r.name: r for r in group}
        for name, entry in res["results"].items():
            run = by_name.get(name)
            out[name] = {
                "metrics": _metrics(entry),
                "settings": {**recorded, "num_fewshot": res.get("n-shot", {}).get(name, shots)},
                "spec": run.spec if run else None,  # None: a subtask of a group named in the specs
                "metric": run.metric if run else None,
                "group": name in res.get("groups", {}),
                "samples": res.get("n-samples", {}).get(name),
                "higher_is_better": res.get("higher_is_better", {}).get(name),
            }
    return {"model": path, "settings": recorded, "tasks": out}


def _remote_run(model_path: str, section: dict, cache_dir: str | None) -> dict[str, Any]:
    import torch

    settings = BenchmarksConfig.model_validate(section)
    torch.set_num_threads(max(1, math.ceil(settings.num_cpus)))
    return run_lm_eval(model_path, settings.tasks, settings, cache_dir)


def benchmark_remote(model_paths: list[str], section: BenchmarksConfig,
                     cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """:func:`run_lm_eval` of ``section.tasks`` on each model, one Ray task per model (``section.num_cpus``,
    ``num_gpus``): on a cluster the models run side by side. ``{model_path: results}``, in the given order.
    Ray must be initialised (``ray_env.ensure_ray``)."""
    import ray

    from ..errors import unwrap

    # Paths made absolute here: a Ray worker need not start in this process's directory.
    section = section.model_copy(update={
        "include_path": [str(Path(p).expanduser().resolve()) for p in section.include_path],
        "tasks": [f"{BIGBENCH}{Path(t[len(BIGBENCH):]).expanduser().resolve()}" if t.startswith(BIGBENCH) else t
                  for t in section.tasks]})
    located = [str(Path(m).resolve()) if Path(m).exists() else m for m in model_paths]
    # Converted here, once, so the Ray tasks do not race to write the same files (and a bad file fails fast).
    resolve_tasks(section.tasks, section, cache_dir)
    task = ray.remote(_remote_run).options(
        num_cpus=section.num_cpus, num_gpus=section.num_gpus or None,
        # Inside a Ray Tune trial a task would otherwise be placed in the trial's own small bundle.
        scheduling_strategy="DEFAULT", name="lm_eval")
    cache = None if cache_dir is None else str(Path(cache_dir).resolve())
    refs = [task.remote(m, section.model_dump(), cache) for m in located]
    try:
        results = ray.get(refs)
    except Exception as e:
        known = unwrap(e)  # the project's own error raised in the task, without Ray's wrapping
        if known is not e:
            raise known from None
        raise
    return dict(zip(model_paths, results))


def evaluate(model_path: str, section: BenchmarksConfig, cache_dir: str | os.PathLike | None = None
             ) -> dict[str, Any]:
    """``section.tasks`` on one model (a path, registry name or hub id), in a Ray task with the section's
    resources: what a pipeline stage calls. See :func:`run_lm_eval` for what it returns."""
    return benchmark_remote([model_path], section, cache_dir)[model_path]
