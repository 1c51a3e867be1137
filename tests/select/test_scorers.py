"""The scorers' and selectors' tables: every scorer adds exactly the columns it declares and gives a null score
with a reason (``score_error``) for a row it cannot score, never a default; invalid rows stay null; the config's
Literals name exactly the tables' entries."""

from __future__ import annotations

from typing import get_args

import pyarrow as pa
import pytest

from alignment import select
from alignment.config import SelectConfig
from alignment.select.rows import MESSAGES_TYPE
from alignment.select.scorers import Context, rating
from alignment.select.stage import rows_table


def conv(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


ROWS = [
    {"id": "short", "source": "f", "row": 0, "messages": conv("Name a river.", "The Nile.")},
    {"id": "long", "source": "f", "row": 1, "messages": conv("river " * 150, "It flows to the sea, mostly.")},
    {"id": "invalid", "source": "f", "row": 2, "messages": None, "field": "output", "error": "empty"},
]


def _score(name: str, s: SelectConfig, resolved: select.Resolved) -> tuple[pa.Table, pa.Table]:
    """The scorer ``name`` as the stage chains it, on a Ray Data dataset of ``ROWS``: (input, output)."""
    import ray

    table = rows_table(ROWS)
    ds = select.SCORERS[name].add(ray.data.from_arrow(table), s, Context(resolved, 1, tuple(table.column_names)))
    out = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    return table, out


# Each scorer with the select settings it is tried with (id -> (scorer, settings)).
CASES = {
    "length-words": ("length", {"length_unit": "words"}),
    "length-chars": ("length", {"length_unit": "chars"}),
    "length-tokens": ("length", {"length_unit": "tokens"}),
    "random": ("random", {}),
    # The long row's prompts are over max_length (about 230 tokens of the tiny model's; the short row's about 100).
    "deita": ("deita", {"deita": {"max_length": 200, "batch_size": 2}}),
    "rating-local": ("rating", {"rating": {"max_new_tokens": 4, "batch_size": 2}}),
}


def test_every_scorer_has_a_contract_case():
    assert {name for name, _ in CASES.values()} == set(select.SCORERS)


@pytest.mark.parametrize("name,settings", list(CASES.values()), ids=list(CASES))
def test_a_scorer_adds_its_declared_columns_and_a_reason_for_every_null(ray_local, tiny_model, name, settings):
    s = SelectConfig(scorers=[name], **settings)
    paths = {field: str(tiny_model) for field in select.needs(s)}  # the tokenizer, deita's and the rater's models
    table, out = _score(name, s, select.Resolved(files=(), format="auto", seed=0, **paths))
    scorer = select.SCORERS[name]
    assert set(out.column_names) - set(table.column_names) == set(scorer.columns)
    assert out.num_rows == table.num_rows
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows["invalid"][scorer.rank_column] is None  # an invalid row is never scored
    assert rows["invalid"].get("score_error") is None  # ... and its reason is its own (error), not a scorer's
    for r in (rows["short"], rows["long"]):
        if r[scorer.rank_column] is None:
            assert r["score_error"], r  # a null score always comes with its reason
        elif "score_error" in scorer.columns:
            assert r["score_error"] is None
    if name == "length":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_model)
        answer = "It flows to the sea, mostly."
        expected = {"words": 6, "chars": len(answer), "tokens": len(tok(answer, add_special_tokens=False)["input_ids"])}
        assert rows["long"]["score_length"] == expected[s.length_unit]
    elif name == "random":
        assert all(0 <= rows[i]["score_random"] < 1 for i in ("short", "long"))
    elif name == "deita":
        assert rows["short"]["score_deita_evol"] is not None and len(rows["short"]["deita_complexity"]) == 1
        assert rows["long"]["score_deita_evol"] is None
        assert "deita complexity, turn 1: prompt of" in rows["long"]["score_error"]
        assert "> max_length 200" in rows["long"]["score_error"]
    elif name == "rating":
        for r in (rows["short"], rows["long"]):
            assert r["score_rating"] in (1.0, 2.0, 3.0, 4.0, 5.0) or r["score_error"].startswith("unparsed rating")


def test_a_rating_answer_that_does_not_parse_is_a_null_with_its_reason():
    """What both rating backends do with the answers: the first digit 1-5, or a null and the reason."""
    table = pa.table({"id": ["a", "b", "c", "d"], "messages": pa.array([None] * 4, MESSAGES_TYPE),
                      "error": [None, None, "empty", None]})
    ok = [True, True, False, True]
    out = rating._rated(table, ok, ["4", "I would say: excellent", "x"], [None, None, "endpoint http 500: oops"])
    assert out["score_rating"].to_pylist() == [4.0, None, None, None]
    assert out["score_error"].to_pylist() == [None, "unparsed rating: 'I would say: excellent'", None,
                                              "endpoint http 500: oops"]


def test_the_configs_literals_name_the_tables_entries():
    (scorer,) = get_args(SelectConfig.model_fields["scorers"].annotation)
    assert sorted(get_args(scorer)) == sorted(select.SCORERS)
    assert sorted(get_args(SelectConfig.model_fields["selector"].annotation)) == sorted(select.SELECTORS)


def test_the_ranking_comes_from_the_table():
    assert select.ranking(SelectConfig(scorers=["deita", "length"])) == {"score_deita_evol": 1.0}
    s = SelectConfig(scorers=["length", "rating"], rank_by={"length": 0.5, "rating": 2.0})
    assert select.ranking(s) == {"score_length": 0.5, "score_rating": 2.0}


def test_a_model_a_scorer_needs_unresolved_is_an_error_naming_its_key(tmp_path):
    s = SelectConfig(scorers=["length", "deita"], max_tokens=100)
    assert select.needs(s) == {"tokenizer": "model.base", "complexity_model": "select.deita.complexity_model",
                               "quality_model": "select.deita.quality_model"}
    with pytest.raises(select.SelectError, match=r"model.base \(Resolved.tokenizer\).*select.deita.complexity_model"):
        select.run_select(s, select.Resolved(files=(), format="auto", seed=0), tmp_path)
    assert select.needs(SelectConfig(length_unit="words", rating={"backend": "openai"}, scorers=["rating"])) == {}


def test_preflight_checks_what_the_tables_say_is_needed(tmp_path, monkeypatch):
    """The models the scorers need and the endpoints they send to are checked before Ray starts, by key."""
    from pathlib import Path

    from alignment import models, pipeline
    from alignment.config import ConfigError, ExperimentConfig

    data = str(Path(__file__).resolve().parents[2] / "examples" / "data" / "sft_alpaca.jsonl")

    def cfg(select: dict) -> ExperimentConfig:
        return ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"), "data": {"sft": [data]},
                                                "select": select})

    deita = {"complexity_model": "./no/such", "quality_model": "./no/such"}
    with pytest.raises(models.ModelError, match=r"select.deita.complexity_model, select.deita.quality_model: model "
                                                r"path not found: ./no/such"):
        pipeline.preflight(cfg({"scorers": ["deita"], "deita": deita}), "select")
    monkeypatch.delenv("NO_SUCH_RATER_URL", raising=False)
    with pytest.raises(ConfigError, match=r"select.rating.backend is openai.*NO_SUCH_RATER_URL"):
        pipeline.preflight(cfg({"scorers": ["length", "rating"], "length_unit": "words",
                                "rating": {"backend": "openai", "api_base_env": "NO_SUCH_RATER_URL"}}), "select")
    with pytest.raises(models.ModelError, match=r"select.embedding.model: model path not found: ./no/such"):
        pipeline.preflight(cfg({"length_unit": "words", "selector": "kmeans", "embedding": {"model": "./no/such"}}),
                           "select")
