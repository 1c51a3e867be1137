"""The ``length`` scorer (Long Is More): the length of all assistant turns, in tokens of the trained model's
tokenizer, words or characters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..rows import MESSAGES_TYPE, assistant_lengths, in_read_tasks, valid

if TYPE_CHECKING:
    from ...config import SelectConfig
    from . import Context


def length_scores(messages: Sequence[list[dict]], unit: str, tokenizer: Any = None) -> list[int]:
    """Length of all assistant turns of each conversation, in chars, words or tokens."""
    return [int(x) for x in assistant_lengths(pa.array(list(messages), MESSAGES_TYPE), unit, tokenizer)]


def score_length_batch(table: pa.Table, unit: str, tokenizer_path: str | None) -> pa.Table:
    """Ray Data UDF: ``score_length`` (null for rows that failed validation), computed in Arrow."""
    from ... import models

    tok = models.load_tokenizer(tokenizer_path) if unit == "tokens" else None
    # One task per CPU runs this (in the read tasks): the tokenizer's own threads would only contend with them.
    lengths = assistant_lengths(table["messages"], unit, tok, threads=False).astype(np.float64)
    return table.append_column("score_length", pa.array(lengths, mask=~np.asarray(valid(table), bool)))


def models(s: SelectConfig) -> dict[str, str]:
    """Lengths in tokens are counted with the trained model's tokenizer."""
    return {"tokenizer": "model.base"} if s.length_unit == "tokens" else {}


def add(ds: Any, s: SelectConfig, ctx: Context) -> Any:
    """Fused into the read tasks: a cheap, CPU-bound score needs no actors."""
    return in_read_tasks(ds, score_length_batch, ctx.tasks, unit=s.length_unit, tokenizer_path=ctx.resolved.tokenizer)
