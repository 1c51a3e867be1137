"""``alignment``: run an experiment, or one stage of it, from one YAML config.

Every stage command runs the stages it needs first; finished stages (same config and inputs) are skipped.
Overrides follow the config file: ``alignment run --config configs/quickstart.yaml sft.max_steps=20``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Any

from .methods import METHODS

STAGES = {
    "select": "score the instruction data and keep k rows (select.k, select.selector)",
    "sft": "supervised fine-tuning on the selected rows, keeping every checkpoint of sft.save_steps / sft.save_at",
    "pref": f"preference tuning (pref.method: {', '.join(METHODS)}; pref.loss_type: the method's TRL "
            "losses) from pref.start_from: the SFT checkpoint pref.sft_step, model.base or model.instruct",
    "generate": "answers of the trained model and of the baseline to the eval prompts",
    "judge": "the judge's verdicts on the trained model's answers against the baseline's, by judge.protocol "
             "(vicuna_pairwise: two 1-10 scores, in both orders)",
    "search": "Ray Tune grid over search.k x sft_step x method x num_pairs, each trial a full pipeline run",
    "report": "Markdown/HTML report with a plot, from the search results",
    "evaluate": "each of evaluate.models (checkpoints, registry names, hub ids; served endpoints; answers files) on "
                "the judged evaluate.suites (a prompt set, a judge protocol, a baseline) and the lm-eval "
                "evaluate.benchmarks (lm-eval tasks, BIG-bench JSON tasks, presets), each in its own stage "
                "directory, then evaluate/results.json and evaluate/report.md",
    "run": "the whole experiment: search (every stage per trial), then the report",
}


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    keep = ("stage", "label", "dir", "status", "skipped", "counts", "outputs")
    out = {k: manifest[k] for k in keep if k in manifest}
    if manifest.get("stage") == "judge" or manifest.get("stage", "").startswith("evaluate/"):
        out["metrics"] = manifest["metrics"]
    return out


def _stage(name: str, cfg) -> Any:
    from . import pipeline as p
    from .ray_env import ensure_ray

    p.preflight(cfg, name)  # a wrong path or model name fails here, in a second, before Ray starts
    ensure_ray(cfg.resources.ray_address, cfg.resources.num_cpus)
    if name == "select":
        return _summary(p.select_stage(cfg))
    if name == "sft":
        return _summary(p.sft_stage(cfg))
    if name == "pref":
        return _summary(p.pref_stage(cfg))
    if name == "generate":
        answers = p.generate_point(cfg)
        return [_summary(answers["target"]), _summary(answers["baseline"])]
    if name == "judge":
        return _summary(p.judge_point(cfg)["judge"])
    if name == "search":
        return p.run_search(cfg)
    if name == "report":
        return p.report_only(cfg)
    if name == "evaluate":
        return [_summary(m) for m in p.evaluate_models(cfg)]
    if name == "run":
        out = p.run_experiment(cfg)
        return {"report": out["report"], "results": out["results"]}
    raise SystemExit(f"unknown stage {name}")


def _models(args: argparse.Namespace) -> int:
    from . import models

    if args.models_cmd == "list":
        for name, (desc, _) in models.REGISTRY.items():
            target = models.cache_dir() / "models" / name
            state = "prepared" if (target / "config.json").is_file() else "not prepared"
            print(f"{name}\t{desc}\t{state}\t{target}")
        return 0
    path = models.prepare(args.name, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignment",
        description="Data-efficient alignment on Ray: select -> SFT -> preference tuning -> generate -> judge, "
        "searched over k, the SFT step, the method and the training-set size. Outputs and manifests go to run_dir; "
        "finished stages are skipped.",
        epilog="Exit codes: 0 done; 1 the run failed; 2 the config, the data or a model cannot be used (paths, "
        "globs and model names are checked before Ray starts). An error is one 'error:' line; -v adds its traceback.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in STAGES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text + ". Stages it needs run first.")
        sp.add_argument("--config", "-c", required=True, help="experiment YAML (see configs/quickstart.yaml)")
        sp.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="config overrides, values parsed as YAML (e.g. sft.max_steps=20 search.k=[64,128])")
    mp = sub.add_parser("models", help="prepare and list the named offline models")
    msub = mp.add_subparsers(dest="models_cmd", required=True)
    prep = msub.add_parser("prepare", help="build the named model's Hugging Face checkpoint in the cache (once)")
    prep.add_argument("name", help="registry name, e.g. smollm2-135m-instruct")
    prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    msub.add_parser("list", help="named models and where they are cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .errors import AlignmentError, unwrap

    try:
        if args.command == "models":
            return _models(args)
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        _print(_stage(args.command, cfg))
        return 0
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        known = unwrap(e)  # the project's own error inside one a Ray task, worker or trial wrapped
        if not isinstance(known, AlignmentError):
            raise  # a bug: it keeps its traceback
        if args.verbose:
            traceback.print_exception(e)
        print(f"error: {known}", file=sys.stderr)
        return known.exit_code


if __name__ == "__main__":
    sys.exit(main())
