"""The run options' choices and defaults, in one jax-free place.

The engines (``run``, ``ablation``, ``refit``), the facade's validation and the CLI's ``choices``
and defaults all read these, so the CLI can build its parser without importing jax.
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["drop", "keep"]
LibraryChoice = Literal["model", "observed"]
Baseline = Literal["zero", "mean", "median"]
Optimizer = Literal["lbfgs", "adam"]
Shapley = Literal["exact", "permutation"]

MODES: tuple[Mode, ...] = get_args(Mode)
LIBRARIES: tuple[LibraryChoice, ...] = get_args(LibraryChoice)
BASELINES: tuple[Baseline, ...] = get_args(Baseline)
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
SHAPLEY: tuple[Shapley, ...] = get_args(Shapley)

DEFAULT_MODE: Mode = "drop"
DEFAULT_LIBRARY: LibraryChoice = "model"
DEFAULT_BASELINE: Baseline = "zero"
DEFAULT_OPTIMIZER: Optimizer = "lbfgs"
DEFAULT_REFIT_STEPS: dict[Optimizer, int] = {"lbfgs": 100, "adam": 2000}
DEFAULT_REFIT_TOL = 1e-3  # gradient norm of J, nats per unit of z
DEFAULT_GROUPBY_MAX = 50  # distinct values of a numeric groupby column before it is refused
DEFAULT_N_PERMUTATIONS = 64  # antithetic pairs of random permutations (shapley="permutation")
MAX_EXACT_SHAPLEY_LATENTS = 12  # exact Shapley values enumerate 2^K coalitions per cell
GENE_SCORES_BUDGET = 2 * 2**30  # bytes of the groups x latents x genes tables (gene_scores=True)
DEFAULT_JOIN_TIMEOUT = 300.0  # seconds to join a distributed run (processes may start apart)
DEFAULT_HEARTBEAT_TIMEOUT = 15.0  # seconds before a killed or frozen process stops the others
