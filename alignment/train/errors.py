"""The training stages' errors: what cannot train (exit 2), and a run that failed (exit 1)."""

from __future__ import annotations

from ..errors import AlignmentError, InputError


class TrainError(InputError, ValueError):
    """Rows, settings or a model that cannot train: found before training, or when the trainer is built."""


class TrainRunError(AlignmentError, RuntimeError):
    """A training run that failed on its own (a checkpoint it should have reported is missing)."""


class NonFiniteError(TrainError):
    """Training met a non-finite loss, gradient norm or weight: the run stops at that step, on every rank.

    ``step``, ``metrics`` (the non-finite values by name) and ``history`` (every log entry up to and including
    that step) travel with the error out of the Ray Train workers (an exception pickles its ``__dict__``).
    """

    def __init__(self, message: str, step: int | None = None, metrics: dict[str, float] | None = None,
                 history: list[dict] | None = None):
        super().__init__(message)
        self.step, self.metrics, self.history = step, metrics or {}, history or []


NONFINITE_CAUSES = ("usual causes: a learning rate too high for the model, fp16 overflow, starting weights that are "
                    "already non-finite, or rows with no completion token within max_length (length-averaged "
                    "losses divide by zero; such rows are set aside before training, see the stage's set_aside.jsonl)")
