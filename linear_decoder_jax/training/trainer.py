"""``ldj.train``: train a LinearSCVI model on an AnnData (or a streamed h5ad/zarr file) in JAX."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import anndata_io, sources
from linear_decoder_jax.config import LDVAEConfig, ModelSpec
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError
from linear_decoder_jax.options import DistributedOptions
from linear_decoder_jax.params import LDVAEParams
from linear_decoder_jax.training import data as tdata
from linear_decoder_jax.training import loop, resume_state
from linear_decoder_jax.training.loop import TrainConfig

#: Above this many bytes of dense counts, minibatches are read from the matrix at each step
#: instead of being kept on the device.
IN_MEMORY_BYTES = 2 << 30


def _minibatches(indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(full minibatches (k, batch_size), the last partial one (1, r) or None); the cells of
    each minibatch sorted (an h5ad is read in order; the draws then fall on the same cells
    whether the counts are in memory or streamed)."""
    k = len(indices) // batch_size
    full = np.sort(indices[: k * batch_size].reshape(k, batch_size), axis=1)
    rest = np.sort(indices[k * batch_size :])
    return full, (rest[None, :] if len(rest) else None)


class _Placement:
    """Where arrays go: one device, or data parallel over a 1-D mesh "data" of ``devices`` (with
    a ``cluster``: this process's devices, and as many from every other process, process by
    process: one global mesh).

    Data parallel: weights, optimizer state and codes are replicated, each minibatch's cells are
    split across the devices (each process feeds its own contiguous share, :meth:`share`), and
    jit (GSPMD) inserts the reductions. BatchNorm's batch statistics are therefore those of the
    whole global minibatch (synchronised BatchNorm, as one device computes them), as are the
    gradients: a step on several devices is the step on one, up to the order of float32
    reductions. A minibatch whose size the device count does not divide (the last one of an
    epoch) runs replicated (every process feeds all of it).
    """

    def __init__(self, devices: list[Any] | None, cluster: Any = None):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.mesh: Mesh | None = None
        self.processes, self.index = 1, 0
        if cluster is not None:
            self.processes, self.index = cluster.num_processes, cluster.process_id
            k = len(devices or jax.local_devices())

            def local(p: int) -> list[Any]:
                own = (d for d in jax.devices() if d.process_index == p)
                return sorted(own, key=lambda d: d.id)[:k]

            devices = [d for p in range(self.processes) for d in local(p)]
        if devices is not None and len(devices) > 1:
            mesh = Mesh(np.asarray(devices), ("data",))
            self.mesh = mesh
            self._spec = lambda *names: NamedSharding(mesh, PartitionSpec(*names))

    def _split(self, n: int) -> bool:
        return self.mesh is not None and n % self.mesh.size == 0

    def share(self, n: int) -> slice:
        """The cells of a global minibatch of ``n`` that this process feeds."""
        if not self._split(n) or self.processes == 1:
            return slice(0, n)
        b = n // self.processes
        return slice(self.index * b, (self.index + 1) * b)

    def replicate(self, tree: Any) -> Any:
        if self.mesh is None:
            return tree
        if self.processes == 1:
            return jax.device_put(tree, self._spec())

        def put(a: Any) -> Any:  # every process holds the same values
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=a.dtype._impl)
            return jax.make_array_from_process_local_data(self._spec(), np.asarray(a))

        return jax.tree.map(put, tree)

    def scalar(self, value: int) -> Any:
        """An int32 scalar argument of a compiled step (a global one between processes)."""
        if self.processes == 1:
            return jnp.asarray(value)
        return self.replicate(np.asarray(value, np.int32))

    def cells(self, array: Any, axis: int, n: int | None = None) -> jax.Array:
        """A global array whose cell axis ``axis`` (``n`` cells, default ``array``'s) is split
        across the devices, from this process's share ``array`` of it (:meth:`share`)."""
        n = np.shape(array)[axis] if n is None else n
        if self.mesh is None or not self._split(n):
            return self.replicate(jnp.asarray(array) if self.processes == 1 else array)
        names: list[str | None] = [None] * np.ndim(array)
        names[axis] = "data"
        shape = list(np.shape(array))
        shape[axis] = n
        return jax.make_array_from_process_local_data(
            self._spec(*names), np.asarray(array), tuple(shape)
        )

    def host(self, tree: Any) -> Any:
        """Numpy copies of (global) arrays, on every process."""
        from jax.experimental import multihost_utils

        def get(a: Any) -> np.ndarray:
            if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
                return np.asarray(a)
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))

        return jax.tree.map(get, tree)


def _minibatch(
    cells: anndata_io.CellData, order: np.ndarray, place: _Placement
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(counts, batch codes, label codes, row index) of the minibatch ``order`` as global
    arrays, from this process's share of its cells (read from memory or the file)."""
    own = order[place.share(len(order))]
    rows = np.arange(len(order))[None, place.share(len(order))]
    n = len(order)
    return (
        place.cells(tdata.take(cells, own), 0, n),
        place.cells(cells.batch[own], 0, n),
        place.cells(cells.label[own], 0, n),
        place.cells(rows, 1, n),
    )


def _total(parts: list[jax.Array], place: _Placement) -> np.ndarray:
    """The summed (loss * n, reconstruction, kl_local) of an epoch's steps, in float64."""
    return np.sum([place.host(p) for p in parts], axis=0, dtype=np.float64).reshape(3)


class TrainingResult:
    """What :func:`fit` returns: parameters, the history and the split."""

    def __init__(self, params, history, indices, settings):
        self.params = params
        self.history = history  # {key: [[epoch, value], ...]}
        self.indices = indices  # {"train": ..., "validation": ..., "test": ...}
        self.settings = settings


def fit(
    cells: anndata_io.CellData,
    config: LDVAEConfig,
    cfg: TrainConfig,
    *,
    dropout_rate: float,
    init: Callable[[np.ndarray, np.ndarray], tuple[LDVAEParams, LDVAEParams]] | None = None,
    bn_train: tuple[bool, bool] = (True, True),
    in_memory: bool | None = None,
    progress: Callable[[str], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    devices: list[Any] | None = None,
    cluster: Any = None,
) -> TrainingResult:
    """Train on ``cells`` (aligned with ``config``). ``init(library_log_means,
    library_log_vars)`` gives the parameters to start from and a 0/1 gradient mask (query
    mapping); None: fresh parameters, all trained. ``cluster``: this process's place in a
    distributed run (:mod:`linear_decoder_jax.distributed`): every process runs this with the
    same cells and options and reads only its share of each minibatch; process 0 alone writes
    the checkpoint."""
    n_obs = cells.n_obs
    max_epochs = cfg.max_epochs or tdata.max_epochs_heuristic(n_obs)
    n_train, n_val = tdata.validate_data_split(
        n_obs, cfg.train_size or 0.9, cfg.validation_size, cfg.batch_size, not cfg.train_size
    )
    loop._warn_no_validation(cfg, n_val)
    train_idx, val_idx, test_idx = tdata.split_indices(
        n_obs, n_train, n_val, shuffle_set_split=cfg.shuffle_set_split, seed=cfg.seed
    )
    if n_train % cfg.batch_size == 1:
        msg = (
            f"The last training minibatch would hold one cell ({n_train} training cells, "
            f"batch_size={cfg.batch_size}), and train-mode BatchNorm needs two: change "
            "batch_size or train_size."
        )
        raise ConfigError(msg)
    n_vars = config.n_input
    if in_memory is None:
        in_memory = n_obs * n_vars * 4 <= IN_MEMORY_BYTES
    in_memory = in_memory and cluster is None  # processes read their shares of each minibatch
    if not in_memory:
        tdata.check_streamable(cells)
    scan = tdata.scan(cells, keep=in_memory)  # every count checked before training starts
    if scan.empty and config.use_observed_lib_size:
        msg = (
            f"{scan.empty} cells have no counts; with use_observed_lib_size their log library "
            "is -inf. Filter them out (scanpy.pp.filter_cells(adata, min_counts=1))."
        )
        raise IncompatibleDataError(msg)
    if scan.empty:
        loop.warn(
            f"{scan.empty} cells have no counts, which might fail inference; filter them with "
            "scanpy.pp.filter_cells."
        )
    means, variances = tdata.library_size_prior(scan.log_library, cells.batch, config.n_batch)
    grad_mask = None
    if init is None:
        params = loop.init_params(config, jax.random.key(cfg.seed), means, variances)
    else:
        params, grad_mask = init(means, variances)
        grad_mask = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), grad_mask)
    settings = loop.StepSettings(
        dropout_rate=float(dropout_rate),
        n_epochs_kl_warmup=cfg.n_epochs_kl_warmup,
        n_steps_kl_warmup=cfg.n_steps_kl_warmup,
        max_kl_weight=float(cfg.max_kl_weight),
        min_kl_weight=float(cfg.min_kl_weight),
        eps=float(cfg.eps),
        weight_decay=float(cfg.weight_decay),
        decoupled=cfg.optimizer == "AdamW",
        bn_train=bn_train,
        batch_size=cfg.batch_size,
    )
    params = jax.tree.map(lambda a: jnp.array(a, jnp.float32), params)
    tx = loop.make_optimizer(config, settings, cfg.lr)
    opt_state = tx.init(params)
    place = _Placement(devices, cluster)
    writes = cluster is None or cluster.is_coordinator
    batch_all = place.replicate(jnp.asarray(cells.batch, jnp.int32))
    label_all = place.replicate(jnp.asarray(cells.label, jnp.int32))
    x_all = place.replicate(jnp.asarray(scan.dense)) if in_memory else None
    params, opt_state, grad_mask = place.replicate((params, opt_state, grad_mask))
    key = place.replicate(jax.random.key(cfg.seed + 1))
    history: dict[str, list[list[float]]] = {}  # key -> [[epoch, value], ...]
    plateau = loop.Plateau(cfg.lr_factor, cfg.lr_patience, cfg.lr_threshold, cfg.lr_min)
    stopper = loop.EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    lr = float(cfg.lr)
    step = 0
    first_epoch = 0
    identity = {"model": config.to_dict(), "training": cfg.to_dict() | {"max_epochs": None},
                "dropout_rate": dropout_rate, "n_obs": n_obs}  # fmt: skip
    if checkpoint is not None and resume and resume_state.exists(checkpoint):
        state = resume_state.load(checkpoint, params, opt_state, identity)
        params, opt_state = place.replicate((state.params, state.opt_state))
        history, step, first_epoch, lr = state.history, state.step, state.epoch + 1, state.lr
        plateau.best, plateau.bad_epochs = state.plateau
        stopper.best, stopper.wait = state.stopper
        if progress is not None:
            progress(f"Resuming from {checkpoint} after epoch {first_epoch}.")

    def put_rows(rows: np.ndarray) -> jax.Array:
        """A chunk of global row indices (steps, width), split along its cells like the data."""
        return place.cells(rows[:, place.share(rows.shape[1])], 1, rows.shape[1])

    def run(rows: np.ndarray, epoch: int) -> list[jax.Array]:
        nonlocal params, opt_state, step
        if in_memory:
            params, opt_state, sums = loop.train_steps(
                params, opt_state, x_all, batch_all, label_all, rows, key, place.scalar(epoch),
                step, grad_mask, config=config, settings=settings, put_rows=put_rows,
                put_scalar=place.scalar,
            )  # fmt: skip
            step += rows.shape[0]
            return [sums]
        total = []
        for order in rows:
            x, b, lab, _ = _minibatch(cells, order, place)
            params, opt_state, sums = loop.train_steps(
                params, opt_state, x, b, lab, np.arange(len(order))[None], key,
                place.scalar(epoch), step, grad_mask, config=config, settings=settings,
                put_rows=put_rows, put_scalar=place.scalar,
            )  # fmt: skip
            step += 1
            total.append(sums)
        return total

    def evaluate(rows: np.ndarray, weight: jax.Array, epoch: int) -> list[jax.Array]:
        vkey = jax.random.fold_in(jax.random.key(cfg.seed + 2), epoch)
        if in_memory:
            return [loop.eval_steps(
                params, x_all, batch_all, label_all, place.cells(rows, 1), vkey, weight,
                config=config,
            )]  # fmt: skip
        total = []
        for i, mb in enumerate(rows):
            x, b, lab, local = _minibatch(cells, mb, place)
            total.append(loop.eval_steps(
                params, x, b, lab, local, place.replicate(jax.random.fold_in(vkey, i)),
                place.replicate(weight), config=config,
            ))  # fmt: skip
        return total

    epoch = first_epoch - 1
    for epoch in range(first_epoch, max_epochs):
        # each epoch's order from (seed, epoch) alone: a resumed run draws the same minibatches
        order = np.random.default_rng([cfg.seed, epoch]).permutation(train_idx)
        full, rest = _minibatches(order, cfg.batch_size)
        parts = run(full, epoch) if len(full) else []
        if rest is not None:
            parts += run(rest, epoch)
        s = _total(parts, place)
        record = {
            "train_loss": s[0] / n_train,
            "elbo_train": (s[1] + s[2]) / n_train,
            "reconstruction_loss_train": s[1] / n_train,
            "kl_local_train": s[2] / n_train,
            "kl_global_train": 0.0,
        }
        validated = cfg.validates and (epoch + 1) % cfg.val_every == 0
        if validated:
            weight = loop.kl_weight(epoch, step - 1, settings)
            vfull, vrest = _minibatches(np.sort(val_idx), cfg.batch_size)
            vparts = evaluate(vfull, weight, epoch) if len(vfull) else []
            if vrest is not None:
                vparts += evaluate(vrest, weight, epoch + (1 << 20))
            vs = _total(vparts, place)
            record |= {
                "validation_loss": vs[0] / n_val,
                "elbo_validation": (vs[1] + vs[2]) / n_val,
                "reconstruction_loss_validation": vs[1] / n_val,
                "kl_local_validation": vs[2] / n_val,
                "kl_global_validation": 0.0,
            }
        for k, v in record.items():
            history.setdefault(k, []).append([epoch, float(v)])
        if progress is not None:
            progress(loop.progress_line(epoch, max_epochs, record))
        if validated and cfg.early_stopping:
            if stopper.stop(record[cfg.early_stopping_monitor], cfg.early_stopping_monitor):
                if progress is not None and stopper.reason:
                    progress(stopper.reason)
                break
        if validated and cfg.reduce_lr_on_plateau:
            new_lr = plateau.step(record[cfg.lr_scheduler_metric], lr)
            if new_lr != lr:
                lr = new_lr
                opt_state = opt_state._replace(lr=place.replicate(jnp.asarray(lr, jnp.float32)))
        if checkpoint is not None and (
            (epoch + 1) % checkpoint_every == 0 or epoch + 1 == max_epochs
        ):
            state = resume_state.State(
                params=place.host(params), opt_state=place.host(opt_state), history=history,
                step=step, epoch=epoch, lr=lr, plateau=(plateau.best, plateau.bad_epochs),
                stopper=(stopper.best, stopper.wait),
            )  # fmt: skip
            if writes:  # process 0 alone writes the state of a distributed run
                resume_state.save(checkpoint, state, identity)
    # validation keys of epochs without validation are absent, as in scvi-tools' history_
    return TrainingResult(
        params=place.host(params),
        history=history,
        indices={"train": train_idx, "validation": val_idx, "test": test_idx},
        settings=cfg.to_dict()
        | {
            "max_epochs": max_epochs,
            "dropout_rate": dropout_rate,
            "epochs_trained": epoch + 1,
        },  # fmt: skip
    )


GeneLikelihood = Literal["nb", "zinb", "poisson"]
Dispersion = Literal["gene", "gene-batch", "gene-label"]
LatentDistribution = Literal["normal", "ln"]


def train(
    adata: Any,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    n_hidden: int = 128,
    n_latent: int = 10,
    n_layers: int = 1,
    dropout_rate: float = 0.1,
    dispersion: Dispersion = "gene",
    gene_likelihood: GeneLikelihood = "nb",
    latent_distribution: LatentDistribution = "normal",
    use_observed_lib_size: bool = False,
    use_batch_norm: bool = True,
    bias: bool = False,
    max_epochs: int | None = None,
    batch_size: int = 128,
    train_size: float | None = None,
    validation_size: float | None = None,
    shuffle_set_split: bool = True,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    eps: float = 0.01,
    optimizer: Literal["Adam", "AdamW"] = "Adam",
    n_epochs_kl_warmup: int | None = 400,
    n_steps_kl_warmup: int | None = None,
    max_kl_weight: float = 1.0,
    min_kl_weight: float = 0.0,
    reduce_lr_on_plateau: bool = False,
    lr_factor: float = 0.6,
    lr_patience: int = 30,
    lr_threshold: float = 0.0,
    lr_min: float = 0.0,
    lr_scheduler_metric: loop.Monitor = "elbo_validation",
    early_stopping: bool = False,
    early_stopping_monitor: loop.Monitor = "elbo_validation",
    early_stopping_patience: int = 45,
    early_stopping_min_delta: float = 0.0,
    check_val_every_n_epoch: int | None = None,
    seed: int = 0,
    reference: Any = None,
    freeze_batchnorm_decoder: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    devices: int | None = None,
    allow_non_integer: bool = False,
    in_memory: bool | None = None,
    progress_bar: bool = True,
    distributed: bool = DistributedOptions.distributed,
    coordinator: str | None = DistributedOptions.coordinator,
    num_processes: int | None = DistributedOptions.num_processes,
    process_id: int | None = DistributedOptions.process_id,
    join_timeout: float = DistributedOptions.join_timeout,
    heartbeat_timeout: float = DistributedOptions.heartbeat_timeout,
):
    """Train a LinearSCVI model as scvi-tools 1.4.2 does, in JAX; returns a ``LinearSCVI``.

    Model options have ``scvi.model.LinearSCVI``'s names and defaults (``use_batch_norm`` and
    ``bias`` are LDVAE's decoder settings); training options those of ``LinearSCVI.train``,
    ``TrainingPlan`` and ``Trainer`` (``max_epochs=None``: min(round(20000 / n_obs * 400), 400);
    ``train_size=None``: 90 % with scvi-tools' rule for a last minibatch of one or two cells).

    Parameters
    ----------
    adata
        An AnnData, or the path of an ``.h5ad`` file or ``.zarr`` store, which is streamed:
        minibatches are read by row at each step, never the whole matrix (``in_memory=False``).
    layer
        Counts layer (None: X).
    batch_key, labels_key
        obs columns of the batch and the labels (labels matter for ``dispersion="gene-label"``).
    reference
        A trained ``LinearSCVI`` to map ``adata`` onto (query mapping, :mod:`.query`): the
        model options come from it, ``batch_key`` defaults to its own, the new batch categories
        get their own decoder rows, library prior and (gene-batch) ``px_r`` columns, and nothing
        else is trained.
    freeze_batchnorm_decoder
        Query mapping: keep the decoder's BatchNorm frozen (the reference's cells then decode
        exactly as before); False trains it as scArches can.
    checkpoint
        A file to write the training state to (weights, optimizer moments, epoch, history)
        every ``checkpoint_every`` epochs and after the last, atomically.
    resume
        Continue from ``checkpoint`` when it exists (after an interruption): the result equals
        the uninterrupted run with the same seed. The data and options must be the same.
    devices
        Train data parallel over this many of JAX's (local) devices (each minibatch's cells
        split across them; BatchNorm statistics and gradients are those of the whole
        minibatch). Distributed: every local device by default.
    seed
        Seeds the split (as ``scvi.settings.seed`` does: ``np.random.RandomState(seed)``), the
        initial weights, the minibatch order and every draw.
    in_memory
        Keep the dense counts on the device (default when they take at most 2 GiB and
        ``adata`` is in memory).
    progress_bar
        One line per epoch with the losses on stderr (process 0's, when distributed).
    distributed, coordinator, num_processes, process_id, join_timeout, heartbeat_timeout
        Train as one process of a multi-process job (``linear_decoder_jax.distributed``, as
        ``ablate(..., distributed=True)``): every process calls this with the same data (shared
        storage) and options; one global mesh spans every process's devices, each process reads
        its own share of every minibatch, and the weights are replicated, so every process
        returns the same model (up to float32 reduction order, the one-process model). Process
        0 alone writes the ``checkpoint`` (save the model on process 0 alone too:
        ``jax.process_index() == 0``). A process that fails or is lost ends every other one
        with one line.

    Returns
    -------
    LinearSCVI
        The trained model (``history_``, ``train_indices``, ``validation_indices``,
        ``test_indices``; ``save`` keeps them).

    Examples
    --------
    >>> model = ldj.train(adata, batch_key="batch", max_epochs=50)  # doctest: +SKIP
    >>> model.history_["elbo_train"].tail(1)  # doctest: +SKIP
    """
    from linear_decoder_jax.api import LinearSCVI

    cfg = TrainConfig(
        max_epochs=max_epochs, batch_size=batch_size, train_size=train_size,
        validation_size=validation_size, shuffle_set_split=shuffle_set_split, lr=lr,
        weight_decay=weight_decay, eps=eps, optimizer=optimizer,
        n_epochs_kl_warmup=n_epochs_kl_warmup, n_steps_kl_warmup=n_steps_kl_warmup,
        max_kl_weight=max_kl_weight, min_kl_weight=min_kl_weight,
        reduce_lr_on_plateau=reduce_lr_on_plateau, lr_factor=lr_factor, lr_patience=lr_patience,
        lr_threshold=lr_threshold, lr_min=lr_min, lr_scheduler_metric=lr_scheduler_metric,
        early_stopping=early_stopping, early_stopping_monitor=early_stopping_monitor,
        early_stopping_patience=early_stopping_patience,
        early_stopping_min_delta=early_stopping_min_delta,
        check_val_every_n_epoch=check_val_every_n_epoch, seed=seed,
    )  # fmt: skip
    if not 0.0 <= dropout_rate < 1.0:
        raise ConfigError(f"Expected 0 <= dropout_rate < 1, got {dropout_rate!r} instead.")
    start = time.perf_counter()
    cluster = None
    if distributed:  # before anything starts jax's backend
        from linear_decoder_jax import distributed as distributed_

        cluster = distributed_.initialize(
            coordinator=coordinator, num_processes=num_processes, process_id=process_id,
            join_timeout=join_timeout, heartbeat_timeout=heartbeat_timeout,
        )  # fmt: skip
    elif any(v is not None for v in (coordinator, num_processes, process_id)):
        raise ConfigError("coordinator, num_processes and process_id need distributed=True.")
    with contextlib.ExitStack() as stack:
        if cluster is not None:  # any failure from here on ends every process with one line
            stack.enter_context(distributed_.guarded(cluster))
        streamed = isinstance(adata, str | os.PathLike)
        if streamed:
            adata = stack.enter_context(sources.StoreSource(adata))
            in_memory = False if in_memory is None else in_memory
        if adata.n_obs < 3:
            raise IncompatibleDataError(
                f"Expected at least 3 cells to train on, got {adata.n_obs}."
            )
        init = None
        bn_train = (True, True)
        if reference is not None:
            from linear_decoder_jax.training import query

            ref_spec = reference.spec
            key = batch_key or ref_spec.data.batch_key
            if key is None:
                raise ConfigError("Query mapping needs a batch_key (the reference has none).")
            categories = tdata.registry(adata, layer=None, batch_key=key, labels_key=None)
            spec = query.query_spec(ref_spec, categories.batch_categories, key)
            spec = ModelSpec(
                model=spec.model,
                data=spec.data.__class__(
                    **(spec.data.__dict__ | {"batch_key": key, "layer": layer})
                ),  # fmt: skip
                source=spec.source,
            )
            config = spec.model
            ref_params = reference.host_params

            def init(means, variances):
                return query.extend(
                    jax.tree.map(np.asarray, ref_params), ref_spec.model, config, means,
                    variances, seed=seed, freeze_batchnorm_decoder=freeze_batchnorm_decoder,
                )  # fmt: skip

            bn_train = (False, not freeze_batchnorm_decoder)
        else:
            spec = _fresh_spec(
                adata, layer, batch_key, labels_key, n_hidden=n_hidden, n_latent=n_latent,
                n_layers=n_layers, dispersion=dispersion, gene_likelihood=gene_likelihood,
                latent_distribution=latent_distribution,
                use_observed_lib_size=use_observed_lib_size, use_batch_norm=use_batch_norm,
                bias=bias,
            )  # fmt: skip
            config = spec.model
        cells = anndata_io.prepare(adata, spec, layer=layer, allow_non_integer=allow_non_integer)
        tdata.check_batches(cells.batch, spec.data.batch_categories, spec.data.batch_key)
        report = loop.stderr_progress if progress_bar else None
        device_list = None if devices is None else _devices(devices)
        if cluster is not None:
            device_list = device_list or jax.local_devices()
            distributed_.check_same(cluster, {
                "model": config.to_dict(), "training": cfg.to_dict(), "n_obs": adata.n_obs,
                "genes": spec.data.var_names, "dropout_rate": dropout_rate, "bn_train": bn_train,
                "checkpoint": None if checkpoint is None else str(Path(checkpoint).absolute()),
                "checkpoint_every": checkpoint_every, "resume": resume,
            })  # fmt: skip
            distributed_.check_devices(cluster, len(device_list))
            if cluster.process_id != 0:
                report = None  # process 0 reports the run
        result = fit(
            cells, config, cfg, dropout_rate=dropout_rate, in_memory=in_memory, progress=report,
            init=init, bn_train=bn_train, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, resume=resume, devices=device_list,
            cluster=cluster,
        )  # fmt: skip
    training = {
        "history": result.history,
        "settings": result.settings | {"seconds": time.perf_counter() - start},
        "indices": result.indices,
    }
    return LinearSCVI(result.params, spec, training=training)


def _devices(n: int) -> list[Any]:
    available = jax.local_devices()
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(available):
        msg = f"Expected devices between 1 and {len(available)} (JAX's devices), got {n!r} instead."
        raise ConfigError(msg)
    return available[:n]


def _fresh_spec(
    adata: Any,
    layer: str | None,
    batch_key: str | None,
    labels_key: str | None,
    *,
    dispersion: str,
    use_batch_norm: bool,
    bias: bool,
    use_observed_lib_size: bool,
    **options: Any,
) -> ModelSpec:
    """The spec of a new model set up on ``adata`` (scvi-tools' ``setup_anndata`` + init)."""
    registry = tdata.registry(adata, layer=layer, batch_key=batch_key, labels_key=labels_key)
    if dispersion == "gene-label" and labels_key is None:
        raise ConfigError("dispersion='gene-label' needs labels_key (CLI: --labels-key).")
    config = LDVAEConfig(
        n_input=len(registry.var_names),
        n_batch=max(len(registry.batch_categories), 1),
        n_labels=max(len(registry.label_categories), 1),
        dispersion=dispersion,  # type: ignore[arg-type]
        use_observed_lib_size=bool(use_observed_lib_size),
        decoder_batch_norm=bool(use_batch_norm),
        decoder_bias=bool(bias),
        **options,
    )
    return ModelSpec(model=config, data=registry, source={"trained_with": "linear-decoder-jax"})
