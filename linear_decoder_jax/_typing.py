"""jaxtyping aliases for the core's signatures, with AnnData / scvi-tools dimension names.

``n_obs`` cells (a minibatch, padded rows included), ``n_vars`` genes, ``n_latent`` latents,
``n_batch`` batches; ``*cells`` is any number of leading cell axes (none for one cell, as the refit
evaluates lanes one cell at a time under ``vmap``). The annotations are checked at run time only
under the test suite (``tests/conftest.py`` installs jaxtyping's import hook with beartype), as
equinox does: at run time they cost nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jaxtyping import Float, Int, Key

Array = jax.Array

Counts = Float[Array, "*cells n_vars"]  # counts per cell and gene (floats holding integers)
PerGene = Float[Array, "*cells n_vars"]  # any per-cell, per-gene quantity (mu, theta, logits)
Dispersion = Float[Array, "*#cells n_vars"]  # theta: per cell and gene, or per gene (1, n_vars)
Latent = Float[Array, "*cells n_latent"]  # encoder-space z or decoder input
LogLibrary = Float[Array, "*cells 1"]
PerCell = Float[Array, "*cells"]
Codes = Int[Array | np.ndarray, "*cells"]  # batch or label codes (host arrays welcome: eager use)
PRNGKey = Key[jax.Array, ""]
