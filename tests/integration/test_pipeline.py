"""Integration on local Ray with a tiny model: select -> sft -> pref -> generate -> judge, the search, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXAMPLES, tiny_experiment, write_config

from alignment import pipeline
from alignment.config import load_config

pytestmark = pytest.mark.integration


def manifests(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / stage).glob("*/manifest.json"))]


def test_one_point_then_the_search_and_report(ray_local, tmp_path, tiny_model):
    exp = tiny_experiment(tmp_path, tiny_model)
    exp["pref"]["eval_rows"] = 4  # held-out pairs: the search's metric is their preference accuracy,
    exp["pref"]["eval_at_checkpoints"] = False  # scored after training only (no eval loss per checkpoint)
    exp["search"]["metric"] = "pref_accuracy"
    exp["search"]["judge"] = True  # the judge at every point too, though the metric needs none
    # A suite of evaluate.suites on every point's trained model too, after its judge stage.
    exp["evaluate"] = {"suites": {"again": {"prompts": str(EXAMPLES / "eval_prompts.jsonl"), "max_prompts": 2}}}
    exp["search"]["suites"] = ["again"]
    cfg = load_config(write_config(tmp_path, exp))
    run = Path(cfg.run_dir)

    point = pipeline.run_point(cfg.at({"k": 8, "sft_step": 2, "method": "dpo", "num_pairs": 8}))
    assert point["prompts"] == 4 and point["judgements"] == 8
    assert point["valid"] + point["invalid"] == 4
    assert point["win"] + point["tie"] + point["loss"] == point["valid"]
    assert point["sft_eval_loss"] is None and "sft.eval_rows is 0" in point["sft_eval_loss_reason"]
    (suite,) = manifests(run, "evaluate/again")
    assert suite["metrics"]["prompts"] == 2 and point["again/win_rate"] == suite["metrics"]["win_rate"]
    assert suite["label"] == point["judge_dir"].rsplit("/", 1)[-1].rsplit("-", 1)[0]  # the point's label

    (sel,) = manifests(run, "select")
    c = sel["counts"]
    assert c["rows_read"] == c["rows_kept"] + c["rows_set_aside"] == 200 and c["rows_set_aside"] == 2
    (sft,) = manifests(run, "sft")
    assert [ck["step"] for ck in sft["outputs"]["checkpoints"]] == [2, 4]
    assert all(ck["train_loss"] is not None and Path(ck["path"], "model.safetensors").is_file()
               for ck in sft["outputs"]["checkpoints"])
    assert sft["metrics"]["strategy"] == "single-process" and sft["metrics"]["device"] == "cpu"
    (pref,) = manifests(run, "pref")
    assert pref["outputs"]["start"]["sft_step"] == 2
    assert pref["outputs"]["start"]["checkpoint"] == sft["outputs"]["checkpoints"][0]["path"]
    pc = pref["counts"]
    assert pc["pairs_eval"] == 4 and pref["metrics"]["heldout"]["heldout_pairs"] == 4
    assert all(ck["eval_loss"] is None for ck in pref["outputs"]["checkpoints"])
    assert pc["pairs_read"] == pc["pairs_kept"] + pc["pairs_set_aside"] == 33 and pc["pairs_used"] == 8
    gens = manifests(run, "generate")
    assert {g["label"] for g in gens} == {"baseline", f"k8-step2-dpo-n8-{Path(pref['dir']).name.rsplit('-', 1)[-1]}"}
    answers = [json.loads(line) for line in open(gens[0]["outputs"]["answers"])]
    assert len(answers) == 4 and all("answer" in a for a in answers)
    (jm,) = manifests(run, "judge")
    assert jm["metrics"]["rule"] == "sum"

    # The search: both trials share k=8, so one selection and one SFT run serve both.
    out = pipeline.run_experiment(cfg)
    assert [(r["k"], r["sft_step"]) for r in out["results"]] == [(8, 2), (8, 4)]
    assert all("error" not in r for r in out["results"])
    # Each trial scored its 4 held-out pairs in a Ray task (inside its Tune trial) and reports the accuracy.
    assert all(r["heldout_pairs"] == 4 and r["metric"] == r["pref_accuracy"] is not None for r in out["results"])
    # The SFT checkpoint alone, scored on the same held-out pairs against the base model (a stage per step).
    assert all(r["sft_metric"] is not None for r in out["results"]) and len(manifests(run, "sft_eval")) == 2
    # Each model's log-probabilities on them computed once: two trained, two SFT checkpoints (a preference run's
    # reference, then alone), the base model (the reference of both checkpoints alone).
    assert len(list((run / "logprobs").glob("*.npy"))) == 5
    assert len(manifests(run, "select")) == 1 and len(manifests(run, "sft")) == 1
    prefs = manifests(run, "pref")
    assert sorted(p["outputs"]["start"]["sft_step"] for p in prefs) == [2, 4]
    assert len(manifests(run, "generate")) == 3  # baseline once, two trained models
    assert len(manifests(run, "evaluate/again")) == 2 and len(manifests(run, "evaluate/again/answers")) == 3
    assert all(set(r) >= {"again/win_rate", "again/order_disagreement_rate"} for r in out["results"])
    report = Path(out["report"]["markdown"]).read_text()
    assert "aggregation rule **sum**" in report and "| 8 | 4 |" in report and "held-out pref. accuracy" in report
    assert Path(out["report"]["plot"]).stat().st_size > 1000 and Path(out["report"]["html"]).is_file()
    saved = json.loads((run / "search" / "results.json").read_text())
    assert len(saved["rows"]) == 2 and saved["counts"] == {"trials": 2, "rows": 2, "succeeded": 2, "failed": 0,
                                                            "stopped_early": 0, "baseline_trials": 0}
    assert saved["best"]["metric"] == max(r["metric"] for r in out["results"])
    rep = json.loads((run / "report" / "manifest.json").read_text())
    assert rep["status"] == "complete" and rep["counts"] == {"trials": 2, "rows": 2} and rep["inputs"]["search_results"]
    # `alignment report` rebuilds the report from the saved results alone
    (run / "report" / "report.md").unlink()
    assert Path(pipeline.report_only(cfg)["markdown"]).read_text() == report


def test_checkpoints_on_cloud_storage_are_where_every_later_stage_loads_them(ray_local, tmp_path, tiny_model,
                                                                             s3_storage):
    """resources.storage_path on S3 (an endpoint on the loopback): Ray Train persists the checkpoints there and
    reports them without the URI's scheme and options; the manifests hold them as URIs, and preference tuning
    and generation load them from there. Nothing is checkpointed in the run directory."""
    import pyarrow.fs as pafs

    uri, fs = s3_storage
    exp = tiny_experiment(tmp_path, tiny_model)
    exp["data"]["max_eval_prompts"] = 2
    exp["resources"]["storage_path"] = uri
    cfg = load_config(write_config(tmp_path, exp))
    run = Path(cfg.run_dir)
    point = pipeline.run_point(cfg.at({"k": 8, "sft_step": 2, "method": "dpo", "num_pairs": 8}))
    assert point["prompts"] == 2 and "error" not in point
    (sft,) = manifests(run, "sft")
    (pref,) = manifests(run, "pref")
    options = uri.split("?", 1)[1]
    paths = [c["path"] for c in sft["outputs"]["checkpoints"]] + [pref["outputs"]["model"]]
    assert all(p.startswith("s3://alignment-test/runs/") and p.endswith("?" + options) for p in paths), paths
    for p in paths:
        _, key = pafs.FileSystem.from_uri(p)
        assert fs.get_file_info(key + "/model.safetensors").type == pafs.FileType.File
    assert pref["outputs"]["start"]["checkpoint"] == paths[0]
    assert sft["outputs"]["tensorboard"].startswith("s3://alignment-test/runs/sft/")
    assert not list(run.glob("*/*/ray"))  # no checkpoint in the run directory
    gens = {g["label"]: g for g in manifests(run, "generate")}
    trained = next(g for label, g in gens.items() if label != "baseline")
    assert len([json.loads(line) for line in open(trained["outputs"]["answers"])]) == 2


def test_pref_on_the_model_itself_skips_sft(ray_local, tmp_path, tiny_model):
    exp = tiny_experiment(tmp_path, tiny_model)
    exp["pref"]["start_from"] = "base"
    exp["pref"]["sft_step"] = "last"
    exp["search"] = {}
    exp["data"]["preferences"] = [str(EXAMPLES / "preferences.jsonl")]
    cfg = load_config(write_config(tmp_path, exp))
    m = pipeline.pref_stage(cfg)
    assert m["outputs"]["start"] == {"from": "base", "model": str(tiny_model)}
    assert not (Path(cfg.run_dir) / "sft").exists() and not (Path(cfg.run_dir) / "select").exists()
    assert m["metrics"]["final"]["step"] == 2


def test_instruct_scenario_starts_from_the_instruct_weights_with_eval_loss_at_each_checkpoint(
        ray_local, tmp_path, tiny_model):
    from conftest import make_tiny_model
    from safetensors.torch import load_file

    instruct = make_tiny_model(tmp_path / "instruct", seed=1)
    exp = tiny_experiment(tmp_path, tiny_model)
    exp["model"]["instruct"] = str(instruct)
    exp["pref"].update(start_from="instruct", sft_step="last", method="kto", max_steps=4, save_at=[2],
                       learning_rate=1e-9, eval_rows=4, num_pairs=8)
    exp["search"] = {}
    exp["data"]["preferences"] = [str(EXAMPLES / "preferences.jsonl")]
    cfg = load_config(write_config(tmp_path, exp))
    m = pipeline.pref_stage(cfg)
    assert m["label"] == "instruct-kto-n8" and m["outputs"]["start"] == {"from": "instruct", "model": str(instruct)}
    assert m["counts"]["pairs_used"] == 8 and m["counts"]["pairs_eval"] == 4
    ckpts = m["outputs"]["checkpoints"]
    assert [c["step"] for c in ckpts] == [2, 4]
    assert all(c["train_loss"] is not None and c["eval_loss"] is not None for c in ckpts)
    history = [json.loads(line) for line in open(m["outputs"]["metrics_log"])]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert m["metrics"]["strategy"] == "single-process" and m["metrics"]["params"]["beta"] == 0.1
    # The held-out pairs' implicit-reward margin against the start: at a learning rate of 1e-9 the weights barely
    # moved, so the margins are about 0 (and finite), on the 4 held-out pairs.
    held = m["metrics"]["heldout"]
    assert held["heldout_pairs"] == 4 and held["heldout_unpaired"] == 0
    assert 0.0 <= held["pref_accuracy"] <= 1.0 and abs(held["pref_margin"]) < 1e-3
    # A learning rate of 1e-9 leaves the weights where they started: the instruct model's, not the base's.
    trained = load_file(Path(m["outputs"]["model"]) / "model.safetensors")
    start, other = load_file(instruct / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert (trained[name] - start[name]).abs().max() < 1e-5 < (trained[name] - other[name]).abs().max()


def test_cli_stage_and_errors(ray_local, tmp_path, tiny_model, capsys):
    from alignment.cli import main

    path = write_config(tmp_path, tiny_experiment(tmp_path, tiny_model))
    assert main(["select", "--config", str(path), "select.k=5", "select.length_unit=words"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage"] == "select" and out["counts"]["rows_selected"] == 5 and not out["skipped"]

    assert main(["select", "--config", str(path), "select.kk=5"]) == 2
    err = capsys.readouterr().err
    assert "select.kk: unknown key" in err and str(path) in err

    assert main(["select", "--config", str(path), "select.k=100000"]) == 1
    assert "larger than the pool: 198 valid, scored rows" in capsys.readouterr().err
