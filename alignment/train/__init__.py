"""The sft and pref stages' training: TRL trainers (``build_trainer``) inside Ray Train workers (``fit``).

``data``: seeded splits, trainable rows, each method's rows; ``trainer``: the TRL trainer of a method;
``callbacks``: tokens/s, the non-finite guard, save-and-report; ``run``: Ray Train, the settings a config gives.
The methods themselves are alignment.methods.METHODS (the config validates their parameters from it).
"""

from .callbacks import TB_DIR, TokenCounter, run_facts
from .data import check_batch, method_dataset, seeded_order, split_rows, trainable_rows
from .errors import NONFINITE_CAUSES, NonFiniteError, TrainError, TrainRunError
from .run import fit, storage_uri, train_loop, train_settings, write_tensorboard
from .trainer import build_trainer, chat_tokenizer, trainer_args

__all__ = [
    "NONFINITE_CAUSES", "TB_DIR", "NonFiniteError", "TokenCounter", "TrainError", "TrainRunError", "build_trainer",
    "chat_tokenizer", "check_batch", "fit", "method_dataset", "run_facts", "seeded_order", "split_rows",
    "storage_uri", "train_loop", "train_settings", "trainable_rows", "trainer_args", "write_tensorboard",
]
