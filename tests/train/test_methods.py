"""The methods table (alignment.methods.METHODS) against the config and the installed TRL: the config names
exactly its methods, every method's parameters reach TRL's config object on the right field, and the losses
the config accepts are the ones TRL implements (read from TRL's own code, not retyped)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import get_args

import pytest
from conftest import SETTINGS

from alignment import config, train
from alignment.methods import F_DIVERGENCE_LOSS_TYPES, METHODS, SFT

# A value for every method parameter that differs from each method's default (the loss_type: another loss of
# the method). A new parameter needs one here, or the contract test fails.
NON_DEFAULT = {"beta": 0.25, "loss_weights": [0.5], "label_smoothing": 0.1, "precompute_ref_log_probs": True,
               "ld_alpha": 0.5, "use_weighting": True, "f_divergence_type": "js_divergence",
               "f_alpha_divergence_coef": 0.3, "discopop_tau": 0.1, "sync_ref_model": True,
               "ref_model_mixup_alpha": 0.5, "ref_model_sync_steps": 8, "desirable_weight": 2.0,
               "undesirable_weight": 0.5, "cpo_alpha": 0.5, "alphapo_alpha": 0.25, "gamma": 0.7, "lambda": 0.3}


def test_the_configs_method_names_are_the_tables():
    assert list(get_args(config.PrefMethod)) == list(METHODS)
    assert "sft" not in METHODS and SFT.params == {}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_parameter_reaches_trls_config_on_its_field(method, tmp_path):
    """From the pref section (as a config file sets it) through train_settings to the TRL config object that
    build_trainer makes: each parameter, set to a value other than its default, lands on its TRL field (renamed
    where the table renames it), and the method's fixed values land too."""
    spec = METHODS[method]
    values = {name: NON_DEFAULT[name] for name in spec.params if name != "loss_type"}
    if "loss_type" in spec.params:
        values["loss_type"] = next(loss for loss in spec.losses if loss != spec.params["loss_type"])
    assert all(values[name] != default for name, default in spec.params.items())
    pref = config.PrefConfig.model_validate({"method": method, **values})
    settings = train.train_settings(pref, seed=0, method=method)
    assert settings["params"] == values
    args = train.trainer_args(method, {**SETTINGS, **settings, "use_gpu": False}, str(tmp_path))
    config_cls, _ = spec.trl()
    assert type(args) is config_cls
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for name, value in values.items():
        field = spec.renames.get(name, name)
        assert field in fields, f"{method}.{name}: {config_cls.__name__} has no field {field}"
        got = getattr(args, field)
        if name == "loss_type" and isinstance(got, list):  # DPOConfig holds a list of losses
            value = [value]
        assert got == value, f"{method}.{name} -> {config_cls.__name__}.{field}: {got!r}, not {value!r}"
    for field, value in spec.fixed.items():
        assert getattr(args, field) == value, f"{method}: {config_cls.__name__}.{field} is not {value!r}"


def test_a_parameter_left_out_of_the_settings_takes_the_tables_default(tmp_path):
    # SimPO's beta (2.0) is not CPOConfig's (0.1): the table's default wins where the settings have none.
    args = train.trainer_args("simpo", {**SETTINGS, "params": {"gamma": 0.5}}, str(tmp_path))
    assert (args.beta, args.simpo_gamma, args.loss_type, args.cpo_alpha) == (2.0, 0.5, "simpo", 0.0)


def _source_tree(function) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def _compared_with(tree: ast.AST, name: str) -> set[str]:
    """Every string that ``name`` (a variable or ``self.<name>``) is compared with by ``==`` in ``tree``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.Eq):
            left = node.left
            named = (isinstance(left, ast.Name) and left.id == name) or \
                (isinstance(left, ast.Attribute) and left.attr == name)
            if named and isinstance(node.comparators[0], ast.Constant):
                out.add(node.comparators[0].value)
    return out


def test_the_dpo_losses_are_the_ones_trls_dpo_trainer_implements():
    from trl import DPOTrainer

    # DPOTrainer._compute_loss dispatches on each loss type (``if loss_type == "sigmoid": ...``), else raises.
    implemented = _compared_with(_source_tree(DPOTrainer._compute_loss), "loss_type")
    assert implemented and set(METHODS["dpo"].losses) == implemented
    assert set(METHODS["ipo"].fixed["loss_type"]) <= implemented
    # The f-divergences it computes, and the losses it lets take one other than reverse_kl (its __init__).
    divergences = _compared_with(_source_tree(DPOTrainer._compute_loss), "f_divergence_type")
    assert set(get_args(config.FDivergence)) == divergences
    init = _source_tree(DPOTrainer.__init__)
    (allowed,) = [ast.literal_eval(node.value) for node in ast.walk(init) if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "f_divergence_loss_types" for t in node.targets)]
    assert set(F_DIVERGENCE_LOSS_TYPES) == allowed


def _choices(config_cls) -> set[str]:
    (field,) = [f for f in dataclasses.fields(config_cls) if f.name == "loss_type"]
    return set(field.metadata["choices"])


def test_the_kto_losses_are_kto_configs_choices():
    from trl import KTOConfig

    assert set(METHODS["kto"].losses) == _choices(KTOConfig)


def test_the_cpo_losses_and_simpo_are_cpo_configs_choices():
    """CPOConfig's choices are CPO's losses, SimPO's (method simpo) and alphapo, which CPOConfig turns into
    simpo (method simpo with alphapo_alpha set)."""
    from trl.experimental.cpo import CPOConfig

    choices = _choices(CPOConfig)
    assert METHODS["cpo"].trl is METHODS["simpo"].trl and "alphapo" in choices
    assert set(METHODS["cpo"].losses) | {METHODS["simpo"].fixed["loss_type"]} == choices - {"alphapo"}
    assert "alpha" in {f.name for f in dataclasses.fields(CPOConfig)}
