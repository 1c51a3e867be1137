"""Evaluation: answers to prompts from a model, and the judges that score them (``JUDGES``, one per protocol).

``generate`` here is the function; its module is ``alignment.evaluate.generate`` for ``from ... import``.
"""

from .generate import generate
from .judges import COUNTS, JUDGES, METRICS, SUMMARY_KEYS, Judge

__all__ = ["COUNTS", "JUDGES", "METRICS", "SUMMARY_KEYS", "Judge", "generate"]
