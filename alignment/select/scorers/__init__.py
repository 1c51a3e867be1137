"""The select stage's scorers: one module each, one table (``SCORERS``).

A scorer chains itself onto the Ray Data dataset of normalised rows and adds its columns; a row it cannot score
gets a null score and its reason in ``score_error``, never a default. Adding a scorer: its module (an ``add``
function), one ``SCORERS`` entry, and its name in ``SelectConfig.scorers``' Literal in config.py (written out there
for readable errors and the JSON schema; a test checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import deita, length, random, rating

if TYPE_CHECKING:
    from ...config import SelectConfig


@dataclass(frozen=True)
class Resolved:
    """What the pipeline resolved for the select stage, beside the config section: the input files (as listed,
    or patterns, directories), their format, the experiment's seed, and local paths of the models the
    configured scorers, ``max_tokens`` and the selector need (None where none is needed)."""

    files: tuple[str, ...]
    format: str
    seed: int
    tokenizer: str | None = None  # model.base: length in tokens, max_tokens
    chat_template: str | None = None  # model.chat_template, where max_tokens templates the rows
    complexity_model: str | None = None
    quality_model: str | None = None
    rating_model: str | None = None  # the transformers backend's rater
    embedding_model: str | None = None  # a name for embed.model_path (the offline MiniLM, a registry name, a path)


@dataclass(frozen=True)
class Context:
    """What a scorer's ``add`` gets beside its config section: the resolved record, the read tasks at a time
    (a scorer fused into the read tasks must use the same count), the dataset's columns so far (a scorer that
    regroups rows carries them), and the rating endpoint's answers from an earlier run of the stage."""

    resolved: Resolved
    tasks: int
    columns: tuple[str, ...]
    rating_cache: dict[str, dict] | None = None


@dataclass(frozen=True)
class Scorer:
    """``columns``: what ``add`` adds (``score_error`` where a row can fail); ``rank_column``: the scalar column
    ``select.rank_by`` ranks by; ``add(ds, select_config, context) -> ds``; ``models(select_config)``: the
    ``Resolved`` fields it reads -> the config key naming each model, which the pipeline resolves, fingerprints
    and checks before the run; ``endpoint(select_config)``: the name of its endpoint section in ``select`` when
    it sends requests (its URL is checked before the run; how requests are sent is left out of the stage's key)."""

    columns: tuple[str, ...]
    rank_column: str
    add: Callable[[Any, SelectConfig, Context], Any]
    models: Callable[[SelectConfig], dict[str, str]] = lambda s: {}
    endpoint: Callable[[SelectConfig], str | None] = lambda s: None


SCORERS: dict[str, Scorer] = {
    "length": Scorer(
        columns=("score_length",), rank_column="score_length", add=length.add, models=length.models),
    "random": Scorer(columns=("score_random",), rank_column="score_random", add=random.add),
    "deita": Scorer(
        columns=("deita_complexity", "deita_quality", "score_deita_evol", "score_error"),
        rank_column="score_deita_evol", add=deita.add, models=deita.models),
    "rating": Scorer(
        columns=("score_rating", "score_error"), rank_column="score_rating", add=rating.add, models=rating.models,
        endpoint=rating.endpoint),
}


def ranking(s: SelectConfig) -> dict[str, float]:
    """Score column -> weight: ``select.rank_by``, or the first scorer's rank column alone."""
    return {SCORERS[n].rank_column: w for n, w in (s.rank_by or {s.scorers[0]: 1.0}).items()}


def add_scorers(ds: Any, s: SelectConfig, resolved: Resolved, tasks: int, columns: list[str],
                rating_cache: dict[str, dict] | None = None) -> Any:
    """Chain the configured scorers onto a Ray Data dataset of normalised rows with these ``columns`` (read by
    ``tasks`` tasks at a time). ``rating_cache``: the rating endpoint's answers from an earlier run."""
    for name in s.scorers:
        scorer = SCORERS[name]
        ds = scorer.add(ds, s, Context(resolved, tasks, tuple(columns), rating_cache))
        columns = [*dict.fromkeys([*columns, *scorer.columns])]
    return ds
