"""The converted model as a Flax (linen) module carrying its weights: differentiate it, fine-tune it.

:func:`create` turns a config and a parameter tree (``model.config, model.host_params`` of a
loaded :class:`~linear_decoder_jax.LinearSCVI`) into an :class:`LDVAE` module and its
``variables``. Every method calls the pure functions of :mod:`linear_decoder_jax.model`, so the
module computes exactly what they compute; it adds what a Flax user expects on top: a
``variables`` dict with one entry per part of scvi-tools' LDVAE (``z_encoder``, ``l_encoder``,
``decoder``, ``px_r`` and the library prior), ``apply``, and optax training through
:func:`param_labels`. :func:`to_params` is the way back: trained ``variables`` into an
``LDVAEParams`` tree (``LinearSCVI.from_flax`` makes a model of it, to save and ablate).

Why linen rather than nnx: a linen module is stateless. Its weights are an explicit pytree passed
to ``apply``, the same ``LDVAEParams`` leaves that ``jax.grad``, ``jit``, ``vmap``, optax and orbax
take as they are, and a frozen/trainable split is a label tree over that dict. An nnx module holds
its weights as mutable object state that we would split back out (``nnx.split``) for every jitted
or differentiated call, and the eval-mode model has no state (dropout, running statistics) that
nnx would manage for us.

Examples
--------
>>> import linear_decoder_jax as ldj
>>> from linear_decoder_jax.demo import demo_files
>>> model = ldj.load(demo_files() / "model.pt")
>>> ldvae, variables = ldj.module.create(model.config, model.host_params)
>>> sorted(variables["params"])
['decoder', 'l_encoder', 'library_log_means', 'library_log_vars', 'px_r', 'z_encoder']
>>> variables["params"]["decoder"].factor.dense.kernel.shape  # (n_latent + n_batch, n_vars)
(8, 230)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import model
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.params import LDVAEParams, abstract_params

Array = jax.Array
Variables = dict[str, dict[str, Any]]
Label = Literal["trainable", "frozen"]


class LDVAE(nn.Module):
    """Eval-mode scvi-tools LDVAE (LinearSCVI's module); weights live in ``variables["params"]``.

    Build it with :func:`create`. ``batch`` and ``label`` are int codes (n_obs,); ``z`` is the
    decoder input (``softmax(qz_m)`` for "ln" models) and ``log_library`` is (n_obs, 1).
    """

    config: LDVAEConfig

    def setup(self) -> None:
        template = abstract_params(self.config)
        parts: dict[str, Any] = {
            name: self.param(name, lambda _key, spec=spec: _zeros(spec))
            for name, spec in template._asdict().items()
            if spec is not None
        }
        fields: dict[str, Any] = {name: parts.get(name) for name in LDVAEParams._fields}
        self.ldvae = LDVAEParams(**fields)

    def inference(self, x: Array) -> model.Posterior:
        """q(z|x) and q(l|x) of counts ``x`` (n_obs, n_vars): :func:`model.inference`."""
        return model.inference(self.ldvae, x, config=self.config)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Decoder input at the posterior mean (n_obs, n_latent) and the log library (n_obs, 1)."""
        post = self.inference(x)
        z = model.z_transformation(post.qz_m, config=self.config)
        return z, model.library(post, x, config=self.config)

    def generative(self, z: Array, log_library: Array, batch: Array, label: Array) -> model.Decoded:
        """Decode ``z`` (n_obs, n_latent): :func:`model.generative`."""
        return model.generative(self.ldvae, z, log_library, batch, label, config=self.config)

    def nll(
        self,
        x: Array,
        batch: Array,
        label: Array,
        *,
        z: Array | None = None,
        log_library: Array | None = None,
    ) -> Array:
        """Per-cell negative log-likelihood -log p(x | z, library) (n_obs,).

        ``z`` and ``log_library`` default to the encoder's (:meth:`encode`), which is the
        reconstruction error ``LinearSCVI.get_reconstruction_error`` reports; pass ``z`` to score
        (or differentiate at) another decoder input.
        """
        if z is None or log_library is None:
            z_enc, lib_enc = self.encode(x)
            z = z_enc if z is None else z
            log_library = lib_enc if log_library is None else log_library
        decoded = self.generative(z, log_library, batch, label)
        return -model.log_likelihood(x, decoded, config=self.config)

    def __call__(self, x: Array, batch: Array, label: Array) -> model.Decoded:
        """Reconstruction of ``x`` decoded at the posterior mean (what scvi-tools samples around)."""
        z, log_library = self.encode(x)
        return self.generative(z, log_library, batch, label)


def _zeros(spec: jax.ShapeDtypeStruct) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


def create(config: LDVAEConfig, params: LDVAEParams) -> tuple[LDVAE, Variables]:
    """The module of ``config`` and its ``variables`` holding ``params`` (as jax arrays).

    Parameters
    ----------
    config
        The model's configuration (``LinearSCVI.config``).
    params
        Its weights (``LinearSCVI.host_params``), checked leaf by leaf against ``config``.
        float64 weights stay float64 only where ``jax.enable_x64`` is on.

    Returns
    -------
    tuple of LDVAE and dict
        The module and ``{"params": {"z_encoder": ..., "l_encoder": ..., "decoder": ...,
        "px_r": ..., "library_log_means": ..., "library_log_vars": ...}}`` (the library prior
        only for models that have one), ready for ``module.apply(variables, ...)``.
    """
    template = abstract_params(config)
    # None parts (a model without a library prior) are empty subtrees: a missing or an extra part
    # changes the structure
    got: Any = jax.tree.structure(params)
    want: Any = jax.tree.structure(template)
    if got != want:
        msg = (
            f"Expected parameters with the structure of abstract_params(config), got {got} instead."
        )
        raise ConfigError(msg)

    def check(path: tuple, spec: jax.ShapeDtypeStruct, value: Any) -> Array:
        if value is None:  # a part the configuration has (e.g. the library prior) is missing
            msg = (
                "Expected parameters with the structure of abstract_params(config), got None at "
                f"{jax.tree_util.keystr(path)} instead."
            )
            raise ConfigError(msg)
        if tuple(value.shape) != spec.shape:
            msg = (
                f"Parameter {jax.tree_util.keystr(path)}: expected shape {spec.shape}, "
                f"got {tuple(value.shape)} instead."
            )
            raise ConfigError(msg)
        return jnp.asarray(value)

    arrays = jax.tree_util.tree_map_with_path(check, template, params)
    variables = {
        "params": {name: part for name, part in arrays._asdict().items() if part is not None}
    }
    return LDVAE(config), variables


def to_params(config: LDVAEConfig, variables: Variables) -> LDVAEParams:
    """The parameter tree held by ``variables`` (as numpy arrays): the inverse of :func:`create`.

    Parameters
    ----------
    config
        The configuration the variables were made for (``LinearSCVI.config``).
    variables
        The module's variables, e.g. after optax steps: ``{"params": {"z_encoder": ..., ...}}``
        with one part per non-empty field of ``abstract_params(config)``.

    Returns
    -------
    LDVAEParams
        Numpy leaves, checked leaf by leaf against ``abstract_params(config)``: the same parts,
        the same tree in each part, the same shapes, floating and finite values.

    Examples
    --------
    >>> import linear_decoder_jax as ldj
    >>> from linear_decoder_jax.demo import demo_files
    >>> model = ldj.load(demo_files() / "model.pt")
    >>> ldvae, variables = model.to_flax()
    >>> params = ldj.module.to_params(model.config, variables)
    >>> params.decoder.factor.dense.kernel.shape  # (n_latent + n_batch, n_vars)
    (8, 230)
    """
    template = abstract_params(config)
    parts = variables.get("params") if hasattr(variables, "get") else None
    if parts is None or not hasattr(parts, "keys"):
        msg = (
            "Expected Flax variables {'params': {...}} (module.create), got "
            f"{type(variables).__name__} without a 'params' dict instead."
        )
        raise ConfigError(msg)
    want = [name for name, spec in template._asdict().items() if spec is not None]
    missing, extra = sorted(set(want) - set(parts)), sorted(set(parts) - set(want))
    if missing or extra:
        msg = (
            f"Expected the parts {want} in variables['params'], got {sorted(parts)} instead "
            f"(missing {missing}, unexpected {extra})."
        )
        raise ConfigError(msg)
    fields: dict[str, Any] = {n: parts[n] if n in want else None for n in LDVAEParams._fields}
    params = LDVAEParams(**fields)
    for name in want:
        got: Any = jax.tree.structure(params._asdict()[name])
        expected: Any = jax.tree.structure(template._asdict()[name])
        if got != expected:
            msg = f"Part {name!r}: expected the tree {expected}, got {got} instead."
            raise ConfigError(msg)

    def check(path: tuple, spec: jax.ShapeDtypeStruct, value: Any) -> np.ndarray:
        where = jax.tree_util.keystr(path)
        array = np.asarray(value)
        if array.shape != spec.shape:
            msg = f"Parameter {where}: expected shape {spec.shape}, got {array.shape} instead."
            raise ConfigError(msg)
        if not np.issubdtype(array.dtype, np.floating):
            msg = f"Parameter {where}: expected a floating dtype, got {array.dtype} instead."
            raise ConfigError(msg)
        if not np.isfinite(array).all():
            msg = (
                f"Parameter {where} holds NaN or infinite values: the training diverged (lower "
                "the learning rate)."
            )
            raise ConfigError(msg)
        return array

    return jax.tree_util.tree_map_with_path(check, template, params)


def param_labels(variables: Variables, *, trainable: Sequence[str] = ("decoder",)) -> Variables:
    """Label each part of ``variables`` "trainable" or "frozen", for ``optax.multi_transform``.

    Parameters
    ----------
    variables
        The module's variables (:func:`create`).
    trainable
        Parts to train, among ``variables["params"]``'s keys; the default fine-tunes the linear
        decoder (both heads) and keeps the encoders, ``px_r`` and the library prior fixed.

    Returns
    -------
    dict
        A prefix of ``variables`` with one label per part. Pair "frozen" with
        ``optax.set_to_zero()``: frozen weights then never change.
    """
    names = variables["params"]
    unknown = sorted(set(trainable) - set(names))
    if unknown:
        msg = f"Expected trainable parts among {sorted(names)}, got {unknown} instead."
        raise ConfigError(msg)
    labels: dict[str, Label] = {n: "trainable" if n in trainable else "frozen" for n in names}
    return {"params": labels}
