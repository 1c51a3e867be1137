"""Config validation: unknown keys and bad values named with their file, overrides, cross-checks, credentials,
and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


SHIPPED = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.y*ml"))


def test_the_shipped_configs_are_found():
    # The glob below must not pass by finding nothing.
    assert {Path("quickstart.yaml"), Path("cluster_example.yaml")} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED, ids=str)
def test_shipped_configs_load(name):
    """Every YAML under configs/ (recipes included) validates, and its search has points."""
    cfg = load_config(ROOT / "configs" / name)
    points = cfg.search_grid()
    assert points and all(set(p) == {"k", "sft_step", "method", "num_pairs", "beta"} for p in points)


def test_unknown_key_names_the_key_and_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("sft:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "sft.max_stepz: unknown key" in str(e.value)


def test_bad_value_names_the_key(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("select:\n  k: -3\npref:\n  loss_type: dpo_plus\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "select.k" in msg and "pref.loss_type" in msg and "unknown loss_type 'dpo_plus'" in msg


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("sft:\n  max_steps: 10\n  save_steps: 5\n")
    cfg = load_config(p, ["sft.max_steps=20", "search.k=[8,16]", "pref.sft_step=10"])
    assert cfg.sft.max_steps == 20 and cfg.search.k == [8, 16] and cfg.sft.checkpoint_steps() == [5, 10, 15, 20]
    with pytest.raises(ConfigError, match="sft.max_steps"):
        load_config(p, ["sft.max_steps=zero"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(p, ["sft.max_steps"])


def test_dpo_from_a_step_that_is_never_saved_is_an_error(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("sft:\n  max_steps: 10\n  save_at: [4, 10]\nsearch:\n  sft_step: [4, 7]\n")
    with pytest.raises(ConfigError, match="SFT step 7 is never saved"):
        load_config(p)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml")


@pytest.mark.parametrize("uri,which", [("s3://AKIA:hunter2@bucket/runs", "user:password@"),
                                       ("s3://bucket/runs?region=eu-west-1&secret_key=hunter2", "secret_key")])
def test_credentials_in_the_storage_uri_are_refused_and_never_echoed(uri, which):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"resources.storage_path={uri}", "run_dir=/tmp/x"])
    assert f"credentials in the URI ({which})" in str(e.value) and "hunter2" not in str(e.value)
    assert "resources.storage_path" in str(e.value)
    assert load_config(None, ["resources.storage_path=s3://bucket/runs?region=eu-west-1"]).resources.storage_path


def test_a_search_point_is_a_validated_copy_of_the_config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("run_dir: runs/x\nsft: {save_at: [2, 4], max_steps: 4}\nsearch: {k: [8, 16], sft_step: [2, 4], "
                    "method: [dpo, kto]}\npref: {beta: 0.2}\n")
    cfg = load_config(path)
    point = cfg.search_grid()[-1]
    at = cfg.at(point)
    assert point == {"k": 16, "sft_step": 4, "method": "kto", "num_pairs": None, "beta": 0.2}
    assert (at.select.k, at.pref.sft_step, at.pref.method, at.pref.num_pairs) == (16, 4, "kto", None)
    assert (cfg.select.k, cfg.pref.sft_step, cfg.pref.method) == (1000, "last", "dpo")  # a copy
    assert at.source == str(path) and at.run_dir == cfg.run_dir == str(Path("runs/x").resolve())
    assert at.pref.method_params()["beta"] == 0.2
    with pytest.raises(ConfigError, match=r"(?s)at the search point .*pref.sft_step: SFT step 3 is never saved"):
        cfg.at({**point, "sft_step": 3})


def test_a_held_out_metric_without_held_out_pairs_is_refused_before_the_search():
    from alignment import pipeline

    cfg = load_config(None, ["search.metric=pref_margin"])
    with pytest.raises(ConfigError, match=r"search.metric: pref_margin .*pref.eval_rows is 0"):
        pipeline.preflight(cfg, "run")
