"""One run: read each minibatch once, encode and place it once, feed every scorer.

A run is a frozen :class:`Plan` (everything resolved and validated before the first minibatch)
and a list of scorers. :func:`execute` is the only loop over the data: it reads minibatches on a
background thread (``prefetch``), places them on the devices (a 1-D mesh over cells when there are
several), encodes them once (:func:`encode`: the posterior, the decoder input at its mean and the
log library, shared by every scorer), splits the PRNG key, calls each scorer and writes their
per-cell rows into a sink (numpy arrays, or datasets of the streamed h5ad). Scorers keep running
totals (plain sums over cells) that :func:`execute` hands back to them at the end.

A scorer (the plain sweep ``ablation.SweepScorer``, the refit ``refit.RefitScorer``) declares the
schema fields it fills (``schema.FIELDS``) and implements ``init``, ``score`` and ``finish``
(:class:`Scorer`). Adding a score means one scorer plus its schema rows: the driver, the writers,
the reader and the facade do not change.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import anndata_io, model, stages
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.options import LibraryChoice, Mode
from linear_decoder_jax.params import LDVAEParams
from linear_decoder_jax.sizing import choose_batch_size  # noqa: F401 - run's name


def latent_names(n_latent: int) -> list[str]:
    """``Z_0 ... Z_{K-1}``: the column names scvi-tools' ``get_loadings`` uses."""
    return [f"Z_{i}" for i in range(n_latent)]


def vectorize_default(devices: Sequence[Any]) -> bool:
    """Batch the latents (``vmap``) on accelerators; run them one after another on CPU.

    XLA:CPU compiles the per-latent body, a loop over (batch, n_vars) arrays, several times faster
    than the batched body (measured); accelerators want the batched one.
    """
    return any(d.platform != "cpu" for d in devices)


def resolve_devices(devices: int | None) -> list[Any]:
    """The first ``devices`` local devices (all by default)."""
    available = jax.local_devices()
    if devices is None:
        return available
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"Expected devices >= 1, got {devices!r} instead.")
    if devices > len(available):
        msg = f"Asked for {devices} devices but only {len(available)} are visible ({available})."
        raise ConfigError(msg)
    return available[:devices]


def shard_rows(shard: tuple[int, int] | None, n_obs: int) -> tuple[int, int]:
    """Row range ``[lo, hi)`` of shard ``(i, n)``: the i-th of n equal ranges."""
    if shard is None:
        return 0, n_obs
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise ConfigError(f"Expected shard (i, n) with 0 <= i < n, got {shard!r} instead.")
    return i * n_obs // n, (i + 1) * n_obs // n


@dataclass(frozen=True)
class Plan:
    """A run, resolved: which latents, against which baseline, how, over which rows."""

    latents: tuple[int, ...]  # ablated latents, result column order
    baseline_name: str  # "zero", "mean", "median", "value" or "values"
    baseline: tuple[float, ...]  # (n_latent,) decoder-input baseline values
    mode: Mode
    library: LibraryChoice
    n_samples: int
    seed: int
    batch_size: int  # cells per minibatch, a multiple of the device count
    dtype: str  # "float32" or "float64"
    devices: tuple[Any, ...]
    rows: tuple[int, int]  # [lo, hi) of the input's cells
    vectorize: bool  # vmap over latents / lanes (accelerators) or lax.map (CPU)
    group_names: tuple[str, ...] = ()  # categories of ``groupby``; Batch.group indexes them

    @property
    def n_obs(self) -> int:
        return self.rows[1] - self.rows[0]


class Batch(NamedTuple):
    """One placed, encoded minibatch: what every scorer receives (rows past n_valid are padding)."""

    x: jax.Array  # (b, n_vars) counts in the model's dtype
    nz_index: jax.Array  # (b, width) int32 genes of the non-zero counts
    nz_count: jax.Array  # (b, width) the counts there (0 in padding)
    batch: jax.Array  # (b,) int32
    label: jax.Array  # (b,) int32
    valid: jax.Array  # (b,) 1.0 for cells, 0.0 for padding
    group: jax.Array  # (b,) int32 group code, -1: no group
    qz_m: jax.Array  # (b, n_latent) posterior mean (encoder space)
    qz_v: jax.Array  # (b, n_latent) posterior variance
    z: jax.Array  # (b, n_latent) decoder input at the posterior mean
    log_library: jax.Array  # (b, 1) per the plan's library choice


class Scorer(Protocol):
    """A score computed per minibatch from a :class:`Batch`.

    ``fields``: the ``schema.FIELDS`` names of the per-cell rows ``score`` returns (padded
    minibatch rows; the driver writes the valid ones). ``init`` returns the running totals (a
    pytree, e.g. zeros), ``score`` returns the rows and the updated totals, ``finish`` turns the
    final totals over ``n_obs`` cells into the non-per-cell fields (e.g. ``mean_lfc``).
    """

    fields: tuple[str, ...]
    needs_key: bool

    def init(self) -> Any: ...

    def score(self, batch: Batch, totals: Any, key: jax.Array) -> tuple[dict[str, Any], Any]: ...

    def finish(self, totals: Any, n_obs: int) -> dict[str, np.ndarray]: ...


@functools.partial(jax.jit, static_argnames=("config", "library"))
def encode(
    params: LDVAEParams,
    x: jax.Array,
    *,
    config: LDVAEConfig,
    library: LibraryChoice = "model",
) -> tuple[model.Posterior, jax.Array, jax.Array]:
    """(posterior, decoder input at its mean, log library) of counts ``x`` (n_obs, n_vars)."""
    post = model.inference(params, x, config=config)
    z = model.z_transformation(post.qz_m, config=config)
    return post, z, model.library(post, x, config=config, choice=library)


class Placement(NamedTuple):
    """How arrays go to the devices: split over cells, or replicated."""

    cells: Any  # host array -> device array split over the cell axis
    replicated: Any  # pytree -> replicated device arrays
    mesh: jax.sharding.Mesh | None  # the 1-D mesh ("cells",) when several devices are used
    # distributed runs: the global mesh over every process's devices (``distributed.Lockstep``)
    lockstep: Any = None


def lockstep_placement(lockstep: Any) -> Placement:
    """Placement on the global mesh of a distributed run: this process's rows of each minibatch
    and replicated values become global arrays."""
    return Placement(lockstep.cells, lockstep.replicated, lockstep.mesh, lockstep)


def placement(devices: Sequence[Any]) -> Placement:
    """A 1-D mesh over the cell axis when several devices are used (parameters replicated), else
    plain device arrays on the one device (``device_put``: one transfer per host array)."""
    if len(devices) <= 1:
        device = devices[0] if devices else None
        put = functools.partial(jax.device_put, device=device)
        return Placement(put, put, None)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(devices), ("cells",))
    cells = NamedSharding(mesh, PartitionSpec("cells"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return Placement(
        lambda a: jax.device_put(a, cells),
        lambda tree: jax.device_put(tree, replicated),
        mesh,
    )


def prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` on a background thread, ``depth`` items ahead (reading overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as err:  # re-raised in the consumer
            q.put(err)
            return
        q.put(done)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


@functools.partial(jax.jit, static_argnames=("config", "library"))
def encode_counts(
    params: LDVAEParams,
    nz_index: jax.Array,
    nz_count: jax.Array,
    *,
    config: LDVAEConfig,
    library: LibraryChoice = "model",
) -> tuple[jax.Array, model.Posterior, jax.Array, jax.Array]:
    """(dense counts, posterior, decoder input, log library) of a minibatch given by its row-wise
    non-zeros: the dense block is scattered on the device, so only the non-zeros cross from the
    host (at 10 % non-zeros 5x fewer bytes; the dense copies took 0.46 s of a 2.5 s streamed run
    at 20k x 2,000, measured); padding adds 0 at gene 0."""
    # one scatter per row (vmap): the result keeps the cells' sharding on a mesh, where a 2-D
    # scatter comes out replicated and every device would encode the whole minibatch
    x = jax.vmap(lambda i, c: jnp.zeros(config.n_input, c.dtype).at[i].add(c))(nz_index, nz_count)
    post, z, log_library = encode(params, x, config=config, library=library)
    return x, post, z, log_library


def batches(
    params: LDVAEParams,
    data: anndata_io.CellData,
    plan: Plan,
    *,
    config: LDVAEConfig,
    groups: np.ndarray | None = None,
    place: Placement | None = None,
) -> Iterator[tuple[int, int, Batch]]:
    """``(start, n_valid, Batch)`` per minibatch of ``data`` in obs order, placed and encoded once.
    ``groups``: (n_obs,) int32 codes, -1 for none.

    Reading, the non-zero scan and the host-to-device copy (one ``device_put`` of all of a
    minibatch's arrays) run on a background thread, so this thread only dispatches compute.
    """
    place = place or placement(plan.devices)
    dtype = np.dtype(plan.dtype)
    x64 = dtype == np.float64
    lock = place.lockstep

    def padded() -> Iterator[anndata_io.Minibatch]:
        """The minibatches, then (distributed runs) empty ones up to the count of the process
        with the most rows, non-zero blocks as wide as the widest process's."""
        count = 0
        for mb in anndata_io.minibatches(data, plan.batch_size, dtype=dtype, n_vars=config.n_input):
            if lock is not None:
                extra = lock.width(mb.nz_index.shape[1]) - mb.nz_index.shape[1]
                mb.nz_index = np.pad(mb.nz_index, ((0, 0), (0, extra)))
                mb.nz_count = np.pad(mb.nz_count, ((0, 0), (0, extra)))
            count += 1
            yield mb
        if lock is None:
            return
        size = plan.batch_size
        while count < -(-lock.max_rows // size):
            width = lock.width(anndata_io.nz_width(0, config.n_input))
            empty = np.zeros(size, np.int32)
            index = np.zeros((size, width), np.int32)
            yield anndata_io.Minibatch(
                data.n_obs, 0, config.n_input, empty, empty, index, index.astype(dtype)
            )
            count += 1

    def placed() -> Iterator[tuple[int, int, tuple[jax.Array, ...]]]:
        with jax.enable_x64(x64):  # the caller's precision context is thread-local
            for mb in stages.iterate("read", padded()):
                size = len(mb.batch)
                group = np.full(size, -1, np.int32)
                if groups is not None:
                    group[: mb.n_valid] = groups[mb.start : mb.start + mb.n_valid]
                valid = (np.arange(size) < mb.n_valid).astype(dtype)
                arrays = (mb.nz_index, mb.nz_count, mb.batch, mb.label, valid, group)
                yield mb.start, mb.n_valid, stages.call("copy", place.cells, arrays, wait=True)

    for start, n_valid, (nz_index, nz_count, batch, label, valid, group) in prefetch(placed()):
        x, post, z, log_library = encode_counts(
            params, nz_index, nz_count, config=config, library=plan.library
        )
        yield (
            start,
            n_valid,
            Batch(
                x=x,
                nz_index=nz_index,
                nz_count=nz_count,
                batch=batch,
                label=label,
                valid=valid,
                group=group,
                qz_m=post.qz_m,
                qz_v=post.qz_v,
                z=z,
                log_library=log_library,
            ),
        )


class _Writer:
    """Copies each minibatch's per-cell rows to the host and into the sink on its own thread,
    so the dispatching thread never waits for a result; rows go into the sink in blocks of
    ``block`` cells (one h5py write per field and block instead of one per minibatch).

    ``depth`` minibatches may be in flight: it bounds the memory of results not yet written.
    """

    def __init__(
        self,
        sink: dict[str, Any],
        block: int,
        bar: Any,
        depth: int = 4,
        fetch: Callable[[dict[str, Any]], dict[str, Any]] = jax.device_get,
    ):
        self.sink, self.block, self.bar, self.fetch = sink, block, bar, fetch
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, start: int, n_valid: int, rows: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((start, n_valid, rows))

    def close(self) -> None:
        """Write what is left and wait; re-raises the writer's error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        buffered: dict[str, list[np.ndarray]] = {}
        first = n_buffered = 0
        try:
            while (item := self.queue.get()) is not None:
                start, n_valid, rows = item
                if not buffered:
                    first = start
                stages.wait("compute", rows)
                for name, value in stages.call("fetch", self.fetch, rows).items():
                    buffered.setdefault(name, []).append(np.asarray(value)[:n_valid])
                n_buffered += n_valid
                if n_buffered >= self.block:
                    stages.call("write", self._flush, first, buffered)
                    buffered, n_buffered = {}, 0
                if self.bar is not None:
                    self.bar.update(n_valid)
            if buffered:
                stages.call("write", self._flush, first, buffered)
        except BaseException as err:  # re-raised in the dispatching thread
            self.error = err
            while self.queue.get() is not None:  # unblock the producer until close()
                pass

    def _flush(self, first: int, buffered: dict[str, list[np.ndarray]]) -> None:
        for name, parts in buffered.items():
            block = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self.sink[name][first : first + len(block)] = block


def execute(
    params: LDVAEParams,
    data: anndata_io.CellData,
    plan: Plan,
    scorers: Sequence[Scorer],
    sink: dict[str, Any],
    *,
    config: LDVAEConfig,
    groups: np.ndarray | None = None,
    place: Placement | None = None,
    progress: bool = False,
    watch: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run every scorer over ``data`` (the plan's rows), writing per-cell rows into ``sink[name]``
    (arrays or datasets of ``n_obs`` rows); returns the scorers' finished totals.

    Three threads: reading and placement (``batches``), dispatch (this one), and the copy of the
    results to the host and the sink (``_Writer``), so the device waits for neither end.
    ``watch`` is called after each minibatch is dispatched: work beside the sweep starts and
    raises through it.
    """
    place = place or placement(plan.devices)
    lock = place.lockstep
    params = place.replicated(params)
    key = jax.random.key(plan.seed)
    need_key = any(s.needs_key for s in scorers)
    totals = [s.init() for s in scorers]

    with contextlib.ExitStack() as stack:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=data.n_obs, unit="cells", desc="ablate"))
        block = anndata_io.read_rows(config.n_input, plan.batch_size)
        fetch: Callable[[dict[str, Any]], dict[str, Any]] = jax.device_get
        if lock is not None:  # this process's rows of the global per-cell arrays
            fetch = lambda rows: {k: lock.own_rows(v) for k, v in rows.items()}  # noqa: E731
        writer = _Writer(sink, block, bar, fetch=fetch)
        try:
            for start, n_valid, batch in batches(
                params, data, plan, config=config, groups=groups, place=place
            ):
                if need_key:  # else the key is unused: skip a dispatch per minibatch
                    key, sub = jax.random.split(key)
                else:
                    sub = key
                if lock is not None and need_key:
                    sub = place.replicated(sub)
                rows: dict[str, Any] = {}
                for i, scorer in enumerate(scorers):
                    out, totals[i] = scorer.score(batch, totals[i], sub)
                    rows.update(out)
                if n_valid:
                    writer.put(start, n_valid, rows)
                if watch is not None:
                    watch()
        finally:
            writer.close()
    n_obs = data.n_obs
    if lock is not None:  # the totals are sums over every process's cells
        totals = [lock.host(t) for t in totals]
        n_obs = lock.n_obs
    finished: dict[str, np.ndarray] = {}
    for scorer, total in zip(scorers, totals, strict=True):
        finished.update(scorer.finish(total, n_obs))
    return finished


class OwnRows:
    """A scorer run by each process on its own rows and local devices in a distributed run: for
    per-cell work whose host-side steps differ between processes (the refit's restarts)."""

    def __init__(self, scorer: Any, lockstep: Any, local: Placement):
        self.scorer, self.lockstep, self.local = scorer, lockstep, local
        self.fields, self.needs_key = scorer.fields, scorer.needs_key

    def init(self) -> Any:
        return self.scorer.init()

    def score(self, batch: Batch, totals: Any, key: jax.Array) -> tuple[dict[str, Any], Any]:
        own = Batch(*(self.local.cells(self.lockstep.own_rows(a)) for a in batch))
        return self.scorer.score(own, totals, key)

    def finish(self, totals: Any, n_obs: int) -> dict[str, np.ndarray]:
        return self.scorer.finish(totals, n_obs)


# -- a whole ablation run: resolve, plan, execute, assemble -----------------------------------------
def decoder_inputs(
    params: LDVAEParams,
    data: anndata_io.CellData,
    plan: Plan,
    *,
    config: LDVAEConfig,
    place: Placement | None = None,
) -> np.ndarray:
    """Decoder input at the posterior mean of every cell of ``data`` (n_obs, n_latent), host.
    On the global mesh of a distributed run: of every process's cells (an all-gather per
    minibatch), in row order."""
    place = place or placement(plan.devices)
    lock = place.lockstep
    n_obs = data.n_obs if lock is None else lock.n_obs
    out = np.empty((n_obs, config.n_latent), np.dtype(plan.dtype))
    placed = batches(place.replicated(params), data, plan, config=config, place=place)
    for m, (start, n_valid, batch) in enumerate(placed):
        if lock is None:
            out[start : start + n_valid] = np.asarray(batch.z)[:n_valid]
            continue
        z, b, n = lock.gather(batch.z), plan.batch_size, lock.cluster.num_processes
        for p in range(n):
            lo, hi = shard_rows((p, n), n_obs)
            count = int(np.clip(hi - lo - m * b, 0, b))
            out[lo + m * b : lo + m * b + count] = z[p * b : p * b + count]
    return out


def versions() -> dict[str, str]:
    """Versions recorded in a result's provenance."""
    from importlib.metadata import version

    from linear_decoder_jax._version import __version__

    return {
        "linear_decoder_jax": __version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "anndata": version("anndata"),
    }


def embeddings(adata: Any) -> dict[str, np.ndarray]:
    """The input's 2-D embeddings (obsm entries with two columns, e.g. ``X_umap``)."""
    out = {}
    for key in adata.obsm.keys():
        value = adata.obsm[key]
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 2:
            out[key] = np.asarray(value)
    return out


class ObsRows:
    """The obs rows [lo, hi) of ``adata`` for the result, checked writable first
    (``anndata_io.check_obs_writable``). A streamed h5ad whose obs is not read yet is read on a
    thread beside the sweep (anndata and pandas take ~0.8 s to import), started by the first
    :meth:`check`, once the first minibatch is dispatched; :meth:`check` raises its error while
    the sweep runs, so an unwritable column still stops the run in seconds."""

    def __init__(self, adata: Any, lo: int, hi: int):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

        def load() -> None:
            try:
                obs = adata.obs.iloc[lo:hi].copy()
                anndata_io.check_obs_writable(obs)
                self._value = obs
            except BaseException as err:  # raised by check() or result()
                self._error = err

        if isinstance(adata, anndata_io.BackedAnnData) and not adata.obs_loaded:
            self._thread = threading.Thread(target=load, daemon=True)
        else:
            load()
            self.check()

    def check(self) -> None:
        if self._thread is not None and self._thread.ident is None:
            self._thread.start()
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        if self._thread is not None and self._thread.ident is not None:
            self._thread.join()

    def result(self) -> Any:
        self.check()
        self.wait()
        self.check()
        return self._value

    def __enter__(self) -> ObsRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()


class Options(NamedTuple):
    """The user's options of an ablation run, validated by the facade (``api.ablate``)."""

    latents: Sequence[int] | None
    baseline: Any  # ablation.BaselineSpec
    mode: Mode
    groupby: str | None
    batch_size: int | None
    library: LibraryChoice
    n_samples: int
    seed: int
    allow_non_integer: bool
    progress: bool
    devices: list[Any]
    shard: tuple[int, int] | None
    refit: tuple[str, int, float] | None  # (optimizer, steps, tol)
    groupby_max: int = 50  # options.DEFAULT_GROUPBY_MAX
    layer: str | None = anndata_io.AUTO  # where the counts are (anndata_io.choose_counts)
    use_raw: bool = False
    gene_scores: bool = False
    shapley: str | None = None  # "exact", "permutation" or None
    n_permutations: int = 0
    # distributed runs: the global mesh (``distributed.Lockstep``); this process scores its rows
    # on it, baselines and totals cover every process's cells
    lockstep: Any = None


def ablate(model_: Any, adata: Any, opts: Options, *, output: Any, overwrite: bool) -> Any:
    """Resolve ``opts`` into a :class:`Plan`, run the scorers over ``adata`` and assemble the
    ``AblationResult`` (in memory, or streamed into ``output`` and read back memory-mapped)."""
    from linear_decoder_jax import ablation, attribution, options, results, schema
    from linear_decoder_jax._atomic import atomic_path

    cfg = model_.config
    groupby = opts.groupby
    group_names: tuple[str, ...] = ()
    all_codes = None
    if groupby is not None:  # refuses a missing or continuous column before any work; the
        # groups come from every input cell, so all shards and processes share one list
        all_codes, group_names, _ = anndata_io.group_codes(
            adata.obs, groupby, max_groups=opts.groupby_max
        )
    full = model_.prepare(
        adata, allow_non_integer=opts.allow_non_integer, layer=opts.layer, use_raw=opts.use_raw
    )
    lo, hi = shard_rows(opts.shard, full.n_obs)
    data = full.restrict(lo, hi)
    if data.n_obs == 0:
        raise ConfigError(f"Shard {opts.shard} of {full.n_obs} cells is empty; use fewer shards.")
    idx = ablation.resolve_latents(opts.latents, cfg.n_latent)
    if opts.shapley is not None:
        attribution.check_shapley(
            opts.shapley,
            cfg.n_latent,
            opts.n_permutations,
            max_exact=options.MAX_EXACT_SHAPLEY_LATENTS,
        )
    dtype = np.dtype(model_.dtype)
    n_dev = len(opts.devices)
    vectorize = vectorize_default(opts.devices)
    lock = opts.lockstep
    size = opts.batch_size or choose_batch_size(
        data.n_obs if lock is None else lock.max_rows,
        cfg.n_input,
        len(idx),
        itemsize=dtype.itemsize,
        vectorize=vectorize,
        devices=opts.devices,
        n_scores=1 + (opts.shapley is not None),
    )
    size = int(-(-size // n_dev) * n_dev)  # a multiple of the device count

    codes = None if all_codes is None else all_codes[lo:hi]
    if opts.gene_scores:
        attribution.check_gene_budget(
            len(group_names), len(idx), cfg.n_input, budget=options.GENE_SCORES_BUDGET
        )

    def make_plan(baseline: np.ndarray, name: str, rows: tuple[int, int]) -> Plan:
        return Plan(
            latents=tuple(int(i) for i in idx),
            baseline_name=name,
            baseline=tuple(float(b) for b in baseline),
            mode=opts.mode,
            library=opts.library,
            n_samples=opts.n_samples,
            seed=opts.seed,
            batch_size=size,
            dtype=str(dtype),
            devices=tuple(opts.devices),
            rows=rows,
            vectorize=vectorize,
            group_names=group_names,
        )

    # in memory: checked here, before any work; a streamed file: read beside the work
    obs_rows = ObsRows(adata, lo, hi)
    with model_.precision(), obs_rows:  # no reading thread outlives the run, even on error
        params = model_.params
        stats = None
        if isinstance(opts.baseline, str) and opts.baseline in ("mean", "median"):
            obs_rows.check()  # a streamed file's obs is read beside this pass
            if lock is None:  # over all input cells, shards too
                stats_plan = make_plan(np.zeros(cfg.n_latent), "zero", (0, full.n_obs))
                stats = decoder_inputs(params, full, stats_plan, config=cfg)
            else:  # each process its own rows, gathered on the global mesh
                stats_plan = make_plan(np.zeros(cfg.n_latent), "zero", (lo, hi))
                stats = decoder_inputs(
                    params, data, stats_plan, config=cfg, place=lockstep_placement(lock)
                )
        base_name, base_values = ablation.resolve_baseline(opts.baseline, stats, cfg.n_latent)
        if opts.refit:
            from linear_decoder_jax import refit  # optax: only for refits

            refit.check_baseline(base_values, idx, model_.latent_names, config=cfg)
        plan = make_plan(base_values, base_name, (lo, hi))
        local = placement(plan.devices)
        place = local if lock is None else lockstep_placement(lock)
        scorers: list[Any] = [
            ablation.SweepScorer(
                params, plan, config=cfg, place=place, gene_scores=opts.gene_scores
            )
        ]
        if opts.shapley is not None:
            scorers.append(
                attribution.ShapleyScorer(
                    params,
                    plan,
                    config=cfg,
                    place=place,
                    method=opts.shapley,  # type: ignore[arg-type]
                    n_permutations=opts.n_permutations,
                )
            )
        refit_settings: dict[str, Any] = {"refit": False}
        if opts.refit:
            optimizer, steps, tol = opts.refit
            scorer = refit.RefitScorer(
                params,
                plan,
                config=cfg,
                optimizer=optimizer,  # type: ignore[arg-type]
                steps=steps,
                tol=tol,
                mesh=local.mesh,
            )
            refit_settings = scorer.settings()
            scorers.append(scorer if lock is None else OwnRows(scorer, lock, local))
        sizes = {"obs": data.n_obs, "ablated": len(idx), "latent": cfg.n_latent}
        shapes = {}
        for s in scorers:
            for name in s.fields:
                f = schema.BY_NAME[name]
                shapes[name] = (
                    schema.shape(f, sizes),
                    np.dtype(bool if f.dtype == "bool" else dtype),
                )
        with contextlib.ExitStack() as stack:
            stream = None
            if output is None:
                sink: dict[str, Any] = {k: np.empty(sh, dt) for k, (sh, dt) in shapes.items()}
            else:
                tmp = stack.enter_context(atomic_path(output, overwrite=overwrite, directory=False))
                stream = results.H5adStream(tmp, shapes)
                stack.callback(stream.close)
                sink = stream.arrays
            totals = execute(
                params,
                data,
                plan,
                scorers,
                sink,
                config=cfg,
                groups=codes,
                place=place,
                progress=opts.progress,
                watch=obs_rows.check,
            )
            obs = obs_rows.result()
            arrays = {**(sink if stream is None else stream.read_back()), **totals}
            names = [model_.latent_names[i] for i in idx]
            settings = {
                "baseline": base_name,
                "baseline_values": np.asarray(base_values, dtype=np.float64),
                "mode": opts.mode,
                "latents": idx.astype(np.int64),
                "latent_names": names,
                "library": opts.library,
                "n_samples": opts.n_samples,
                "seed": opts.seed,
                "dtype": str(dtype),
                "batch_size": size,
                "n_devices": n_dev,
                "groupby": groupby or "",
                "shard": np.asarray(opts.shard or (0, 1), dtype=np.int64),
                "rows": np.asarray([lo, hi], dtype=np.int64),
                "n_obs_total": full.n_obs,
                "versions": versions(),
                "source_model": model_.path or "",
                "source_scvi_version": str(model_.spec.source.get("scvi_version") or ""),
                "model_fingerprint": model_.fingerprint(),
                **refit_settings,
                "gene_scores": bool(opts.gene_scores),
                "shapley": opts.shapley or "",
                "n_permutations": opts.n_permutations if opts.shapley == "permutation" else 0,
            }
            if opts.gene_scores:  # names of the gene tables' group rows
                settings["gene_groups"] = [*group_names, schema.ALL_CELLS]
            groups = explained = None
            if groupby is not None:
                groups = results.group_tables(arrays["delta_nll"], obs[groupby].to_numpy(), names)
                if opts.shapley is not None:
                    explained = results.explained_shares(
                        arrays["gain_nll"], arrays["shapley_nll"], obs[groupby], model_.latent_names
                    )
            result = results.AblationResult(
                arrays=arrays,
                loadings=np.asarray(model_.get_affine_decoder().scale.loadings),
                obs=obs,
                var_names=model_.var_names,
                settings=settings,
                embeddings={k: v[lo:hi] for k, v in embeddings(adata).items()},
                groups=groups,
                explained_table=explained,
            )
            if stream is not None:
                stream.finish(result)
    if output is not None:
        return results.AblationResult.read(output)
    return result
