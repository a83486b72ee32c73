"""One place per fact: option lists that must live apart agree (checked, not copied by hand)."""

from __future__ import annotations

import argparse
from typing import get_args

from converters import scvi_ldvae
from linear_decoder_jax import cli, config, options


def _ablate_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["ablate"]


def test_converter_reads_the_options_config_accepts():
    """converters/ may import numpy and the stdlib only, so it keeps its own tuples: they must
    equal the ``Literal`` types of ``LDVAEConfig``."""
    assert scvi_ldvae._LIKELIHOODS == get_args(config.GeneLikelihood)
    assert scvi_ldvae._DISPERSIONS == get_args(config.Dispersion)
    assert scvi_ldvae._LATENT_DISTRIBUTIONS == get_args(config.LatentDistribution)


def test_cli_choices_and_defaults_come_from_the_engines():
    actions = {a.dest: a for a in _ablate_parser()._actions}
    assert tuple(actions["mode"].choices) == options.MODES
    assert tuple(actions["library"].choices) == options.LIBRARIES
    assert tuple(actions["optimizer"].choices) == options.OPTIMIZERS
    assert actions["mode"].default == options.DEFAULT_MODE
    assert actions["library"].default == options.DEFAULT_LIBRARY
    assert actions["optimizer"].default == options.DEFAULT_OPTIMIZER
    assert actions["refit_tol"].default == options.DEFAULT_REFIT_TOL
    assert actions["baseline"].default == options.DEFAULT_BASELINE
