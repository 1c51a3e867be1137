"""The search's space, its points and names, without Ray: what grid, random and Optuna are given and what a
trial's config means."""

from __future__ import annotations

import json

import pytest

from alignment import search
from alignment.config import ConfigError, load_config


def _cfg(*overrides: str):
    return load_config(None, ["sft.max_steps=6", "sft.save_at=[2,4]", "pref.eval_rows=4", "search.metric=pref_margin",
                              *overrides])


def test_the_grid_has_every_combination_and_asha_walks_the_steps_inside_a_trial():
    from ray.tune.search.variant_generator import generate_variants

    def count_variants(spec):
        return len(list(generate_variants(spec)))

    cfg = _cfg("search.k=[64,16]", "search.sft_step=[4,last,2]", "search.method=[dpo,ipo]")
    space = search.Space.of(cfg)
    assert space.k == (16, 64) and space.steps == (2, 4, 6)  # in order; 'last' is step 6
    assert count_variants(space.param_space("grid")) == 2 * 3 * 2 == len(cfg.search_grid())
    walked = search.Space.of(_cfg("search.k=[64,16]", "search.sft_step=[2,4,last]", "search.scheduler=asha"))
    assert "sft_step" not in walked.param_space("grid") and walked.walk
    assert count_variants(walked.param_space("grid")) == 2  # one trial per k, each walking steps 2, 4, 6


def test_random_and_optuna_spaces_sample_beta_log_uniformly_and_k_as_an_ordinal():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from ray.tune.search.sample import Categorical, Float

    cfg = _cfg("search.k=[100,1000,10000]", "search.sft_step=[2,4]", "search.method=[dpo,kto]",
               "search.beta=[0.5,0.01,0.1]", "search.algorithm=optuna", "search.num_samples=5")
    space = search.Space.of(cfg)
    rnd = space.param_space("random")
    assert isinstance(rnd["k"], Categorical) and isinstance(rnd["beta"], Float)
    assert (rnd["beta"].lower, rnd["beta"].upper) == (0.01, 0.5)
    ot = space.optuna_space()
    assert ot["k_index"] == IntDistribution(0, 2) and ot["sft_step_index"] == IntDistribution(0, 1)
    assert ot["beta"] == FloatDistribution(0.01, 0.5, log=True)
    assert ot["method"] == CategoricalDistribution(["dpo", "kto"])
    assert "num_pairs" not in ot  # one value: not searched
    point = space.point({"k_index": 2, "sft_step_index": 0, "method": "kto", "beta": 0.2})
    assert point == {"k": 10000, "sft_step": 2, "method": "kto", "num_pairs": None, "beta": 0.2}
    assert space.optuna_params(point) == {"k_index": 2, "sft_step_index": 0, "method": "kto", "beta": 0.2}
    assert space.optuna_params({**point, "k": 5000}) is None  # not a listed size
    assert space.optuna_params({**point, "beta": 0.9}) is None  # outside [0.01, 0.5]


def test_the_baseline_runs_every_k_and_step_at_the_configured_downstream_settings():
    cfg = _cfg("search.k=[16,64]", "search.sft_step=[2,4]", "search.method=[dpo,ipo]", "pref.method=ipo",
               "search.baseline_selection=random", "search.baseline_seeds=[1,2,3]", "select.scorers=[length]")
    base = search.Space.of(cfg).baseline(cfg)
    assert base.method == ("ipo",) and base.selection_seeds == (1, 2, 3)
    point = base.point({"k": 64, "sft_step": 4, "selection_seed": 2})
    assert point["selection"] == "random" and point["selection_seed"] == 2
    at = cfg.at(point)
    assert at.select.scorers == ["random"] and at.select.seed == 2 and at.select.k == 64
    assert cfg.at({**point, "selection": None}).select.scorers == ["length"]
    assert search.selection_name(cfg) == "length"


def test_the_experiment_name_is_stable_and_changes_with_what_the_search_runs():
    a = search.experiment_name(_cfg("name=my study"))
    assert a == search.experiment_name(_cfg("name=my study", "resources.max_concurrent_trials=4"))
    assert a.startswith("my-study-") and a != search.experiment_name(_cfg("name=my study", "search.k=[8,16]"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["search.num_samples=4"], "num_samples is for algorithm random or optuna"),
    (["search.warm_start=[runs/x]"], "warm_start informs Optuna"),
    (["search.scheduler=asha", "search.sft_step=[2]"], "list two or more"),
    (["search.scheduler=asha", "search.sft_step=[2,4]", "pref.start_from=base"], "no SFT step to walk"),
    (["search.beta=[0.1,0]"], "positive"),
    (["search.mlflow_tracking_uri=https://user:pw@mlflow.example"], "credentials in the URI"),
])
def test_search_settings_that_cannot_run_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_warm_start_gives_optuna_each_earlier_trials_best_step(tmp_path):
    cfg = _cfg("search.k=[16,64]", "search.sft_step=[2,4]", "search.scheduler=asha", "search.algorithm=optuna",
               "search.num_samples=2")
    rows = [{"trial_id": "a", "k": 16, "sft_step": 2, "method": "dpo", "num_pairs": None, "beta": None, "metric": 0.5},
            {"trial_id": "a", "k": 16, "sft_step": 4, "method": "dpo", "num_pairs": None, "beta": None, "metric": 0.7},
            {"trial_id": "b", "k": 64, "sft_step": 2, "method": "dpo", "num_pairs": None, "beta": None, "metric": None},
            {"trial_id": "c", "k": 32, "sft_step": 2, "method": "dpo", "num_pairs": None, "beta": None, "metric": 0.9},
            {"trial_id": "r", "k": 16, "sft_step": 2, "method": "dpo", "baseline": True, "metric": 2.0}]
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "results.json").write_text(json.dumps({"rows": rows}))
    points, rewards = search._earlier([str(tmp_path)], search.Space.of(cfg))
    assert points == [{"k_index": 0}] and rewards == [0.7]  # c: k=32 is not in this space; b: no metric
    with pytest.raises(ConfigError, match="no search results"):
        search._earlier([str(tmp_path / "nothing")], search.Space.of(cfg))
