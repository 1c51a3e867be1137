"""The training methods, one table: each preference method's TRL classes, parameters and their defaults, losses,
renames into TRL's config and the shape of the data it trains on; sft beside it.

A flat foundation rather than part of train/: the config validates method parameters when it loads, and a
foundation imports no stage package, so config.py and train/ both read the table from here.

Adding a preference method: one ``METHODS`` entry, its name in ``config.PrefMethod``, and a ``PrefConfig`` field
for each parameter no other method has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _dpo():
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer


def _kto():
    from trl import KTOConfig, KTOTrainer

    return KTOConfig, KTOTrainer


def _cpo():
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOConfig, CPOTrainer


def _orpo():
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def _sft():
    from trl import SFTConfig, SFTTrainer

    return SFTConfig, SFTTrainer


@dataclass(frozen=True)
class Method:
    """One training method.

    ``trl``: returns (TRL config class, TRL trainer class), importing TRL only when called (it is slow to import,
    and the config never needs it). ``params``: the parameters it takes, by their config names, with their
    defaults. ``losses``: the ``loss_type`` values it takes, as its TRL trainer names them (empty: none);
    ``sums_losses``: ``loss_type`` may also be a list of them, summed with ``loss_weights``. ``renames``: config
    name -> TRL config field where they differ; ``fixed``: TRL config values the method itself sets. ``check``:
    raises ValueError for a combination of parameters TRL would refuse or that has no effect (``given``: the names
    set in the config). ``reference_model``: the starting weights, frozen, are the reference (with LoRA: the model
    with its adapters off). ``paired``: trains on (chosen, rejected) pairs only; kto also takes unpaired rows.
    ``adds_bos``: the trainer prepends a BOS token where the templated prompt lacks one (counted when rows are
    checked for a completion token).
    """

    trl: Callable[[], tuple[type, type]]
    params: dict[str, Any] = field(default_factory=dict)
    losses: tuple[str, ...] = ()
    sums_losses: bool = False
    renames: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, Any], set[str]], None] | None = None
    reference_model: bool = False
    paired: bool = True
    adds_bos: bool = False

    def trl_kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        """The TRL config arguments of ``params`` (config names): renamed, with the method's fixed values."""
        out = {self.renames.get(name, name): value for name, value in params.items()}
        losses = out.get("loss_type")
        if isinstance(losses, list) and not self.sums_losses:
            (out["loss_type"],) = losses  # one loss, as a list of one; TRL's config holds a string
        return {**out, **self.fixed}


# The loss types whose reward difference f-DPO generalises (TRL refuses another f-divergence with the others).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def _check_dpo(p: dict[str, Any], given: set[str]) -> None:
    losses = [p["loss_type"]] if isinstance(p["loss_type"], str) else p["loss_type"]
    if p["loss_weights"] is not None and len(p["loss_weights"]) != len(losses):
        raise ValueError(f"pref.loss_weights has {len(p['loss_weights'])} weights for {len(losses)} loss "
                         f"types ({', '.join(losses)})")
    if p["f_divergence_type"] != "reverse_kl" and not set(losses) <= set(F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(f"pref.f_divergence_type {p['f_divergence_type']} works with the loss types "
                         f"{', '.join(F_DIVERGENCE_LOSS_TYPES)} only, not {', '.join(losses)}")
    if p["use_weighting"] and set(losses) & {"aot", "aot_unpaired"}:
        raise ValueError("pref.use_weighting (WPO) does not work with the aot losses")
    needs = {"f_alpha_divergence_coef": (p["f_divergence_type"] == "alpha_divergence",
                                         "f_divergence_type is alpha_divergence"),
             "discopop_tau": ("discopop" in losses, "loss_type has discopop")}
    for name, (applies, when) in needs.items():
        if name in given and not applies:
            raise ValueError(f"pref.{name} has no effect unless pref.{when}")


# TR-DPO's reference-model mixing, as DPOConfig and KTOConfig both name it.
_SYNC_REF = {"sync_ref_model": False, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512}

# Every parameter but CPO's and SimPO's alphapo_alpha and ORPO's lambda is the TRL config's own, by the same name.
METHODS: dict[str, Method] = {
    "dpo": Method(
        trl=_dpo,
        params={"beta": 0.1, "loss_type": "sigmoid", "loss_weights": None, "label_smoothing": 0.0,
                "precompute_ref_log_probs": False, "ld_alpha": None, "use_weighting": False,
                "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05, **_SYNC_REF},
        losses=("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
        sums_losses=True, check=_check_dpo, reference_model=True),
    "ipo": Method(
        trl=_dpo, params={"beta": 0.1, "precompute_ref_log_probs": False}, fixed={"loss_type": ["ipo"]},
        reference_model=True),
    "kto": Method(
        trl=_kto,
        params={"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0,
                "precompute_ref_log_probs": False, **_SYNC_REF},
        losses=("kto", "apo_zero_unpaired"), reference_model=True, paired=False),
    "cpo": Method(
        trl=_cpo,
        params={"beta": 0.1, "loss_type": "sigmoid", "cpo_alpha": 1.0, "label_smoothing": 0.0, "alphapo_alpha": 0.0},
        losses=("sigmoid", "hinge", "ipo"),  # CPOConfig's simpo and alphapo losses are method simpo
        renames={"alphapo_alpha": "alpha"}, adds_bos=True),
    "simpo": Method(
        trl=_cpo, params={"beta": 2.0, "gamma": 1.0, "alphapo_alpha": 0.0},
        renames={"gamma": "simpo_gamma", "alphapo_alpha": "alpha"}, fixed={"loss_type": "simpo", "cpo_alpha": 0.0},
        adds_bos=True),
    "orpo": Method(
        trl=_orpo, params={"lambda": 0.1}, renames={"lambda": "beta"},  # TRL's ORPO beta is the paper's lambda
        adds_bos=True),
}

# Supervised fine-tuning, apart from the preference methods: its rows are conversations, its settings
# (assistant_only_loss, packing) are the sft section's own.
SFT = Method(trl=_sft, paired=False)


def method(name: str) -> Method:
    """The table's entry of ``name`` ('sft' or a preference method); KeyError for another name."""
    return SFT if name == "sft" else METHODS[name]
