"""The select stage: read instruction data, score every row, keep k rows (Ray Data).

``run_select(select_config, resolved, out_dir)`` is the stage; ``SCORERS`` and ``SELECTORS`` are its extension
tables; ``Resolved`` is what the pipeline resolves for it (files, seed, model paths).
"""

from . import embed
from .rows import ScorerError, SelectError
from .scorers import SCORERS, Resolved, ranking
from .selectors import SELECTORS
from .stage import endpoint_sections, model_names, needs, run_select

__all__ = ["SCORERS", "SELECTORS", "Resolved", "ScorerError", "SelectError", "embed", "endpoint_sections",
           "model_names", "needs", "ranking", "run_select"]
