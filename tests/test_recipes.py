"""The study recipes of configs/recipes/<study>/: each has a README (the published numbers it aims at, its cost in GPU
hours, how to run it), a full YAML and a tiny one; the tiny one runs end to end on local Ray with tiny models, on the
real data of ../shared/data, and does what its study is about."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, chat_completion, make_tiny_model, shared

from alignment import pipeline
from alignment.config import load_config

RECIPES = ROOT / "configs" / "recipes"
STUDIES = ("deita", "dpo_variants", "long_is_more")
METHODS = ("dpo", "ipo", "kto", "cpo")


def manifests(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / stage).glob("*/manifest.json"))]


def recipe_dirs() -> list[Path]:
    return sorted(p for p in RECIPES.iterdir() if p.is_dir() and p.name != "templates")


def load_study_driver():
    """configs/recipes/long_is_more/study.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("long_is_more_study", RECIPES / "long_is_more" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ the recipes


def test_the_three_studies_are_the_recipes():
    assert [p.name for p in recipe_dirs()] == sorted(STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_a_recipe_has_a_readme_with_its_numbers_and_cost_a_full_yaml_and_a_tiny_one(study):
    d = RECIPES / study
    full = sorted(p.name for p in d.glob("*.yaml") if not p.name.startswith("tiny"))
    assert (d / "tiny.yaml").is_file() and full, f"{d}: a full YAML and tiny.yaml"
    readme = (d / "README.md").read_text()
    # The cost: a number of GPU hours and what it rests on.
    assert re.search(r"\b\d[\d,.]*(-\d[\d,.]*)?\s+([\w-]+\s+)?GPU[- ]hours", readme), f"{study}: no GPU hours"
    assert "## Cost" in readme and "basis" in readme.lower()
    # The published numbers it aims at, with where they are published.
    published = readme.split("## Published numbers", 1)
    assert len(published) == 2, f"{study}: no 'Published numbers' section"
    section = published[1].split("\n## ", 1)[0]
    assert re.search(r"\b\d+\.\d+\b", section) and re.search(r"Table|Figure|README|abstract", section)
    # How to run it, locally and on a cluster, and every YAML of the directory named.
    assert "ray job submit" in readme and "cluster/aws.yaml" in readme and "## Reading the report" in readme
    for name in [*full, "tiny.yaml"]:
        assert name in readme, f"{study}/README.md does not name {name}"


def test_the_documented_variants_of_the_full_recipes_validate():
    """The overrides the READMEs give: the three scenarios of dpo_variants, the selections of long_is_more."""
    for scenario in (["pref.start_from=base"], ["pref.start_from=instruct", "model.chat_template=null"]):
        for name in ("mistral_7b.yaml", "tiny.yaml"):
            cfg = load_config(RECIPES / "dpo_variants" / name, [*scenario, "run_dir=/tmp/x"])
            assert {p["method"] for p in cfg.search_grid()} == set(METHODS)
    study = load_study_driver()
    for name in ("llama2_7b.yaml", "tiny.yaml"):
        for extra in study.strategies([1, 2]).values():
            load_config(RECIPES / "long_is_more" / name, extra)
    assert set(study.strategies([1, 2])) == {"longest", "random-seed1", "random-seed2", "quality", "diversity"}


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_suite_of_a_recipe_resolves(path):
    """Each evaluate suite's judge (the judge section with the suite's keys over it) is valid as the suite runs it."""
    cfg = load_config(path)
    for name in cfg.evaluate.suites:
        assert cfg.suite(name).judge.protocol == cfg.suite_judge(name).protocol


# ------------------------------------------------------------------------------------------------ tiny runs


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory) -> Path:
    """A second tiny random model: the instruction-tuned start of scenario 3."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-instruct") / "instruct", seed=1)


def _endpoint_judge(body: dict) -> dict:
    """The fake endpoint as judge and rater: an MT-Bench rating, AlpacaEval's first-token log-probabilities, two
    pairwise scores, or (the rater) a 1-5 rating that depends on the response's length."""
    text = "\n".join(m["content"] for m in body["messages"])
    if body["model"] == "rater":
        response = text.split("[Response]\n", 1)[1].rsplit("\n\nReply with", 1)[0]
        return chat_completion(str(1 + len(response) % 5))
    if body.get("logprobs"):
        return chat_completion("m", top_logprobs=[{"token": "m", "logprob": -0.3}, {"token": "M", "logprob": -1.4}])
    if "[[rating]]" in text:
        return chat_completion("Fine. Rating: [[6]]")
    return chat_completion("8 3\nthe first is better")


ENDPOINT_JUDGE = ["judge.backend=openai", "judge.model=judge", "judge.api_base_env=TEST_JUDGE_URL",
                  "judge.api_key_env=TEST_JUDGE_KEY"]
ENDPOINT_RATER = ["select.rating.backend=openai", "select.rating.model=rater",
                  "select.rating.api_base_env=TEST_JUDGE_URL", "select.rating.api_key_env=TEST_JUDGE_KEY"]


@pytest.mark.integration
def test_deita_tiny_selects_k_rows_through_the_repr_filter_and_dpo_starts_from_an_intermediate_sft_step(
        ray_local, tmp_path, tiny_model):
    """tiny.yaml with a tiny random model as every model; without its MT-Bench suite at every point (the search's
    metric is the held-out margin; the suite's answers and judge stages add about three minutes here, and the Long Is
    More test runs an MT-Bench suite end to end)."""
    shared("sft", "evol_instruct_1k.json")
    t = str(tiny_model)
    cfg = load_config(RECIPES / "deita" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"model.base={t}", f"select.deita.complexity_model={t}",
        f"select.deita.quality_model={t}", f"judge.model={t}", "search.suites=[]"])
    out = pipeline.run_experiment(cfg)
    run = Path(cfg.run_dir)

    # Selection: Deita's evol score ranks the pool, the repr filter keeps k rows in that order.
    (sel,) = manifests(run, "select")
    assert sel["config"]["scorers"] == ["deita"] and sel["config"]["selector"] == "repr_filter"
    assert sel["config"]["tau"] == 0.9 and sel["counts"]["rows_selected"] == cfg.select.k == 8
    scan = sel["counts"]["repr_filter"]
    assert scan["kept"] == 8 and scan["scanned"] == scan["kept"] + scan["rejected_as_similar"]
    ranked = sorted(pq.read_table(sel["outputs"]["scored"]).to_pylist(), key=lambda r: (-r["score"], r["id"]))
    assert all(r["score"] == r["score_deita_evol"] is not None for r in ranked)
    selected = sorted(pq.read_table(sel["outputs"]["selected"]).to_pylist(), key=lambda r: r["rank"])
    top = [r["id"] for r in ranked[:scan["scanned"]]]
    assert [r["id"] for r in selected] == [i for i in top if i in {r["id"] for r in selected}]  # in score order
    assert selected[0]["id"] == ranked[0]["id"]  # the best-scored row is always kept

    # SFT saved both steps; DPO started from each, the first an intermediate one (ASHA walked them in order).
    (sft,) = manifests(run, "sft")
    ckpts = {c["step"]: c["path"] for c in sft["outputs"]["checkpoints"]}
    assert sorted(ckpts) == [2, 4]
    starts = {p["outputs"]["start"]["sft_step"]: p["outputs"]["start"] for p in manifests(run, "pref")}
    assert sorted(starts) == [2, 4] and starts[2]["checkpoint"] == ckpts[2] and 2 < cfg.sft.max_steps
    rows = [r for r in out["results"] if not r.get("baseline")]
    assert [r["sft_step"] for r in rows] == [2, 4] and all(r.get("error") is None for r in rows)
    assert all(r["metric"] == r["pref_margin"] is not None and r["heldout_pairs"] == 4 for r in rows)
    assert all("sft_metric" in r for r in rows)  # the SFT checkpoint alone, beside each point
    assert not (run / "generate").exists() and not (run / "evaluate").exists()  # no judge: the metric needs none
    assert Path(out["report"]["markdown"]).is_file()


# Each method trained in one scenario (IPO after SFT; KTO and CPO, which the study finds can skip SFT, from the
# pretrained and the instruction-tuned model; DPO after SFT is the Deita recipe's test): tiny.yaml's grid runs all four
# in each, but every training run pays Ray Train's start-up (15-90 s, by the machine), and twelve of them would take a
# slow machine's test suite half an hour.
SCENARIO_METHODS = {"sft": ["ipo"], "base": ["kto"], "instruct": ["cpo"]}


@pytest.mark.integration
@pytest.mark.parametrize("scenario", list(SCENARIO_METHODS))
def test_dpo_variants_tiny_trains_each_method_in_its_scenario(ray_local, tmp_path, tiny_model, tiny_instruct,
                                                              scenario):
    shared("preferences", "hh_rlhf_harmless_base_test.jsonl.gz")
    t, methods = str(tiny_model), SCENARIO_METHODS[scenario]
    cfg = load_config(RECIPES / "dpo_variants" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"model.base={t}", f"model.instruct={tiny_instruct}", f"judge.model={t}",
        f"pref.start_from={scenario}", f"search.method=[{','.join(methods)}]"])
    out = pipeline.run_experiment(cfg)
    run = Path(cfg.run_dir)

    rows = out["results"]
    assert sorted((r["method"], r["num_pairs"]) for r in rows) == [(m, 8) for m in sorted(methods)]
    assert all(r.get("error") is None and r["start_from"] == scenario and r["metric"] is not None for r in rows)
    prefs = {p["config"]["method"]: p for p in manifests(run, "pref")}
    assert sorted(prefs) == sorted(methods)
    for method, p in prefs.items():
        start = p["outputs"]["start"]
        if scenario == "sft":
            assert start["from"] == "sft" and start["sft_step"] == cfg.sft.max_steps
        else:
            assert start == {"from": scenario, "model": t if scenario == "base" else str(tiny_instruct)}
        assert p["metrics"]["final"]["step"] == cfg.pref.max_steps and p["counts"]["pairs_eval"] == 4
        assert p["metrics"]["heldout"]["heldout_pairs"] == 4 and p["counts"]["pairs_used"] == 8, method
        assert p["metrics"]["params"]["beta"] == 0.1 and p["label"].endswith(f"-{method}-n8"), method
    # Scenarios 2 and 3 skip selection and SFT; scenario 1 ran them once for every method.
    assert len(manifests(run, "sft")) == (1 if scenario == "sft" else 0)
    assert not manifests(run, "judge")  # the held-out margin needs no judge stage


@pytest.mark.integration
def test_long_is_more_tiny_trains_the_selections_and_judges_them_against_the_full_data_model(
        ray_local, tmp_path, tiny_model, fake_endpoint):
    """study.py on tiny.yaml: the longest selection and the full-data model trained and judged on every suite (--only,
    to keep the test short: a training run costs about a minute here); then the other selections of the study
    (random with two seeds, quality, diversity) made in the same run directory, as study.py makes them."""
    pool_file = shared("sft", "alpagasus_alpaca_1k.json")
    fake_endpoint.reply = _endpoint_judge
    study = load_study_driver()
    config = RECIPES / "long_is_more" / "tiny.yaml"
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.base={tiny_model}", *ENDPOINT_JUDGE, *ENDPOINT_RATER]
    summary = study.run_study(config, overrides=overrides, only=["longest"])
    models = summary["models"]
    assert list(models) == ["longest", "full"]
    run = Path(summary["run_dir"])

    # Each selection fine-tuned (SFT only: no preference tuning), then judged against the full-data model.
    assert len(manifests(run, "sft")) == 2 and not (run / "pref").exists()
    for name, m in models.items():
        assert Path(m["checkpoint"], "model.safetensors").is_file() and m["sft_steps"] == 2, name
        assert m["mt_bench"] == 6.0 and m["alpaca_win_rate"] is not None, name  # the endpoint's grades
        if name == "full":
            assert m["pairwise"] == {} and m["rows_selected"] > 100
            continue
        assert m["rows_selected"] == 8
        v = m["pairwise"]["vicuna"]
        assert v["valid"] + v["invalid"] == 2 and v["win"] + v["tie"] + v["loss"] == v["valid"]
        assert m["pairwise_all"]["valid"] == v["valid"]
    results = json.loads((run / "evaluate" / "results.json").read_text())
    assert {n: s["baseline"] for n, s in results["suites"].items()} == {
        "vicuna": "full", "mt_bench": "full", "alpaca_eval": "gpt4_1106_preview"}
    assert set(results["suites"]["vicuna"]["models"]) == {"longest"}
    full_alpaca = json.loads((run / "full_model" / "evaluate" / "results.json").read_text())
    assert list(full_alpaca["suites"]) == ["alpaca_eval"] and list(full_alpaca["suites"]["alpaca_eval"]["models"]) == [
        "full"]
    text = Path(summary["written"]["markdown"]).read_text()
    assert "| longest | 8 | length |" in text and "| full | " in text

    # The other selections, as study.py makes them (the stages above are reused: same configs, same run directory).
    picked = {}
    for name, extra in {**study.strategies(None), "random-seed1": study.strategies([1])["random"]}.items():
        m = pipeline.select_stage(load_config(config, [*overrides, *extra]))
        rows = pq.read_table(m["outputs"]["selected"]).to_pylist()
        assert len(rows) == m["counts"]["rows_selected"] == 8, name
        picked[name] = (m, rows)
    # The longest: the k rows with the longest responses (in tokens) of the rows that fit; nothing longer left out.
    m, rows = picked["longest"]
    assert m["skipped"] and m["config"]["scorers"] == ["length"]
    pool = pq.read_table(m["outputs"]["scored"]).to_pylist()
    chosen = {r["id"] for r in rows}
    assert min(r["score_length"] for r in rows) >= max(r["score_length"] for r in pool if r["id"] not in chosen)
    # The random baseline: k rows per seed of the same pool, another sample for another seed.
    assert {r["id"] for r in picked["random"][1]} != {r["id"] for r in picked["random-seed1"][1]}
    assert {r["id"] for _, rs in picked.items() for r in rs[1]} <= {r["id"] for r in pool}
    # Quality: the rows the rater scores best (5); diversity: k-means over the model's mean hidden states.
    assert all(r["score_rating"] == 5 for r in picked["quality"][1])
    m, _ = picked["diversity"]
    assert m["config"]["selector"] == "kmeans" and m["config"]["clusters"] == 4
    # The full set: every row that fits, behind the same filter as the selections'.
    (full,) = [x for x in manifests(run, "select") if x["label"] != "k8"]
    assert full["counts"]["rows_selected"] == picked["longest"][0]["counts"]["rows_kept"] == len(pool)
    assert full["counts"]["rows_read"] == len(json.loads(pool_file.read_text()))
