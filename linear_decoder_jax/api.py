"""scvi-tools-style facade: ``ldj.load(path)`` returns a ``LinearSCVI`` with the familiar methods.

Differences from scvi-tools, on purpose:

* Deterministic by default. scvi-tools samples z ~ q(z|x) and the library ~ q(l|x) inside
  ``get_normalized_expression`` and ``get_reconstruction_error``; we decode posterior means unless
  ``n_samples > 0`` (then with an explicit PRNG key made from ``seed``).
* For ``latent_distribution="ln"`` every latent we take or return lives in decoder-input space,
  ``softmax(q(z|x) mean)``; scvi-tools' ``get_latent_representation`` returns a Monte-Carlo mean
  of softmax samples instead.
* ``get_reconstruction_error`` returns per-cell negative log-likelihoods (an array) rather than
  ``{"reconstruction_loss": ...}`` from one posterior draw.
* ``get_loadings`` folds the decoder BatchNorm in whenever the decoder has one; scvi-tools omits
  the scaling for models built with a truthy string ``use_batch_norm`` ("encoder", "none").
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import (
    ablation,
    anndata_io,
    checkpoint,
    families,
    model,
    options,
    pipeline,
    sources,
)
from linear_decoder_jax._atomic import check_destination
from linear_decoder_jax._text import preview
from linear_decoder_jax.config import LDVAEConfig, ModelSpec
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError
from linear_decoder_jax.family import Family, sample_gaussian
from linear_decoder_jax.params import from_flat
from linear_decoder_jax.results import AblationResult, h5ad_name

if TYPE_CHECKING:
    from linear_decoder_jax import assemble

DType = Literal["float32", "float64"]
DEFAULT_BATCH_SIZE = 1024


class AffineDecoders(NamedTuple):
    """Both decoder heads in affine form (numpy, BatchNorm folded in).

    ``scale``: ``softmax(z @ loadings.T + offsets[batch] + intercept)`` is rho exactly.
    ``zi_logits``: the zero-inflation head in the same form (ZINB models only, else None).
    """

    scale: model.AffineDecoder
    zi_logits: model.AffineDecoder | None


@functools.partial(jax.jit, static_argnames=("config",))
def _encode(params, x, *, config: LDVAEConfig) -> tuple[model.Posterior, jax.Array, jax.Array]:
    """(posterior, decoder input at its mean, the model's log library) of counts ``x``."""
    post = model.inference(params, x, config=config)
    z = model.z_transformation(post.qz_m, config=config)
    return post, z, model.library(post, x, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode(params, z, log_library, batch, label, *, config: LDVAEConfig) -> model.Decoded:
    return model.generative(params, z, log_library, batch, label, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _nll(params, x, z, log_library, batch, label, *, config: LDVAEConfig) -> jax.Array:
    decoded = model.generative(params, z, log_library, batch, label, config=config)
    return -model.log_likelihood(x, decoded, config=config)


# get_affine_decoder through one compile, not one per eager op (~15 on a model's first use)
_affine_head = jax.jit(model.affine_head, static_argnames=("config",))
_loadings = jax.jit(lambda family, params: family.loadings(params), static_argnums=0)


def _is_model_dir(path: Path) -> bool:
    return (path / checkpoint.CONFIG_FILE).is_file()


def _read_foreign(src: str | os.PathLike, prefix: str | None) -> tuple[Any, ModelSpec]:
    """(params, spec) of a foreign checkpoint, its family detected (no torch, no pickle code)."""
    from converters import ConverterError, read_scvi_checkpoint
    from converters.drvi import detect_family, read_drvi_checkpoint

    try:
        family = detect_family(src, prefix=prefix)
    except ConverterError:  # not a readable model: the LinearSCVI reader says exactly why
        family = "linear_scvi"
    if family == "drvi":
        from linear_decoder_jax.families import drvi

        ckpt = read_drvi_checkpoint(src, prefix=prefix)
        spec = ModelSpec.from_converter(ckpt.config, family="drvi")
        return drvi.from_flat(ckpt.params, spec.model), spec
    scvi = read_scvi_checkpoint(src, prefix=prefix)
    spec = ModelSpec.from_converter(scvi.config)
    return from_flat(scvi.params, spec.model), spec


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a scvi-tools LinearSCVI checkpoint (no torch, no pickle code run) to our format.

    Parameters
    ----------
    src
        A scvi-tools model directory (``{prefix}model.pt``, or the legacy < 0.15 layout) or a path
        to a ``.pt`` file.
    dst
        Directory to create: orbax parameters plus ``config.json``. Written atomically.
    prefix
        File-name prefix used when the model was saved (scvi-tools ``save(prefix=...)``).
    overwrite
        Replace an existing ``dst``.

    Returns
    -------
    Path
        The absolute path of ``dst``.
    """
    target = check_destination(dst, overwrite=overwrite, directory=True)
    source = Path(src).expanduser().absolute()
    if target == source or target in source.parents:
        msg = f"Refusing to write {target}: it holds the checkpoint being converted ({source})."
        raise ConfigError(msg)
    params, spec = _read_foreign(src, prefix)
    return checkpoint.save(dst, params, spec, overwrite=overwrite)


def load(
    path: str | os.PathLike, *, prefix: str | None = None, dtype: DType = "float32"
) -> LinearSCVI | DRVI:
    """Load a converted model directory, or convert a scvi-tools checkpoint in memory.

    ``dtype="float64"`` runs every computation in double precision (JAX's x64 mode is switched on
    only inside this model's calls; no global state is changed).
    """
    path = Path(path)
    training = None
    if path.is_dir() and _is_model_dir(path):
        params, spec = checkpoint.load(path)
        training = checkpoint.read_training(path)
    else:
        params, spec = _read_foreign(path, prefix)
    facade = DRVI if spec.family == "drvi" else LinearSCVI
    return facade(params, spec, dtype=dtype, path=str(path.absolute()), training=training)


class _Model:
    """What every model facade shares: ``(spec, params)`` of one family, its dtype and path, the
    alignment of data with it, the encoding of cells and what the run pipeline needs of it."""

    def __init__(
        self,
        params: Any,
        spec: ModelSpec,
        *,
        dtype: DType = "float32",
        path: str | None = None,
        family: Family | None = None,
        training: dict[str, Any] | None = None,
    ):
        if dtype not in ("float32", "float64"):
            raise ConfigError(f"Expected dtype 'float32' or 'float64', got {dtype!r} instead.")
        # the decoder the scorers see: the spec's family, or (tests) the same maths another way
        self.family: Family = family or families.of(spec)
        self.spec = spec
        self.path = path
        self.training = training  # ldj.train's record: history, settings, indices
        self.dtype: DType = dtype
        self._host_params = jax.tree.map(lambda a: np.asarray(a, dtype=dtype), params)
        self._device_params: Any = None

    @property
    def n_latent(self) -> int:
        return self.family.n_latent

    @property
    def var_names(self) -> list[str]:
        return list(self.spec.data.var_names)

    @property
    def latent_names(self) -> list[str]:
        """``Z_0 ... Z_{K-1}``, the column names scvi-tools' ``get_loadings`` uses."""
        return self.family.latent_names()

    @property
    def host_params(self) -> Any:
        """Parameters as numpy arrays of the model's dtype (the converted weights)."""
        return self._host_params

    def fingerprint(self) -> str:
        """sha256 of the weights and the data registry (``checkpoint.fingerprint``)."""
        return checkpoint.fingerprint(self._host_params, self.spec)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write this model in our format (orbax parameters + ``config.json``, and the training
        record of a model trained here), atomically."""
        return checkpoint.save(
            path, self._host_params, self.spec, overwrite=overwrite, training=self.training
        )

    # -- training record (models made by ldj.train) ---------------------------------------------
    @property
    def history_(self) -> dict[str, Any]:
        """Per-epoch training metrics as scvi-tools' ``history_``: one DataFrame per key, indexed
        by ``epoch`` (empty for a converted model)."""
        import pandas as pd

        if self.training is None:
            return {}
        out = {}
        for key, rows in self.training["history"].items():
            epochs, values = zip(*rows, strict=True) if rows else ((), ())
            index = pd.Index(np.asarray(epochs, np.int64), name="epoch")
            out[key] = pd.DataFrame({key: np.asarray(values, np.float64)}, index=index)
        return out

    def _indices(self, which: str) -> np.ndarray | None:
        return None if self.training is None else np.asarray(self.training["indices"][which])

    @property
    def train_indices(self) -> np.ndarray | None:
        """Cells (positions in the training AnnData) the model was trained on."""
        return self._indices("train")

    @property
    def validation_indices(self) -> np.ndarray | None:
        return self._indices("validation")

    @property
    def test_indices(self) -> np.ndarray | None:
        return self._indices("test")

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        """Context in which this model's arrays have its dtype (x64 on for float64 only)."""
        with jax.enable_x64(self.dtype == "float64"):
            yield

    @property
    def params(self) -> Any:
        """Parameters as device arrays of the model's dtype (call inside :meth:`precision`)."""
        if self._device_params is None:
            with self.precision():
                # device_put, not jnp.asarray: that compiles a copy per shape (~10 ms each)
                self._device_params = jax.device_put(self._host_params)
        return self._device_params

    def prepare(
        self,
        adata: Any,
        *,
        allow_non_integer: bool = False,
        layer: str | None = anndata_io.AUTO,
        use_raw: bool = False,
    ) -> anndata_io.CellData:
        """Align ``adata`` with this model (genes, counts source, categories).

        ``layer``: where the counts are (None or "X" for X; "auto": the model's layer when the
        data has it, else X); ``use_raw=True`` reads ``adata.raw``. See ``anndata_io.prepare``.
        """
        return anndata_io.prepare(
            adata, self.spec, allow_non_integer=allow_non_integer, layer=layer, use_raw=use_raw
        )

    def _subset(self, adata: Any, indices: Sequence[int] | None) -> Any:
        return adata if indices is None else adata[np.asarray(indices)]

    def _map(
        self, data: anndata_io.CellData, batch_size: int | None, fn: Callable[..., dict]
    ) -> dict[str, np.ndarray]:
        """Apply ``fn(minibatch) -> dict of (rows, ...) arrays`` and stitch results in obs order."""
        size = int(batch_size or min(DEFAULT_BATCH_SIZE, data.n_obs))
        parts: dict[str, list[np.ndarray]] = {}
        with self.precision():
            for mb in anndata_io.minibatches(data, size, dtype=np.dtype(self.dtype)):
                for key, value in fn(mb).items():
                    parts.setdefault(key, []).append(np.asarray(value)[: mb.n_valid])
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}

    def encode(self, adata: Any, *, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Posterior and library of every cell: ``qz_m``, ``qz_v`` (encoder space), ``z`` (decoder
        input at the mean) and ``library`` (log library, (n_obs, 1)); ``adata`` may be an AnnData
        or the ``CellData`` of :meth:`prepare`."""
        data = adata if isinstance(adata, anndata_io.CellData) else self.prepare(adata)

        def fn(mb: anndata_io.Minibatch) -> dict:
            x, b, lab = (jnp.asarray(a) for a in (mb.x, mb.batch, mb.label))
            enc = pipeline.encode(self.family, self.params, x, b, lab)
            return {"qz_m": enc.qz_m, "qz_v": enc.qz_v, "z": enc.z, "library": enc.log_library}

        return self._map(data, batch_size, fn)

    def _frame(self, values: np.ndarray, obs_names, genes: np.ndarray, return_numpy: bool | None):
        if return_numpy:
            return values
        import pandas as pd

        columns = np.asarray(self.spec.data.var_names)[genes]
        return pd.DataFrame(values, index=obs_names, columns=columns)

    def _check_latent(self, latent: Any, n_obs: int) -> np.ndarray:
        latent = np.asarray(latent, dtype=self.dtype)
        if latent.ndim != 2 or latent.shape[1] != self.n_latent:
            msg = f"Expected latent of shape (n_obs, {self.n_latent}), got {latent.shape} instead."
            raise ConfigError(msg)
        if latent.shape[0] != n_obs:
            msg = f"latent has {latent.shape[0]} rows but the data has {n_obs} cells."
            raise IncompatibleDataError(msg)
        return latent

    def run_model(self) -> assemble.Model:
        """What the run pipeline needs of this model: family, parameters (device arrays: call
        inside :meth:`precision`), identity and loadings."""
        from linear_decoder_jax import assemble

        loadings = _loadings(self.family, self.params)
        return assemble.Model(
            family=self.family,
            params=self.params,
            dtype=self.dtype,
            var_names=self.var_names,
            fingerprint=self.fingerprint(),
            source={
                "model": self.path or "",
                "scvi_version": str(self.spec.source.get("scvi_version") or ""),
            },
            loadings=None if loadings is None else np.asarray(loadings),
        )


class LinearSCVI(_Model):
    """A LinearSCVI model in JAX: ``(spec, params)`` plus scvi-tools' query methods."""

    @property
    def config(self) -> LDVAEConfig:
        return self.spec.model

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LinearSCVI(n_input={c.n_input}, n_latent={c.n_latent}, n_batch={c.n_batch}, "
            f"gene_likelihood={c.gene_likelihood!r}, dispersion={c.dispersion!r}, "
            f"latent_distribution={c.latent_distribution!r}, dtype={self.dtype!r})"
        )

    def export_scvi(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write this model as a scvi-tools 1.4 ``LinearSCVI`` directory (``model.pt``), without
        torch: ``scvi.model.LinearSCVI.load(path, adata=...)`` reads it."""
        from linear_decoder_jax.training import export

        return export.export_scvi(self, path, overwrite=overwrite)

    def to_flax(self) -> tuple[Any, dict[str, Any]]:
        """This model as a Flax (linen) module and its ``variables``: ``module.apply(variables,
        x, batch, label, method="nll")`` and friends, differentiable and trainable with optax
        (``linear_decoder_jax.module``; the workflow is in docs/flax.md)."""
        from linear_decoder_jax import module

        return module.create(self.config, self.host_params)

    @classmethod
    def from_flax(cls, variables: dict[str, Any], *, like: LinearSCVI) -> LinearSCVI:
        """A model holding the weights of Flax ``variables`` (e.g. fine-tuned), with the genes,
        categories and configuration of ``like``: save it, ablate it, query it.

        Parameters
        ----------
        variables
            Variables of ``like.to_flax()``'s module, after training or not; checked leaf by
            leaf against ``like.config`` (``module.to_params``).
        like
            The model the variables came from: its ``spec`` (configuration, gene names,
            batch and label categories) and ``dtype`` are the new model's.

        Returns
        -------
        LinearSCVI
            A new model (``path`` None until it is saved); ``like`` is unchanged.
        """
        from linear_decoder_jax import module

        if not isinstance(like, LinearSCVI):
            msg = f"Expected like= a LinearSCVI, got {type(like).__name__} instead."
            raise ConfigError(msg)
        return cls(module.to_params(like.config, variables), like.spec, dtype=like.dtype)

    def _batch_codes(self, value: Any) -> list[int]:
        cats = self.spec.data.batch_categories
        values = list(value) if isinstance(value, list | tuple) else [value]
        codes = []
        for v in values:
            if str(v) not in cats:
                msg = f"Unknown batch {v!r}; the model's batches are {list(cats)}."
                raise IncompatibleDataError(msg)
            codes.append(cats.index(str(v)))
        return codes

    # -- scvi-tools methods --------------------------------------------------------------------
    def get_latent_representation(
        self,
        adata: Any,
        *,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        return_dist: bool = False,
        batch_size: int | None = None,
        seed: int = 0,
        layer: str | None = anndata_io.AUTO,
        use_raw: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation of each cell.

        Returns
        -------
        numpy.ndarray or tuple of numpy.ndarray
            ``give_mean=True``: the decoder input at the posterior mean, (n_obs, n_latent)
            (``softmax(qz_m)`` for "ln"). ``give_mean=False``: one draw z ~ q(z|x) (transformed for
            "ln") with ``jax.random.key(seed)``. ``return_dist=True``: ``(qz_m, qz_v)`` of q(z|x).
        """
        data = self.prepare(self._subset(adata, indices), layer=layer, use_raw=use_raw)
        enc = self.encode(data, batch_size=batch_size)
        if return_dist:
            return enc["qz_m"], enc["qz_v"]
        if give_mean:
            return enc["z"]
        with self.precision():
            qz_m, qz_v = jnp.asarray(enc["qz_m"]), jnp.asarray(enc["qz_v"])
            draw = sample_gaussian(qz_m, qz_v, key=jax.random.key(seed))
            return np.asarray(model.z_transformation(draw, config=self.config))

    def decode(
        self,
        latent: Any,
        *,
        batch_index: Any = None,
        label_index: Any = None,
        library: Any = None,
    ) -> model.Decoded:
        """Decode decoder-input ``latent`` (n_obs, n_latent): ``Decoded(scale, mu, theta, zi_logits)``.

        ``batch_index``/``label_index`` are integer codes (scalar or (n_obs,)); ``library`` is the
        log library (n_obs,) or scalar, default 0 so that ``mu == scale``.
        """
        latent = np.atleast_2d(np.asarray(latent, dtype=self.dtype))
        n = latent.shape[0]
        latent = self._check_latent(latent, n)
        if batch_index is None:
            if self.config.n_batch > 1:
                msg = (
                    f"The model has {self.config.n_batch} batches: pass batch_index "
                    f"(codes of {list(self.spec.data.batch_categories)})."
                )
                raise ConfigError(msg)
            batch_index = 0
        batch = np.broadcast_to(np.asarray(batch_index, dtype=np.int32), (n,))
        label = np.broadcast_to(
            np.asarray(0 if label_index is None else label_index, np.int32), (n,)
        )
        for name, codes, limit in (
            ("batch_index", batch, self.config.n_batch),
            ("label_index", label, self.config.n_labels),
        ):
            if codes.min() < 0 or codes.max() >= limit:
                raise ConfigError(f"Expected {name} in [0, {limit}), got {codes.max()} instead.")
        lib = np.broadcast_to(np.asarray(0.0 if library is None else library, self.dtype), (n,))
        with self.precision():
            out = _decode(
                self.params,
                jnp.asarray(latent),
                jnp.asarray(lib)[:, None],
                jnp.asarray(batch),
                jnp.asarray(label),
                config=self.config,
            )
            return jax.tree.map(np.asarray, out)  # numpy leaves; zi_logits None stays None

    def get_normalized_expression(
        self,
        adata: Any = None,
        *,
        latent: Any = None,
        indices: Sequence[int] | None = None,
        transform_batch: Any = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1.0,
        n_samples: int = 0,
        seed: int = 0,
        batch_size: int | None = None,
        return_numpy: bool | None = None,
        layer: str | None = anndata_io.AUTO,
        use_raw: bool = False,
    ):
        """Normalised expression rho (x ``library_size``), or mu with ``library_size="latent"``.

        ``latent=`` replaces the posterior mean by your own decoder input (n_obs, n_latent), for
        example with one column set to 0. ``transform_batch`` decodes as if every cell came from
        that batch (a list averages over batches, as scvi-tools does). ``n_samples > 0`` averages
        over draws z ~ q(z|x) (and l ~ q(l|x)) made with ``jax.random.key(seed)``.

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
            DataFrame (n_obs, n_genes) indexed by obs and gene names, or a numpy array when
            ``return_numpy`` is True.
        """
        if adata is None and latent is None:
            raise ConfigError("Pass adata, latent, or both.")
        if n_samples and latent is not None:
            raise ConfigError(
                "n_samples > 0 draws latents from q(z|x); it cannot be used with latent=."
            )
        genes = self._gene_columns(gene_list)
        codes = None if transform_batch is None else self._batch_codes(transform_batch)
        if adata is None:
            return self._normalized_from_latent(latent, codes, genes, library_size, return_numpy)
        adata = self._subset(adata, indices)
        data = self.prepare(adata, layer=layer, use_raw=use_raw)
        latent = None if latent is None else self._check_latent(latent, data.n_obs)
        key = jax.random.key(seed)
        cfg = self.config

        def fn(mb: anndata_io.Minibatch) -> dict:
            nonlocal key
            post, z, lib = _encode(self.params, jnp.asarray(mb.x), config=cfg)
            if latent is not None:
                z = jnp.asarray(_pad_rows(latent[mb.start : mb.start + mb.n_valid], len(mb.x)))
            draws = [(z, lib)]
            if n_samples:
                draws = []
                for _ in range(n_samples):
                    key, kz, kl = jax.random.split(key, 3)
                    zs = sample_gaussian(post.qz_m, post.qz_v, key=kz)
                    ls = lib
                    if not cfg.use_observed_lib_size:
                        ls = sample_gaussian(post.ql_m, post.ql_v, key=kl)
                    draws.append((model.z_transformation(zs, config=cfg), ls))
            batches = (
                [jnp.asarray(mb.batch)]
                if codes is None
                else [jnp.full_like(jnp.asarray(mb.batch), c) for c in codes]
            )
            total: Any = 0.0
            for zz, ll in draws:
                for b in batches:
                    dec = _decode(self.params, zz, ll, b, jnp.asarray(mb.label), config=cfg)
                    total = total + (
                        dec.mu if library_size == "latent" else dec.scale * library_size
                    )
            return {"expr": (total / (len(draws) * len(batches)))[:, genes]}

        expr = self._map(data, batch_size, fn)["expr"]
        return self._frame(expr, data.obs_names, genes, return_numpy)

    def _normalized_from_latent(self, latent, codes, genes, library_size, return_numpy):
        if library_size == "latent":
            raise ConfigError('library_size="latent" needs adata to infer the library.')
        latent = np.atleast_2d(np.asarray(latent, dtype=self.dtype))
        if codes is None:
            codes = [None]
        scale = np.mean([self.decode(latent, batch_index=c).scale for c in codes], axis=0)
        expr = (scale * library_size)[:, genes]
        return self._frame(expr, np.arange(len(expr)).astype(str), genes, return_numpy)

    def _gene_columns(self, gene_list: Sequence[str] | None) -> np.ndarray:
        if gene_list is None:
            return np.arange(self.config.n_input)
        index = {g: i for i, g in enumerate(self.spec.data.var_names)}
        missing = [g for g in gene_list if g not in index]
        if missing:
            raise IncompatibleDataError(f"Genes not in the model: {preview(missing)}.")
        return np.array([index[g] for g in gene_list], dtype=np.int64)

    def get_reconstruction_error(
        self,
        adata: Any,
        *,
        latent: Any = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = False,
        allow_non_integer: bool = False,
        layer: str | None = anndata_io.AUTO,
        use_raw: bool = False,
    ) -> np.ndarray | float:
        """Per-cell negative log-likelihood at the posterior mean (or at ``latent``), (n_obs,).

        scvi-tools returns ``{"reconstruction_loss": ...}`` from one posterior draw; this is the
        deterministic counterpart. ``return_mean=True`` gives the mean over cells.
        """
        data = self.prepare(
            self._subset(adata, indices),
            allow_non_integer=allow_non_integer,
            layer=layer,
            use_raw=use_raw,
        )
        latent = None if latent is None else self._check_latent(latent, data.n_obs)

        def fn(mb: anndata_io.Minibatch) -> dict:
            x = jnp.asarray(mb.x)
            _, z, lib = _encode(self.params, x, config=self.config)
            if latent is not None:
                z = jnp.asarray(_pad_rows(latent[mb.start : mb.start + mb.n_valid], len(mb.x)))
            nll = _nll(
                self.params,
                x,
                z,
                lib,
                jnp.asarray(mb.batch),
                jnp.asarray(mb.label),
                config=self.config,
            )
            return {"nll": nll}

        nll = self._map(data, batch_size, fn)["nll"]
        return float(nll.mean()) if return_mean else nll

    def get_affine_decoder(self) -> AffineDecoders:
        """The decoder as an affine map inside a softmax (BatchNorm, bias and batch folded in)."""
        with self.precision():
            p = self.params.decoder
            to_np = lambda a: jax.tree.map(np.asarray, a)  # noqa: E731
            scale = to_np(_affine_head(p.factor, config=self.config))
            zi = None
            if self.config.gene_likelihood == "zinb":
                zi = to_np(_affine_head(p.dropout, config=self.config))
        return AffineDecoders(scale=scale, zi_logits=zi)

    def get_loadings(self):
        """Effective loadings, genes x latents (DataFrame, columns ``Z_0 ...``), BatchNorm folded."""
        import pandas as pd

        loadings = self.get_affine_decoder().scale.loadings
        return pd.DataFrame(loadings, index=self.var_names, columns=self.latent_names)


class DRVI(_Model):
    """A DRVI model in JAX (drvi-py 0.2.x or scvi-tools 1.5's ``scvi.external.DRVI``): the query
    methods a LinearSCVI model has, less the linear-only ones (``get_loadings``,
    ``get_affine_decoder``); deterministic at the posterior mean. ``ldj.ablate`` takes it, and
    ``linear_decoder_jax.drvi_scores`` computes DRVI's own interpretability scores."""

    @property
    def config(self) -> Any:
        """The ``families.drvi.DRVIConfig``."""
        return self.spec.model

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DRVI(n_input={c.n_input}, n_latent={c.n_latent}, n_split={c.n_split}, "
            f"gene_likelihood={c.gene_likelihood!r}, aggregation={c.split_aggregation!r}, "
            f"dtype={self.dtype!r})"
        )

    def get_latent_representation(
        self,
        adata: Any,
        *,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        layer: str | None = anndata_io.AUTO,
        use_raw: bool = False,
    ) -> np.ndarray:
        """Posterior mean of each cell (n_obs, n_latent)."""
        data = self.prepare(self._subset(adata, indices), layer=layer, use_raw=use_raw)
        return self.encode(data, batch_size=batch_size)["z"]

    def _decoded(
        self, adata: Any, indices: Any, latent: Any, batch_size: int | None, fn: Callable
    ) -> tuple[anndata_io.CellData, dict[str, np.ndarray]]:
        data = self.prepare(self._subset(adata, indices))
        latent = None if latent is None else self._check_latent(latent, data.n_obs)

        def one(mb: anndata_io.Minibatch) -> dict:
            x, b, lab = (jnp.asarray(a) for a in (mb.x, mb.batch, mb.label))
            enc = pipeline.encode(self.family, self.params, x, b, lab)
            z = enc.z
            if latent is not None:
                z = jnp.asarray(_pad_rows(latent[mb.start : mb.start + mb.n_valid], len(mb.x)))
            return fn(x, z, enc.log_library, b, lab)

        return data, self._map(data, batch_size, one)

    def get_normalized_expression(
        self,
        adata: Any,
        *,
        indices: Sequence[int] | None = None,
        latent: Any = None,
        batch_size: int | None = None,
        return_numpy: bool | None = None,
    ):
        """Normalized expression at the posterior mean (or at ``latent``), cells x genes: a
        DataFrame like scvi-tools', or numpy with ``return_numpy=True``."""
        family, params = self.family, self.params

        def fn(x, z, lib, b, lab) -> dict:
            return {"scale": _decode_family(family, params, z, lib, b, lab).scale}

        data, out = self._decoded(adata, indices, latent, batch_size, fn)
        genes = np.arange(len(self.var_names))
        return self._frame(out["scale"], data.obs_names, genes, return_numpy)

    def get_reconstruction_error(
        self,
        adata: Any,
        *,
        indices: Sequence[int] | None = None,
        latent: Any = None,
        batch_size: int | None = None,
        return_mean: bool = False,
    ) -> np.ndarray | float:
        """Per-cell negative log-likelihood (nats) at the posterior mean (or at ``latent``), with
        the model's own likelihood and the observed library."""
        family, params = self.family, self.params

        def fn(x, z, lib, b, lab) -> dict:
            return {"nll": _nll_family(family, params, x, z, lib, b, lab)}

        _, out = self._decoded(adata, indices, latent, batch_size, fn)
        return float(out["nll"].mean()) if return_mean else out["nll"]


@functools.partial(jax.jit, static_argnums=0)
def _decode_family(family: Family, params, z, log_library, batch, label):
    return family.decode(params, z, log_library, batch, label)


@functools.partial(jax.jit, static_argnums=0)
def _nll_family(family: Family, params, x, z, log_library, batch, label):
    return -family.log_prob(x, family.decode(params, z, log_library, batch, label)).sum(-1)


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    return a if len(a) == n else np.pad(a, ((0, n - len(a)), (0, 0)))


def ablate(
    model_: LinearSCVI | DRVI,
    adata: Any,
    *,
    latents: Sequence[int] | None = options.SweepOptions.latents,
    baseline: ablation.BaselineSpec = options.SweepOptions.baseline,
    mode: options.Mode = options.SweepOptions.mode,
    unit: options.Unit = options.SweepOptions.unit,
    groupby: str | None = options.DataOptions.groupby,
    groupby_max: int = options.DataOptions.groupby_max,
    layer: str | None = options.DataOptions.layer,
    use_raw: bool = options.DataOptions.use_raw,
    batch_size: int | None = options.ExecutionOptions.batch_size,
    library: options.LibraryChoice = options.SweepOptions.library,
    n_samples: int = options.SweepOptions.n_samples,
    seed: int = options.SweepOptions.seed,
    allow_non_integer: bool = options.DataOptions.allow_non_integer,
    progress: bool = options.ExecutionOptions.progress,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    devices: int | None = options.ExecutionOptions.devices,
    shard: tuple[int, int] | None = options.ExecutionOptions.shard,
    refit: bool = options.RefitOptions.refit,
    refit_steps: int | None = options.RefitOptions.refit_steps,
    refit_tol: float = options.RefitOptions.refit_tol,
    optimizer: options.Optimizer = options.RefitOptions.optimizer,
    gene_scores: bool = options.SweepOptions.gene_scores,
    shapley: options.Shapley | None = options.ShapleyOptions.shapley,
    n_permutations: int = options.ShapleyOptions.n_permutations,
    traverse: bool = options.TraversalOptions.traverse,
    traverse_grid: Any = options.TraversalOptions.traverse_grid,
    traverse_steps: int = options.TraversalOptions.traverse_steps,
    distributed: bool = options.DistributedOptions.distributed,
    coordinator: str | None = options.DistributedOptions.coordinator,
    num_processes: int | None = options.DistributedOptions.num_processes,
    process_id: int | None = options.DistributedOptions.process_id,
    join_timeout: float = options.DistributedOptions.join_timeout,
    heartbeat_timeout: float = options.DistributedOptions.heartbeat_timeout,
) -> AblationResult:
    """Score every latent for every cell: how much worse the reconstruction gets without it.

    Parameters
    ----------
    model_
        A model from :func:`load`.
    adata
        Cells to score: an AnnData, or the path of an ``.h5ad`` file or ``.zarr`` store (folder
        or zip) that is then streamed from disk in row chunks.
    latents
        Indices of the latents to ablate (default all), in the order of the result columns.
    baseline
        Value a removed latent is set to: "zero", "mean" or "median" over the input cells (of the
        decoder input), a number, or one value per latent.
    mode
        "drop": latent k at its baseline. "keep": every latent except k at its baseline.
    unit
        "latent": one result column per latent; "split": one per split of a decoder that is
        additive over splits (DRVI), the split removed from the aggregation ("drop") or kept
        alone ("keep").
    groupby
        obs column for group summaries (mean, median, fraction of cells with delta > 0). Cells
        without a value are counted and left out of the tables.
    groupby_max
        A numeric ``groupby`` column with more distinct values is refused (bin it first).
    layer
        Where the counts are: a layer name, None or "X" for X; "auto" (default): the layer the
        model was set up with when the data has it, else X (with a warning).
    use_raw
        Read the counts from ``adata.raw`` (genes matched by ``adata.raw.var_names``).
    batch_size
        Cells per minibatch; by default chosen from the problem size and device.
    library
        "model": the model's own library (observed or q(l|x) mean); "observed": log total counts.
    n_samples
        0 scores at the posterior mean; > 0 averages over draws z ~ q(z|x) (explicit key from
        ``seed``) and adds the Monte-Carlo standard error ``delta_nll_se``.
    output
        Write the result h5ad here while sweeping (atomically; the large arrays go straight to
        disk and the returned result memory-maps them). Needs ``overwrite`` to replace a file.
    devices
        Number of local devices to split each minibatch over (default: all visible).
    shard
        ``(i, n)``: score only the i-th of n equal row ranges (join parts with ``ldj merge``).
        Baseline statistics are still taken over all input cells.
    refit
        Also score each latent's *unique* contribution, ``unique_delta_nll``: how much of the MAP
        objective ``NLL + 0.5 * ||z||^2`` is lost when latent k is held at its baseline and the
        other latents are re-fitted per cell (``linear_decoder_jax.refit``). ``mode="drop"`` only;
        for "ln" models the baseline of every ablated latent must lie in (0, 1) (e.g. "mean").
    refit_steps, refit_tol, optimizer
        Step budget per fit (default 100 for "lbfgs", 2000 for "adam"), gradient-norm tolerance
        for early stopping, and the optax optimiser: "lbfgs" (zoom line search) or "adam".
    gene_scores
        Also, per group of ``groupby`` and over all cells, each gene's mean NLL change and log fold
        change per ablated latent (``result.gene_table``), reduced inside the same pass
        (``linear_decoder_jax.attribution``). Needs ``n_samples=0``.
    shapley
        "exact" (K <= 12), "permutation", or "auto" (exact up to K = 12, permutation above: a
        32-latent DRVI gets permutations): the gain ``gain_nll`` (NLL with every latent at its
        baseline minus the full NLL) and its Shapley decomposition over all K latents,
        ``shapley_nll``, rows summing to the gain (``result.gain``, ``result.shapley``,
        ``result.explained(groupby)``). ``uns["ablation"]["shapley"]`` records the method used.
    n_permutations
        Random permutations for ``shapley="permutation"`` (or "auto" above K = 12; even, >= 4: antithetic pairs drawn
        from ``seed``); adds the standard error ``shapley_nll_se``.
    traverse, traverse_grid, traverse_steps
        Also traverse each ablated latent (``linear_decoder_jax.traversal``, in the same pass):
        in every cell set it to each value of a grid, the other latents at the cell's posterior
        mean, and record per ``groupby`` group (and all cells) each gene's mean log fold change
        against the cell's own reconstruction, ``traverse_lfc`` (groups, A, steps, genes), and
        the mean NLL change, ``traverse_delta_nll`` (groups, A, steps); plot with
        ``ldj.pl.traversal``. The grid: "range" (default), ``traverse_steps`` values evenly
        spaced from the latent's 1st to 99th percentile over the input cells' decoder inputs;
        "quantile", those quantiles at evenly spaced probabilities; or values, one list for every
        latent or one row per ablated latent. Latents only (``unit="latent"``), ``n_samples=0``;
        ``mode`` does not apply. Recorded: ``settings["traverse_values"]`` (A, steps).
    distributed, coordinator, num_processes, process_id, join_timeout, heartbeat_timeout
        Run as one process of a multi-process job (``linear_decoder_jax.distributed``): every
        process calls this with the same arguments; ``jax.distributed`` joins them (explicit
        ``coordinator="HOST:PORT"``, ``num_processes``, ``process_id``, or its auto-detection on
        Slurm, Open MPI and TPU pods) into one global mesh over every process's devices (as many
        per process), each feeding its own rows; ``refit`` runs per process on its own devices
        (it is per cell); process 0 writes ``output`` (required). Joining waits up to
        ``join_timeout`` seconds; then a process killed or frozen for ``heartbeat_timeout``
        seconds, or any failure, ends every process with a one-line error and no output. Must
        be called before any other JAX computation.

    Returns
    -------
    AblationResult
        AblationResult with ``delta_nll`` (n_obs, n_ablated) in nats; positive means the latent was
        needed to explain the cell. In a distributed run every process returns the whole result,
        read from ``output`` (shared storage) once process 0 has written it.
    """
    kwargs = {
        k: v for k, v in locals().items() if k not in ("model_", "adata", "output", "overwrite")
    }
    opts = options.split(kwargs)  # every option checked here, before any work
    dist: options.DistributedOptions = opts.pop(options.DistributedOptions)
    if output is not None:
        h5ad_name(output)
        check_destination(output, overwrite=overwrite)
    cluster = None
    if dist.distributed:
        if output is None or shard is not None:
            msg = (
                "A distributed run writes one output and splits the rows itself: pass output= "
                "(CLI: -o) and no shard= (CLI: --shard)."
            )
            raise ConfigError(msg)
        from linear_decoder_jax import distributed as distributed_

        cluster = distributed_.initialize(
            coordinator=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            join_timeout=join_timeout,
            heartbeat_timeout=heartbeat_timeout,
        )
    device_list = pipeline.resolve_devices(devices)
    with contextlib.ExitStack() as stack:
        if isinstance(adata, str | os.PathLike):
            adata = stack.enter_context(sources.StoreSource(adata))
        data_opts = opts[options.DataOptions]
        full = model_.prepare(
            adata,
            allow_non_integer=data_opts.allow_non_integer,
            layer=data_opts.layer,
            use_raw=data_opts.use_raw,
        )
        with model_.precision():
            run_model = model_.run_model()
        if cluster is not None:
            from linear_decoder_jax import distributed as distributed_

            assert output is not None  # checked above
            return distributed_.ablate(
                run_model,
                adata,
                full,
                opts,
                devices=device_list,
                output=output,
                cluster=cluster,
                overwrite=overwrite,
            )
        from linear_decoder_jax import assemble

        return assemble.ablate(
            run_model, adata, full, opts, devices=device_list, output=output, overwrite=overwrite
        )
