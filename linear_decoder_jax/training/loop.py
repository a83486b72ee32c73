"""The training loop: scvi-tools 1.4.2's ``TrainingPlan`` + ``Trainer`` for LinearSCVI, in JAX.

One jit-compiled function runs an epoch's minibatches in chunks of :data:`CHUNK` (a loop inside
the compiled program) when the counts fit in memory (they are put on the device once), the last,
smaller minibatch padded with masked cells: one compilation serves the whole run. A streamed file
is read minibatch by minibatch (the cells of each minibatch sorted, so an h5ad is read with
contiguous slices where it can be), and the same compiled step runs on each. Per-epoch metrics
are those scvi-tools logs in ``history_``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.params import BatchNorm, Dense, Encoder, Layer, LDVAEParams, LinearDecoder
from linear_decoder_jax.training import objective, optim

Array = jax.Array
Optimizer = Literal["Adam", "AdamW"]
Monitor = Literal["elbo_validation", "reconstruction_loss_validation", "kl_local_validation"]

#: history_ keys scvi-tools 1.4.2 writes per epoch (validation ones only when validation runs)
TRAIN_KEYS = ("train_loss", "elbo_train", "reconstruction_loss_train", "kl_local_train",
              "kl_global_train")  # fmt: skip
VALIDATION_KEYS = ("validation_loss", "elbo_validation", "reconstruction_loss_validation",
                   "kl_local_validation", "kl_global_validation")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Training options with scvi-tools 1.4.2's names and defaults (``TrainingPlan``,
    ``Trainer``, ``DataSplitter``); ``max_epochs`` is resolved from the data when None."""

    max_epochs: int | None = None
    batch_size: int = 128
    train_size: float | None = None
    validation_size: float | None = None
    shuffle_set_split: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    optimizer: Optimizer = "Adam"
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: Monitor = "elbo_validation"
    early_stopping: bool = False
    early_stopping_monitor: Monitor = "elbo_validation"
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    check_val_every_n_epoch: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, literal in (
            ("optimizer", Optimizer),
            ("lr_scheduler_metric", Monitor),
            ("early_stopping_monitor", Monitor),
        ):
            if getattr(self, name) not in get_args(literal):
                msg = f"Expected {name} to be one of {get_args(literal)}, got {getattr(self, name)!r} instead."
                raise ConfigError(msg)
        positive = ["batch_size", "early_stopping_patience", "lr_patience"]
        for name in positive + ["max_epochs", "check_val_every_n_epoch"]:
            value = getattr(self, name)
            if value is None and name not in positive:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"Expected {name} to be a positive integer, got {value!r} instead."
                raise ConfigError(msg)
        if self.batch_size < 2:
            raise ConfigError("Expected batch_size >= 2 (train-mode BatchNorm needs two cells).")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"Expected {name} > 0, got {getattr(self, name)!r} instead.")
        if self.weight_decay < 0:
            raise ConfigError(f"Expected weight_decay >= 0, got {self.weight_decay!r} instead.")
        if self.min_kl_weight > self.max_kl_weight:
            msg = f"min_kl_weight={self.min_kl_weight} is larger than max_kl_weight={self.max_kl_weight}."
            raise ConfigError(msg)

    @property
    def validates(self) -> bool:
        """Whether validation runs (scvi-tools: only when asked, or for early stopping or the
        learning-rate schedule)."""
        return bool(
            self.check_val_every_n_epoch or self.early_stopping or self.reduce_lr_on_plateau
        )

    @property
    def val_every(self) -> int:
        return self.check_val_every_n_epoch or 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StepSettings(NamedTuple):
    """The static part of a compiled step (hashable)."""

    dropout_rate: float
    n_epochs_kl_warmup: int | None
    n_steps_kl_warmup: int | None
    max_kl_weight: float
    min_kl_weight: float
    eps: float
    weight_decay: float
    decoupled: bool
    bn_train: tuple[bool, bool] = (True, True)  # encoders, decoder (False: frozen)
    batch_size: int | None = None  # smaller minibatches are padded to it (None: not padded)


def kl_weight(epoch: Any, step: Any, s: StepSettings) -> Any:
    """``_compute_kl_weight`` of scvi-tools (epoch warm-up wins over step warm-up)."""
    slope = s.max_kl_weight - s.min_kl_weight
    if s.n_epochs_kl_warmup:
        return jnp.where(
            epoch < s.n_epochs_kl_warmup,
            slope * (epoch / s.n_epochs_kl_warmup) + s.min_kl_weight,
            s.max_kl_weight,
        )
    if s.n_steps_kl_warmup:
        return jnp.where(
            step < s.n_steps_kl_warmup,
            slope * (step / s.n_steps_kl_warmup) + s.min_kl_weight,
            s.max_kl_weight,
        )
    return jnp.asarray(s.max_kl_weight)


def make_optimizer(config: LDVAEConfig, s: StepSettings, lr: float) -> optax.GradientTransformation:
    """torch's Adam/AdamW over the leaves torch trains (:func:`objective.trainable_mask`)."""
    return optim.torch_adam(
        lr,
        eps=s.eps,
        weight_decay=s.weight_decay,
        decoupled=s.decoupled,
        mask=objective.trainable_mask(config),
    )


# --------------------------------------------------------------------------------------------
# Compiled steps
# --------------------------------------------------------------------------------------------


def train_steps(
    params: LDVAEParams,
    opt_state: Any,
    x_all: Array | None,
    batch_all: Array,
    label_all: Array,
    rows: np.ndarray,
    key: Array,
    epoch: Array,
    step0: int,
    grad_mask: LDVAEParams | None = None,
    *,
    config: LDVAEConfig,
    settings: StepSettings,
    put_rows: Callable[[np.ndarray], Array] = jnp.asarray,
    put_scalar: Callable[[int], Any] = jnp.asarray,
) -> tuple[LDVAEParams, Any, Array]:
    """``rows.shape[0]`` optimizer steps, minibatch ``i`` being the cells ``rows[i]`` (host
    indices into the global ``x_all``) of ``x_all``; returns params, optimizer state and the summed metrics (loss * n, reconstruction,
    kl_local). ``grad_mask``: 0/1 arrays like the params; entries at 0 are never moved (query
    mapping freezes the reference's weights this way).

    The steps run in compiled chunks of :data:`CHUNK` minibatches (a loop with the chunk's
    number of steps as a traced bound), and a minibatch smaller than ``settings.batch_size`` (an
    epoch's last) is padded with masked cells (``objective.train_loss``'s ``valid``), so that
    one compiled program serves every epoch, its last minibatch included. ``put_rows`` and
    ``put_scalar`` place each chunk of rows and each step counter as the caller places its arrays
    (split over the devices of one or several processes; the padding is added to the global
    width before the split)."""
    assert x_all is not None, "x_all: the counts, on the device"
    host = np.asarray(rows, np.int32)
    width = max(host.shape[1], settings.batch_size or 0)
    host = np.pad(host, ((0, -len(host) % CHUNK), (0, width - host.shape[1])), constant_values=-1)
    total = jnp.zeros(3)
    for start in range(0, rows.shape[0], CHUNK):
        n_steps = min(CHUNK, rows.shape[0] - start)
        params, opt_state, sums = _train_steps(
            params, opt_state, x_all, batch_all, label_all, put_rows(host[start : start + CHUNK]),
            key, epoch, put_scalar(step0 + start), put_scalar(n_steps), grad_mask,
            config=config, settings=settings,
        )  # fmt: skip
        total = total + sums
    return params, opt_state, total


#: minibatches per compiled call of :func:`train_steps`
CHUNK = 32


@functools.partial(
    jax.jit, static_argnames=("config", "settings"), donate_argnames=("params", "opt_state")
)
def _train_steps(
    params: LDVAEParams,
    opt_state: Any,
    x_all: Array,
    batch_all: Array,
    label_all: Array,
    rows: Array,
    key: Array,
    epoch: Array,
    step0: Array,
    n_steps: Array,
    grad_mask: LDVAEParams | None,
    *,
    config: LDVAEConfig,
    settings: StepSettings,
) -> tuple[LDVAEParams, Any, Array]:
    """The first ``n_steps`` minibatches of ``rows`` (CHUNK, batch_size); a row index of -1 is
    a padding cell."""
    tx = make_optimizer(config, settings, 1.0)

    def body(i, carry):
        params, opt_state, total = carry
        rows_i = rows[i]
        step = step0 + i
        valid = (rows_i >= 0).astype(x_all.dtype)
        idx = jnp.maximum(rows_i, 0)  # padding reads cell 0, masked out of every statistic
        x, b, lab = x_all[idx], batch_all[idx], label_all[idx]
        w = kl_weight(epoch, step, settings)
        noise = objective.draw_noise(
            jax.random.fold_in(key, step),
            idx.shape[0],
            config=config,
            dropout_rate=settings.dropout_rate,
            dtype=x.dtype,
        )

        def loss_fn(p):
            parts, new = objective.train_loss(
                p, x, b, lab, noise, w, config=config, dropout_rate=settings.dropout_rate,
                bn_train=settings.bn_train, valid=valid,
            )  # fmt: skip
            return parts.loss, (parts, new)

        (loss, (parts, new)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if grad_mask is not None:
            grads = jax.tree.map(jnp.multiply, grads, grad_mask)
        updates, opt_state = tx.update(grads, opt_state, new)
        if grad_mask is not None:
            updates = jax.tree.map(jnp.multiply, updates, grad_mask)
        params = optax.apply_updates(new, updates)
        sums = jnp.stack([
            loss * valid.sum(),
            (parts.reconstruction_loss * valid).sum(),
            ((parts.kl_z + parts.kl_l) * valid).sum(),
        ])  # fmt: skip
        return params, opt_state, total + sums

    init = (params, opt_state, jnp.zeros(3, x_all.dtype))
    return jax.lax.fori_loop(0, n_steps, body, init)


@functools.partial(jax.jit, static_argnames=("config",))
def eval_steps(
    params: LDVAEParams,
    x_all: Array,
    batch_all: Array,
    label_all: Array,
    rows: Array,
    key: Array,
    weight: Array,
    *,
    config: LDVAEConfig,
) -> Array:
    """Validation metrics (eval mode) summed over the minibatches ``rows``."""

    def body(_, inputs):
        i, idx = inputs
        x, b, lab = x_all[idx], batch_all[idx], label_all[idx]
        kz, kl = jax.random.split(jax.random.fold_in(key, i))
        n = idx.shape[0]
        z_noise = jax.random.normal(kz, (n, config.n_latent), x.dtype)
        l_noise = jax.random.normal(kl, (n, 1), x.dtype)
        parts = objective.eval_loss(params, x, b, lab, z_noise, l_noise, weight, config=config)
        sums = jnp.stack(
            [parts.loss * n, parts.reconstruction_loss.sum(), (parts.kl_z + parts.kl_l).sum()]
        )
        return None, sums

    _, sums = jax.lax.scan(body, None, (jnp.arange(rows.shape[0]), rows))
    return sums.sum(axis=0)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def init_params(
    config: LDVAEConfig,
    key: Array,
    library_log_means: np.ndarray | None,
    library_log_vars: np.ndarray | None,
) -> LDVAEParams:
    """Fresh parameters drawn as torch initialises them: ``Linear`` weight and bias
    U(-1/sqrt(n_in), 1/sqrt(n_in)), BatchNorm gamma 1, beta 0, running mean 0 and variance 1,
    ``px_r`` standard normal; the library prior from the data (``_init_library_size``).

    Drawn on the host by numpy, seeded from ``key``: JAX's draws would compile one program per
    shape, seconds of a short training run."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def f32(a: Any) -> Array:
        return jnp.asarray(np.asarray(a, np.float32))  # a transfer, no compilation

    def dense(n_in: int, n_out: int, bias: bool = True) -> Dense:
        bound = 1.0 / math.sqrt(n_in)
        w = f32(rng.uniform(-bound, bound, (n_in, n_out)))
        b = f32(rng.uniform(-bound, bound, n_out)) if bias else None
        return Dense(w, b)

    def bn(n: int) -> BatchNorm:
        return BatchNorm(f32(np.ones(n)), f32(np.zeros(n)), f32(np.zeros(n)), f32(np.ones(n)))

    def encoder(n_out: int, n_layers: int) -> Encoder:
        g, h = config.n_input, config.n_hidden
        blocks = tuple(Layer(dense(g if i == 0 else h, h), bn(h)) for i in range(n_layers))
        return Encoder(blocks, dense(h, n_out), dense(h, n_out))

    n_in = config.n_latent + config.n_batch_onehot

    def head() -> Layer:
        return Layer(
            dense(n_in, config.n_input, bias=config.decoder_bias),
            bn(config.n_input) if config.decoder_batch_norm else None,
        )

    px_cols = {"gene": (), "gene-batch": (config.n_batch,), "gene-label": (config.n_labels,)}
    px_r = f32(rng.standard_normal((config.n_input, *px_cols[config.dispersion])))
    prior = None if config.use_observed_lib_size else library_log_means
    return LDVAEParams(
        z_encoder=encoder(config.n_latent, config.n_layers),
        l_encoder=encoder(1, 1),
        decoder=LinearDecoder(head(), head()),
        px_r=px_r,
        library_log_means=None if prior is None else f32(prior),
        library_log_vars=None if config.use_observed_lib_size else f32(library_log_vars),
    )


# --------------------------------------------------------------------------------------------
# Schedules of the Trainer
# --------------------------------------------------------------------------------------------


@dataclass
class Plateau:
    """torch ``ReduceLROnPlateau`` (mode "min", threshold_mode "abs", cooldown 0)."""

    factor: float
    patience: int
    threshold: float
    min_lr: float
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, value: float, lr: float) -> float:
        if value < self.best - self.threshold:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            new = max(lr * self.factor, self.min_lr)
            if lr - new > 1e-8:
                lr = new
            self.bad_epochs = 0
        return lr


@dataclass
class EarlyStopping:
    """Lightning's ``EarlyStopping`` (mode "min"), as scvi-tools' ``LoudEarlyStopping`` uses it."""

    patience: int
    min_delta: float
    best: float = math.inf
    wait: int = 0
    reason: str | None = None

    def stop(self, value: float, monitor: str) -> bool:
        if not math.isfinite(value):
            self.reason = f"Monitored metric {monitor} = {value} is not finite."
            return True
        if value + abs(self.min_delta) < self.best:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.reason = (
                f"Monitored metric {monitor} did not improve in the last {self.wait} records. "
                f"Best score: {self.best:.3f}. Signaling Trainer to stop."
            )
            return True
        return False


def progress_line(epoch: int, max_epochs: int, record: dict[str, float]) -> str:
    parts = [f"Epoch {epoch + 1}/{max_epochs}", f"train_loss={record['train_loss']:.4g}"]
    if "validation_loss" in record:
        parts.append(f"validation_loss={record['validation_loss']:.4g}")
    return ", ".join(parts)


def _warn_no_validation(cfg: TrainConfig, n_val: int) -> None:
    if cfg.validates and n_val == 0:
        msg = (
            "Early stopping, reduce_lr_on_plateau and check_val_every_n_epoch need a validation "
            "set, and this split has none: pass train_size < 1 (or leave it None)."
        )
        raise ConfigError(msg)


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
