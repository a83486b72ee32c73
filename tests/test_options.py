"""One place per fact: every option is declared once (``options``); the CLI, the API and the
recorded settings are built from, or checked against, that declaration."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import get_args

import numpy as np
import pytest
from helpers import random_adata, random_model

import linear_decoder_jax as ldj
from converters import scvi_ldvae
from linear_decoder_jax import api, cli, config, options, schema


def _ablate_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["ablate"]


def _fields():
    return [(cls, f) for cls in options.ALL for f in dataclasses.fields(cls)]


def test_converter_reads_the_options_config_accepts():
    """converters/ may import numpy and the stdlib only, so it keeps its own tuples: they must
    equal the ``Literal`` types of ``LDVAEConfig``."""
    assert scvi_ldvae._LIKELIHOODS == get_args(config.GeneLikelihood)
    assert scvi_ldvae._DISPERSIONS == get_args(config.Dispersion)
    assert scvi_ldvae._LATENT_DISTRIBUTIONS == get_args(config.LatentDistribution)


def test_api_defaults_are_the_declared_ones():
    """``ldj.ablate``'s keyword defaults equal the options' defaults, name for name, and it
    takes every declared option."""
    params = inspect.signature(api.ablate).parameters
    for _, f in _fields():
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name


def test_cli_flags_come_from_the_declarations():
    """Every declared option with a flag has it, with the declared default and choices."""
    actions = {a.dest: a for a in _ablate_parser()._actions}
    choices = {"mode": options.MODES, "unit": options.UNITS, "library": options.LIBRARIES}
    choices |= {"optimizer": options.OPTIMIZERS, "shapley": options.SHAPLEY}
    for _, f in _fields():
        if f.metadata["cli"].get("flag", True) is None:
            assert f.name not in actions
            continue
        action = actions[f.name]
        assert action.default == f.default, f.name
        if f.name in choices:
            assert tuple(action.choices) == choices[f.name], f.name
    # a value typed on the command line reaches the API under the same name
    args = _ablate_parser().parse_args(["m", "d", "-o", "o.h5ad", "--mode", "keep", "--seed", "3"])
    values = options.values(args, options.ALL)
    assert values["mode"] == "keep" and values["seed"] == 3


def test_recorded_settings_are_documented():
    """Every key a run records in ``uns["ablation"]`` is named in ``schema.UNS``'s text."""
    model = random_model(seed=0, n_latent=3)
    adata = random_adata(model, n_obs=20, seed=1)
    adata.obs["g"] = np.where(np.arange(20) % 2, "a", "b")
    result = ldj.ablate(model, adata, groupby="g", gene_scores=True, shapley="exact", refit=True)
    text = dict((name, doc) for name, _, doc in schema.UNS)["ablation"]
    missing = [k for k in result.settings if k not in text]
    assert not missing, missing


def test_every_subcommand_prints_its_help(capsys):
    """argparse %-formats help texts: a literal % in a declared help (e.g. the traversal's "1%")
    must not break ``--help`` (or the generated docs/cli.md)."""
    from linear_decoder_jax.cli import build_parser, main

    commands = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
    assert "1% to its 99% quantile" in " ".join(capsys.readouterr().out.split())
