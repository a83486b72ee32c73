"""Read foreign checkpoints (scvi-tools LinearSCVI) into numpy arrays and a plain config.

The converters import the standard library and numpy only: no torch, pandas or scvi-tools. They
never run code named by a file: pickles are read with an allowlist unpickler that maps every
global to our own constructors (see ``converters/_torch_zip.py``).

``read_scvi_checkpoint(src, *, prefix=None) -> ScviCheckpoint`` reads

* a directory written by ``LinearSCVI.save`` with scvi-tools >= 0.15 (``{prefix}model.pt``; a
  directory holding exactly one ``*model.pt`` is read without ``prefix``),
* the path of such a ``model.pt`` file,
* a legacy directory (scvi-tools < 0.15): ``{prefix}model_params.pt`` (the state dict alone),
  ``{prefix}attr.pkl`` (a plain pickle holding either ``registry_`` and ``init_params_``, or a
  pre-0.15 ``scvi_setup_dict_``) and ``{prefix}var_names.csv`` (one gene per line).

``ScviCheckpoint.params`` maps our paths to C-contiguous float32 arrays. Dense kernels are
``(in, out)``, the transpose of torch's ``Linear.weight``. With G = n_input, K = n_latent,
H = n_hidden and B1 = n_batch when n_batch > 1, else 0:

* ``z_encoder/layers/{i}/dense/kernel`` (G or H, H), ``.../dense/bias`` (H,) and
  ``.../bn/scale|bias|mean|var`` (H,) for i < n_layers (BatchNorm ``num_batches_tracked`` is
  dropped); ``z_encoder/mean/kernel`` (H, K), ``z_encoder/mean/bias`` (K,), ``z_encoder/var/...``;
* ``l_encoder/...``: the same with one layer and K = 1;
* ``decoder/factor/dense/kernel`` (K + B1, G): the batch one-hot rows come after the K latent
  rows; ``decoder/factor/dense/bias`` (G,) when ``decoder_bias``;
  ``decoder/factor/bn/scale|bias|mean|var`` (G,) when ``decoder_batch_norm``;
  ``decoder/dropout/...``: the same for the zero-inflation layer;
* ``px_r``: (G,), (G, n_batch) or (G, n_labels) for dispersion "gene", "gene-batch" or
  "gene-label";
* ``library_log_means`` and ``library_log_vars`` (1, n_batch) when the state dict has them
  (not with ``use_observed_lib_size``, nor in old releases that took the library prior from the
  data; 0.14.6 already stores them); they only matter for training.

``ScviCheckpoint.config`` is a JSON-serialisable dict with exactly these keys: ``n_input``,
``n_latent``, ``n_hidden``, ``n_layers`` (z-encoder layers), ``n_batch`` (>= 1), ``n_labels``
(>= 1), ``gene_likelihood`` ("nb", "zinb", "poisson"), ``dispersion`` ("gene", "gene-batch",
"gene-label"), ``latent_distribution`` ("normal", "ln"), ``use_observed_lib_size``,
``log_variational``, ``decoder_batch_norm`` and ``decoder_bias`` (detected from the state dict,
never from init parameters), ``var_names``, ``batch_key``, ``batch_categories`` (n_batch entries;
``["0"]`` without a batch key), ``labels_key``, ``label_categories``, ``layer`` and ``source``
(``scvi_version``, ``model_name``, ``layout`` "modern" or "legacy", ``path``). Dimensions come
from the state dict and are checked against the saved init parameters and registry.

Errors: :class:`ConverterError` is the base of :class:`UnsafeCheckpointError` (a pickle global off
the allowlist or a forbidden opcode), :class:`MalformedCheckpointError` (corrupt, truncated or
incomplete files, size caps, inconsistent shapes, non-finite weights) and
:class:`UnsupportedModelError` (not LinearSCVI, or options we cannot mirror exactly) and
:class:`CheckpointPathError` (also a ``ValueError``: a prefix given with a file, or several models
in a folder and no prefix).
A path that does not exist raises :class:`FileNotFoundError`.
"""

from ._errors import (
    CheckpointPathError,
    ConverterError,
    MalformedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from .scvi_ldvae import ScviCheckpoint, read_scvi_checkpoint

__all__ = [
    "CheckpointPathError",
    "ConverterError",
    "MalformedCheckpointError",
    "ScviCheckpoint",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "read_scvi_checkpoint",
]
