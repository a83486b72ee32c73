"""The run pipeline's driver: read each minibatch once, encode and place it once, feed every scorer.

A run is a frozen :class:`Plan` (everything resolved and validated before the first minibatch)
and a list of scorers. :func:`execute` is the only loop over the data: it reads minibatches on a
background thread (``prefetch``), places them on the devices (a 1-D mesh over cells when there are
several), encodes them once (:func:`encode`: the posterior, the decoder input at its mean and the
log library, shared by every scorer), splits the PRNG key, calls each scorer and writes their
per-cell rows into a sink (numpy arrays, or datasets of the streamed h5ad). Scorers keep running
totals (plain sums over cells) that :func:`execute` hands back to them at the end.

A scorer (the plain sweep ``ablation.SweepScorer``, ``attribution.ShapleyScorer``, the refit
``refit.RefitScorer``) declares the schema fields it fills (``schema.FIELDS``) and implements
``init``, ``score`` and ``finish`` (:class:`Scorer`). Scorers sit above this module and talk to
the model only through its family (``family.Family``); :class:`Placement` is the only thing the
driver knows about devices and processes. The assembly of a whole run (options to plan, scorers,
result) is ``assemble``.
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

from linear_decoder_jax import anndata_io, stages
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.family import Encoded, Family
from linear_decoder_jax.options import LibraryChoice, Mode


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
    # unit="split": the latents of each split (``Family.unit_latents``); ``latents`` index splits
    units: tuple[tuple[int, ...], ...] | None = None

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
    ``settings`` is what the scorer records in ``uns["ablation"]``. A scorer may also define
    ``derive(arrays, obs, groupby, names) -> dict`` to build its group tables from the finished
    arrays (``assemble`` calls it when there is a ``groupby``).
    """

    fields: tuple[str, ...]
    needs_key: bool

    def init(self) -> Any: ...

    def score(self, batch: Batch, totals: Any, key: jax.Array) -> tuple[dict[str, Any], Any]: ...

    def finish(self, totals: Any, n_obs: int) -> dict[str, np.ndarray]: ...

    def settings(self) -> dict[str, Any]: ...


@functools.partial(jax.jit, static_argnames=("family", "library"))
def encode(
    family: Family,
    params: Any,
    x: jax.Array,
    batch: jax.Array,
    label: jax.Array,
    *,
    library: LibraryChoice = "model",
) -> Encoded:
    """The family's encoding of counts ``x`` (n_obs, n_vars), jitted."""
    return family.encode(params, x, batch, label, library=library)


class Placement:
    """How arrays go to the devices, and the only thing the driver knows about devices and
    processes. This one: the local devices of one process (a 1-D mesh over the cell axis when
    there are several, parameters replicated; else plain device arrays on the one device).
    ``distributed.Lockstep`` is the same interface over every process's devices."""

    def __init__(self, devices: Sequence[Any]):
        self.mesh: jax.sharding.Mesh | None = None
        if len(devices) <= 1:
            device = devices[0] if devices else None
            self._cells = self._replicated = functools.partial(jax.device_put, device=device)
            return
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.mesh = Mesh(np.asarray(devices), ("cells",))
        split = NamedSharding(self.mesh, PartitionSpec("cells"))
        whole = NamedSharding(self.mesh, PartitionSpec())
        self._cells = functools.partial(jax.device_put, device=split)
        self._replicated = functools.partial(jax.device_put, device=whole)

    def cells(self, arrays: Any) -> Any:
        """Host arrays of one minibatch -> device arrays split over the cell axis."""
        return self._cells(arrays)

    def replicated(self, tree: Any) -> Any:
        """A pytree -> the same values on every device."""
        return self._replicated(tree)

    def minibatches(
        self, data: anndata_io.CellData, size: int, *, dtype: Any, n_vars: int
    ) -> Iterator[anndata_io.Minibatch]:
        """The minibatches this process feeds (a lockstep run pads them to its peers')."""
        return anndata_io.minibatches(data, size, dtype=dtype, n_vars=n_vars)

    def own_rows(self, rows: dict[str, Any]) -> dict[str, Any]:
        """This process's rows of per-cell device arrays, on the host."""
        return jax.device_get(rows)

    def totals(self, tree: Any) -> Any:
        """Running totals (sums over the cells this placement sees) -> host."""
        return tree

    def n_obs(self, local: int) -> int:
        """Cells the totals cover, given this process's ``local`` count."""
        return local

    def stitch(self, out: np.ndarray, start: int, n_valid: int, rows: jax.Array, m: int) -> None:
        """Write minibatch ``m`` (starting at ``start``) of a per-cell array into ``out``, which
        holds every process's cells in row order."""
        out[start : start + n_valid] = np.asarray(rows)[:n_valid]


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


@functools.partial(jax.jit, static_argnames=("family", "library"))
def encode_counts(
    family: Family,
    params: Any,
    nz_index: jax.Array,
    nz_count: jax.Array,
    batch: jax.Array,
    label: jax.Array,
    *,
    library: LibraryChoice = "model",
) -> tuple[jax.Array, Encoded]:
    """(dense counts, encoding) of a minibatch given by its row-wise non-zeros: the dense block
    is scattered on the device, so only the non-zeros cross from the host (at 10 % non-zeros 5x
    fewer bytes; the dense copies took 0.46 s of a 2.5 s streamed run at 20k x 2,000, measured);
    padding adds 0 at gene 0."""
    # one scatter per row (vmap): the result keeps the cells' sharding on a mesh, where a 2-D
    # scatter comes out replicated and every device would encode the whole minibatch
    n_vars = family.n_vars
    x = jax.vmap(lambda i, c: jnp.zeros(n_vars, c.dtype).at[i].add(c))(nz_index, nz_count)
    return x, family.encode(params, x, batch, label, library=library)


def batches(
    family: Family,
    params: Any,
    data: anndata_io.CellData,
    plan: Plan,
    *,
    place: Placement,
    groups: np.ndarray | None = None,
) -> Iterator[tuple[int, int, Batch]]:
    """``(start, n_valid, Batch)`` per minibatch of ``data`` in obs order, placed and encoded once.
    ``groups``: (n_obs,) int32 codes, -1 for none.

    Reading, the non-zero scan and the host-to-device copy (one ``device_put`` of all of a
    minibatch's arrays) run on a background thread, so this thread only dispatches compute.
    """
    dtype = np.dtype(plan.dtype)
    x64 = dtype == np.float64

    def placed() -> Iterator[tuple[int, int, tuple[jax.Array, ...]]]:
        with jax.enable_x64(x64):  # the caller's precision context is thread-local
            mbs = place.minibatches(data, plan.batch_size, dtype=dtype, n_vars=family.n_vars)
            for mb in stages.iterate("read", mbs):
                size = len(mb.batch)
                group = np.full(size, -1, np.int32)
                if groups is not None:
                    group[: mb.n_valid] = groups[mb.start : mb.start + mb.n_valid]
                valid = (np.arange(size) < mb.n_valid).astype(dtype)
                arrays = (mb.nz_index, mb.nz_count, mb.batch, mb.label, valid, group)
                yield mb.start, mb.n_valid, stages.call("copy", place.cells, arrays, wait=True)

    for start, n_valid, (nz_index, nz_count, batch, label, valid, group) in prefetch(placed()):
        x, enc = encode_counts(
            family, params, nz_index, nz_count, batch, label, library=plan.library
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
                qz_m=enc.qz_m,
                qz_v=enc.qz_v,
                z=enc.z,
                log_library=enc.log_library,
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
    family: Family,
    params: Any,
    data: anndata_io.CellData,
    plan: Plan,
    scorers: Sequence[Scorer],
    sink: dict[str, Any],
    *,
    place: Placement,
    groups: np.ndarray | None = None,
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
    params = place.replicated(params)
    key = jax.random.key(plan.seed)
    need_key = any(s.needs_key for s in scorers)
    totals = [s.init() for s in scorers]

    with contextlib.ExitStack() as stack:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=data.n_obs, unit="cells", desc="ablate"))
        block = anndata_io.read_rows(family.n_vars, plan.batch_size)
        writer = _Writer(sink, block, bar, fetch=place.own_rows)
        try:
            for start, n_valid, batch in batches(
                family, params, data, plan, groups=groups, place=place
            ):
                sub = key
                if need_key:  # else the key is unused: skip a dispatch per minibatch
                    key, sub = jax.random.split(key)
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
    totals = [place.totals(t) for t in totals]
    n_obs = place.n_obs(data.n_obs)
    finished: dict[str, np.ndarray] = {}
    for scorer, total in zip(scorers, totals, strict=True):
        finished.update(scorer.finish(total, n_obs))
    return finished


def decoder_inputs(
    family: Family, params: Any, data: anndata_io.CellData, plan: Plan, *, place: Placement
) -> np.ndarray:
    """Decoder input at the posterior mean of every cell the placement covers (n_obs, n_latent),
    host, in row order (a lockstep placement gathers every process's cells)."""
    out = np.empty((place.n_obs(data.n_obs), family.n_latent), np.dtype(plan.dtype))
    for m, (start, n_valid, batch) in enumerate(
        batches(family, place.replicated(params), data, plan, place=place)
    ):
        place.stitch(out, start, n_valid, batch.z, m)
    return out


class OwnRows:
    """A scorer run by each process on its own rows and local devices in a distributed run: for
    per-cell work whose host-side steps differ between processes (the refit's restarts)."""

    def __init__(self, scorer: Any, lockstep: Placement, local: Placement):
        self.scorer, self.lockstep, self.local = scorer, lockstep, local
        self.fields, self.needs_key = scorer.fields, scorer.needs_key

    def init(self) -> Any:
        return self.scorer.init()

    def score(self, batch: Batch, totals: Any, key: jax.Array) -> tuple[dict[str, Any], Any]:
        own = Batch(*self.local.cells(list(self.lockstep.own_rows(batch._asdict()).values())))
        return self.scorer.score(own, totals, key)

    def finish(self, totals: Any, n_obs: int) -> dict[str, np.ndarray]:
        return self.scorer.finish(totals, n_obs)

    def settings(self) -> dict[str, Any]:
        return self.scorer.settings()
