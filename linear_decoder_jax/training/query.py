"""Query mapping (scArches-style architecture surgery) for cells from batches a reference never saw.

The reference's weights are kept and frozen; the model grows by the new batch categories:

* each decoder head (``factor_regressor`` and ``px_dropout_decoder``) gets one one-hot row per new
  batch (drawn as torch initialises a Linear: U(-1/sqrt(n_in), 1/sqrt(n_in))); a reference with a
  single batch has no batch rows, and its batch gets a row of zeros (frozen), so its cells decode
  exactly as before;
* ``library_log_means``/``vars`` get the new batches' library-size prior from the query cells;
* for ``dispersion="gene-batch"``, ``px_r`` gets a standard-normal column per new batch.

Only those new entries are trained (a 0/1 gradient mask). Every BatchNorm is frozen (running
statistics used and not updated); ``freeze_batchnorm_decoder=False`` trains the decoder's
BatchNorm (batch statistics, running statistics and its scale and shift updated), as scArches can:
then the reference's own cells no longer decode exactly as before.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from linear_decoder_jax.config import DataRegistry, LDVAEConfig, ModelSpec
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.params import BatchNorm, Layer, LDVAEParams


def query_spec(
    reference: ModelSpec, query_categories: tuple[str, ...], batch_key: str
) -> ModelSpec:
    """The mapped model's spec: the reference's, with the new batch categories appended."""
    known = reference.data.batch_categories
    if reference.data.batch_key is None:
        msg = (
            "Query mapping needs a reference trained with a batch_key: its batch columns are "
            "what grows for the new batches."
        )
        raise ConfigError(msg)
    new = tuple(c for c in query_categories if c not in known)
    if not new:
        msg = (
            f"The query's batch column {batch_key!r} holds no batch the reference has not seen "
            f"(reference batches: {', '.join(known)}); there is nothing to map."
        )
        raise ConfigError(msg)
    categories = known + new
    model = LDVAEConfig(**(reference.model.to_dict() | {"n_batch": len(categories)}))
    data = DataRegistry(**(reference.data.__dict__ | {"batch_categories": categories}))
    source = dict(reference.source) | {"query_of": reference.source, "new_batches": list(new)}
    return ModelSpec(model=model, data=data, source=source)


def extend(
    params: LDVAEParams,
    old: LDVAEConfig,
    new: LDVAEConfig,
    library_log_means: np.ndarray,
    library_log_vars: np.ndarray,
    *,
    seed: int,
    freeze_batchnorm_decoder: bool = True,
) -> tuple[LDVAEParams, LDVAEParams]:
    """(mapped parameters, 0/1 gradient mask) for the grown model ``new``; the library prior
    arrays (1, new.n_batch) hold the query's values at the new batches' positions."""
    rng = np.random.default_rng(seed)
    a: Any = np.asarray  # numpy leaves in the Array-typed parameter tuples
    k, g = old.n_latent, old.n_input
    n_old, n_new = old.n_batch, new.n_batch
    n_in = k + n_new
    bound = 1.0 / math.sqrt(n_in)

    def grow(head: Layer) -> tuple[Layer, Layer]:
        kernel = np.asarray(head.dense.kernel)
        rows = [kernel[:k]]
        mask_rows = [np.zeros((k, g))]
        if n_old > 1:
            rows.append(kernel[k:])
            mask_rows.append(np.zeros((n_old, g)))
        else:
            rows.append(np.zeros((1, g)))  # the reference's one batch: no offset, frozen
            mask_rows.append(np.zeros((1, g)))
        rows.append(rng.uniform(-bound, bound, (n_new - n_old, g)))
        mask_rows.append(np.ones((n_new - n_old, g)))
        grown = head._replace(dense=head.dense._replace(kernel=a(np.concatenate(rows))))
        mask_dense = head.dense._replace(
            kernel=a(np.concatenate(mask_rows)),
            bias=None if head.dense.bias is None else a(np.zeros(g)),
        )
        bn_mask = None
        if head.bn is not None:
            on = a(np.full(g, 0.0 if freeze_batchnorm_decoder else 1.0))
            bn_mask = BatchNorm(on, on, a(np.zeros(g)), a(np.zeros(g)))
        return grown, Layer(mask_dense, bn_mask)

    factor, factor_mask = grow(params.decoder.factor)
    dropout, dropout_mask = grow(params.decoder.dropout)
    px_r = np.asarray(params.px_r)
    px_mask = np.zeros_like(px_r)
    if new.dispersion == "gene-batch":
        fresh = rng.standard_normal((g, n_new - n_old))
        px_r = np.concatenate([px_r, fresh], axis=1)
        px_mask = np.concatenate([px_mask, np.ones_like(fresh)], axis=1)
    means = np.asarray(library_log_means, np.float32).copy()
    variances = np.asarray(library_log_vars, np.float32).copy()
    if params.library_log_means is not None and params.library_log_vars is not None:
        means[:, :n_old] = np.asarray(params.library_log_means)
        variances[:, :n_old] = np.asarray(params.library_log_vars)
    observed = new.use_observed_lib_size
    grown = params._replace(
        decoder=params.decoder._replace(factor=factor, dropout=dropout),
        px_r=a(px_r),
        library_log_means=None if observed else a(means),
        library_log_vars=None if observed else a(variances),
    )
    zeros = jax.tree.map(lambda a: np.zeros(np.shape(a)), grown)
    mask = zeros._replace(
        decoder=zeros.decoder._replace(factor=factor_mask, dropout=dropout_mask), px_r=a(px_mask)
    )
    cast = jax.tree.map(lambda a: np.asarray(a, np.float32), (grown, mask))
    return cast[0], cast[1]
