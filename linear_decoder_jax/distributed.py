"""Many hosts on JAX's multi-process runtime: one ``ldj ablate`` (or ``ldj train``) command
across a cluster.

Every process runs the same command on the same (shared-storage) data. ``jax.distributed``
joins them (explicit coordinator, or its auto-detection: Slurm, Open MPI, TPU pods). The sweep runs
on one global mesh over every process's devices (:class:`Lockstep`: cells split, parameters
replicated): process i feeds its own rows ``pipeline.shard_rows((i, n))`` of every global minibatch, all
processes run as many minibatches of the same shapes (padding cells, widths agreed), and each
keeps the per-cell rows of its own cells, streamed to a hidden part next to the output; process 0
then assembles the one output atomically with the merge code and removes the parts.

* global quantities go through collectives on the mesh: "mean" and "median" baselines over an
  all-gather of every cell's decoder input (exactly a one-process run's), and every total the
  scorers reduce (the summed log fold changes, the per-group gene sums and cell counts);
* settings: each process publishes a digest of the model fingerprint, the data's shape and the run
  options to the runtime's key-value store; any difference is a one-line error naming them;
* liveness: two deadlines. Joining waits up to ``join_timeout`` seconds (processes of a cluster
  job may start minutes apart). Once joined, a process killed or frozen (SIGSTOP) is found by the
  runtime's own heartbeats within ``heartbeat_timeout`` seconds (default 15): they are sent by
  the runtime's C++ threads, so a long compile or a read that holds the GIL is not silence. The
  runtime then reports the failure to every process, whose client would abort with a C++ stack
  trace; ours ends it instead with one line naming the process that stopped (told apart by the
  Python heartbeat counter each process bumps every second) or the lost coordinator. A watchdog
  thread in every process also ends it at once when another process published an error (a
  failure in Python), when the coordinator is gone, or when a process alive to the runtime has not
  run Python for ``join_timeout`` seconds (a hung interpreter); a collective that lost a peer
  waits for the runtime to name it. No output appears unless every part arrived; an existing
  output is untouched. The private JAX this needs lives in :mod:`linear_decoder_jax._jax_runtime`.

``ldj train --distributed`` uses the same joining, settings check and liveness (:func:`guarded`);
its placement (cells of each minibatch split, weights replicated) is the trainer's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from linear_decoder_jax import _jax_runtime, anndata_io
from linear_decoder_jax.errors import DistributedError
from linear_decoder_jax.options import DistributedOptions
from linear_decoder_jax.pipeline import Placement, shard_rows

_POLL = 0.5  # seconds between checks of the key-value store
_GRACE = 3.0  # seconds process 0 keeps the service up after a failure (watchdogs poll each 1 s)
_STALE = 2.5  # seconds without a Python heartbeat (or a key-value answer) that name a process
_PREFIX = "ldj"
# what a dying process removes first (the parts of the running ``ablate``); set by ``ablate``
_cleanup: list[Callable[[], None]] = []
_dying = threading.Lock()  # one message, one exit, however many threads see the failure
_watchdog: Watchdog | None = None  # the running one: what it saw names the failed process


@dataclass(frozen=True)
class Cluster:
    """This process's place in the run: ``process_id`` of ``num_processes``."""

    process_id: int
    num_processes: int
    join_timeout: float  # seconds to join the run
    heartbeat_timeout: float  # seconds a killed or frozen process goes unnoticed, at most
    client: Any  # jax's DistributedRuntimeClient (its key-value store)

    @property
    def is_coordinator(self) -> bool:
        return self.process_id == 0


def _kill(message: str) -> None:
    """End this process at once with a one-line error: other threads may be blocked in the
    runtime, and the runtime's own shutdown would wait for the failed process."""
    if not _dying.acquire(blocking=False):  # another thread is already ending the process
        threading.Event().wait()
    for clean in _cleanup:
        clean()
    sys.stderr.write(f"ldj: error: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    join_timeout: float = DistributedOptions.join_timeout,
    heartbeat_timeout: float = DistributedOptions.heartbeat_timeout,
) -> Cluster:
    """Join the run through ``jax.distributed.initialize`` (its auto-detection when the three
    values are None) within ``join_timeout`` seconds; a wrong process count or an unreachable
    coordinator is a :class:`DistributedError`, not a hang. Once joined, a killed or frozen
    process ends every process within ``heartbeat_timeout`` seconds (a few more for the exit)."""
    import jax

    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        msg = (
            "Pass all of coordinator, num_processes and process_id (CLI: --coordinator, "
            "--num-processes, --process-id), or none of them for auto-detection."
        )
        raise DistributedError(msg)
    if num_processes is not None and process_id is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            msg = f"Expected 0 <= process_id < num_processes, got {process_id} of {num_processes}."
            raise DistributedError(msg)
    for name, value in (("join_timeout", join_timeout), ("heartbeat_timeout", heartbeat_timeout)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
            raise DistributedError(f"Expected {name} >= 1 second, got {value!r} instead.")
    if _jax_runtime.runtime_client() is None:
        # collectives between processes' CPU devices (the global mesh); accelerators have theirs
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        where = coordinator or "the auto-detected coordinator"
        advice = (
            "Check that every process was started with the same --coordinator and "
            "--num-processes, and that the coordinator (process 0) is reachable."
        )
        # the runtime aborts the process (a stack trace) when its own deadline passes: ours comes
        # first and says what to check
        joined = threading.Event()

        def deadline() -> None:
            if not joined.wait(join_timeout):
                _kill(
                    f"Could not join the distributed run at {where} within {join_timeout:g} s. "
                    f"{advice}"
                )

        threading.Thread(target=deadline, daemon=True).start()
        beat = max(1, round(heartbeat_timeout))
        _jax_runtime.set_terminate_handler(_runtime_failed)
        try:
            with _jax_runtime.client_failure_callback(_runtime_failed):
                jax.distributed.initialize(
                    coordinator_address=coordinator,
                    num_processes=num_processes,
                    process_id=process_id,
                    initialization_timeout=int(join_timeout) + 60,
                    # the runtime's heartbeats (C++ threads: the GIL does not stop them) find a
                    # killed or frozen process; the failure ends us through _runtime_failed
                    heartbeat_timeout_seconds=beat,
                    shutdown_timeout_seconds=max(10, beat),
                )
        except Exception as err:  # jax raises RuntimeError/ValueError/XlaRuntimeError
            first = str(err).splitlines()[0] if str(err) else ""
            msg = f"Could not join the distributed run at {where} ({type(err).__name__}: {first}). {advice}"
            raise DistributedError(msg) from err
        finally:
            joined.set()
    return Cluster(
        int(jax.process_index()),
        int(jax.process_count()),
        float(join_timeout),
        float(heartbeat_timeout),
        _jax_runtime.runtime_client(),
    )


def _runtime_failed() -> None:
    """End this process when the runtime reports a failure (one line, instead of the client's
    abort with a C++ stack trace), naming the process that stopped, or the lost coordinator."""
    import jax

    pid = int(jax.process_index())
    watchdog = _watchdog
    reason = None if watchdog is None else watchdog.reason()
    # a peer killed inside a collective reaches the runtime at once, before its heartbeat here
    # is stale: wait that long for the watchdog to name it
    deadline = time.monotonic() + _STALE + 1.5
    while reason is None and watchdog is not None and time.monotonic() < deadline:
        time.sleep(0.1)
        reason = watchdog.reason()
    if reason is None:
        reason = "the distributed runtime failed"
        if pid != 0 and not _answers(_jax_runtime.coordinator_address(), tries=3):
            reason = "lost the coordinator, process 0"
    if pid == 0:  # the others name the failed process before the service goes away
        time.sleep(_GRACE)
    _kill(f"{reason}; process {pid} stops, no output written.")


def _answers(address: str | None, *, tries: int) -> bool:
    """Whether something listens at ``address`` (HOST:PORT) each of ``tries`` times, 0.5 s apart
    (a dying coordinator drops its connections before its listening socket)."""
    if not address:
        return False
    host, _, port = address.rpartition(":")
    for i in range(tries):
        time.sleep(0.5 * (i > 0))
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                pass
        except (OSError, ValueError):
            return False
    return True


class Watchdog:
    """Python heartbeats and failure detection for one process (a daemon thread). Liveness
    itself is the runtime's (see the module docstring); what this thread saw names the process
    that stopped: its heartbeat counter stopped moving, or the key-value store (process 0)
    stopped answering."""

    def __init__(self, cluster: Cluster, *, on_failure: Callable[[], None] | None = None):
        self.cluster = cluster
        self.on_failure = on_failure
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        now = time.monotonic()
        self.answered = now  # the last round of key-value calls that all returned
        self.seen = {p: (-1, now) for p in range(cluster.num_processes) if p != cluster.process_id}

    def start(self) -> Watchdog:
        global _watchdog
        _watchdog = self
        self._thread.start()
        return self

    def stop(self) -> None:
        global _watchdog
        self.stopped.set()
        if _watchdog is self:
            _watchdog = None

    def reason(self) -> str | None:
        """Who stopped, as far as this process saw: the coordinator when the key-value store
        stopped answering, else the process whose heartbeat stopped first; None when none did."""
        now = time.monotonic()
        if self.cluster.process_id != 0 and now - self.answered > _STALE:
            return "lost the coordinator, process 0"
        stale = {p: now - since for p, (_, since) in self.seen.items() if now - since > _STALE}
        if not stale:
            return None
        p = max(stale, key=stale.__getitem__)
        if p == 0:
            return "lost the coordinator, process 0"
        return f"process {p} stopped answering (no heartbeat for {stale[p]:.0f} s)"

    def _loop(self) -> None:
        c = self.cluster
        beat = 0
        while not self.stopped.is_set():
            try:
                c.client.key_value_set_bytes(f"{_PREFIX}/alive/{c.process_id}", b"%d" % beat, True)
                beat += 1
                for p, (last, since) in self.seen.items():
                    error = _try_get(c, f"{_PREFIX}/error/{p}")
                    if error is not None:
                        self._fail(error.decode(errors="replace"))  # it names the process
                    now = _try_get(c, f"{_PREFIX}/alive/{p}")
                    value = -1 if now is None else int(now)
                    if value != last:
                        self.seen[p] = (value, time.monotonic())
                    elif time.monotonic() - since > c.join_timeout:  # a hung interpreter
                        if _try_get(c, f"{_PREFIX}/finished/{p}") is None:
                            self._fail(f"process {p} has not run for {c.join_timeout:g} s")
                self.answered = time.monotonic()
            except Exception:  # the runtime is gone: the coordinator died
                if self.stopped.wait(_STALE):  # (or the runtime names a failed peer first)
                    return
                self._fail(self.reason() or "lost the coordinator, process 0")
            self.stopped.wait(1.0)

    def _fail(self, reason: str) -> None:
        if self.on_failure is not None:
            self.on_failure()
        stop(self.cluster, reason)


def _try_get(cluster: Cluster, key: str) -> bytes | None:
    """The value of ``key``, or None when it is not set yet; other errors of the runtime (the
    coordinator is gone) propagate."""
    try:
        return cluster.client.key_value_try_get_bytes(key)
    except Exception as err:
        if "NOT_FOUND" in str(err):
            return None
        raise


def gather_bytes(cluster: Cluster, name: str, value: bytes) -> list[bytes]:
    """Every process's ``value`` for ``name``, in process order (waits; the watchdog bounds it)."""
    cluster.client.key_value_set_bytes(f"{_PREFIX}/{name}/{cluster.process_id}", value)
    out: list[bytes | None] = [None] * cluster.num_processes
    while any(v is None for v in out):
        for p in range(cluster.num_processes):
            if out[p] is None:
                out[p] = _try_get(cluster, f"{_PREFIX}/{name}/{p}")
        if any(v is None for v in out):
            time.sleep(_POLL)
    return [v for v in out if v is not None]


def gather_array(cluster: Cluster, name: str, array: np.ndarray) -> list[np.ndarray]:
    """Every process's ``array`` (any shapes, one dtype), in process order."""
    parts = gather_bytes(cluster, name, np.ascontiguousarray(array).tobytes())
    tail = array.shape[1:]
    return [np.frombuffer(p, dtype=array.dtype).reshape(-1, *tail) for p in parts]


class Lockstep(Placement):
    """The placement of a distributed run: one global mesh over every process's devices (``k``
    per process; cells split, parameters replicated), kept in lockstep: each process feeds its
    own rows of every global minibatch, pads to the minibatch count of the process with the most
    rows, and widens its non-zero block to the widest of the processes' (agreed per minibatch
    through the key-value store, off the device stream)."""

    def __init__(self, cluster: Cluster, k: int, n_obs: int):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.cluster, self.total = cluster, n_obs
        self._minibatches = itertools.count()

        def local(p: int) -> list[Any]:
            return sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)

        devices = [d for p in range(cluster.num_processes) for d in local(p)[:k]]
        self.mesh = Mesh(np.asarray(devices), ("cells",))
        self.split = NamedSharding(self.mesh, PartitionSpec("cells"))
        self.whole = NamedSharding(self.mesh, PartitionSpec())
        n = cluster.num_processes
        self.max_rows = max(hi - lo for lo, hi in (shard_rows((p, n), n_obs) for p in range(n)))

    def cells(self, arrays: Any) -> Any:
        """This process's rows of a minibatch -> global arrays split over cells."""
        import jax

        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(self.split, a), arrays)

    def replicated(self, tree: Any) -> Any:
        """The same values on every process -> global replicated arrays."""
        import jax

        def put(a: Any) -> Any:
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=a.dtype._impl)
            return jax.make_array_from_process_local_data(self.whole, np.asarray(a))

        return jax.tree.map(put, tree)

    def minibatches(
        self, data: anndata_io.CellData, size: int, *, dtype: Any, n_vars: int
    ) -> Iterator[anndata_io.Minibatch]:
        """This process's minibatches, non-zero blocks as wide as the widest process's, then empty
        ones up to the count of the process with the most rows."""
        count = 0
        for mb in anndata_io.minibatches(data, size, dtype=dtype, n_vars=n_vars):
            extra = self.width(mb.nz_index.shape[1]) - mb.nz_index.shape[1]
            mb.nz_index = np.pad(mb.nz_index, ((0, 0), (0, extra)))
            mb.nz_count = np.pad(mb.nz_count, ((0, 0), (0, extra)))
            count += 1
            yield mb
        while count < -(-self.max_rows // size):
            width = self.width(anndata_io.nz_width(0, n_vars))
            empty = np.zeros(size, np.int32)
            index = np.zeros((size, width), np.int32)
            yield anndata_io.Minibatch(
                data.n_obs, 0, n_vars, empty, empty, index, index.astype(dtype)
            )
            count += 1

    def own_rows(self, rows: dict[str, Any]) -> dict[str, Any]:
        return {k: self._own(v) for k, v in rows.items()}

    def _own(self, a: Any) -> np.ndarray:
        """This process's rows of a global per-cell array (host; local arrays pass through)."""
        if isinstance(a, np.ndarray) or a.is_fully_addressable:
            return np.asarray(a)
        n = self.cluster.num_processes
        b = a.shape[0] // n
        lo = self.cluster.process_id * b
        out = np.empty((b, *a.shape[1:]), a.dtype)
        for shard in a.addressable_shards:
            rows = shard.index[0] if shard.index else slice(None)
            start = rows.start or 0
            stop = a.shape[0] if rows.stop is None else rows.stop
            first, last = max(start, lo), min(stop, lo + b)
            if first < last:
                out[first - lo : last - lo] = np.asarray(shard.data)[first - start : last - start]
        return out

    def totals(self, tree: Any) -> Any:
        """Global totals (reduced over every process's cells) -> host arrays."""
        import jax
        from jax.experimental import multihost_utils

        def get(a: Any) -> Any:
            if isinstance(a, jax.Array) and not a.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(a, tiled=True))
            return a

        return jax.tree.map(get, tree)

    def n_obs(self, local: int) -> int:
        return self.total

    def stitch(self, out: np.ndarray, start: int, n_valid: int, rows: Any, m: int) -> None:
        from jax.experimental import multihost_utils

        z = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
        b, n = z.shape[0] // self.cluster.num_processes, self.cluster.num_processes
        for p in range(n):
            lo, hi = shard_rows((p, n), self.total)
            count = int(np.clip(hi - lo - m * b, 0, b))
            out[lo + m * b : lo + m * b + count] = z[p * b : p * b + count]

    def width(self, width: int) -> int:
        """The widest non-zero block of the next minibatch over the processes (every process
        asks once per minibatch of every pass over the data, in the same order)."""
        c, index = self.cluster, next(self._minibatches)
        c.client.key_value_set_bytes(f"{_PREFIX}/width/{index}/{c.process_id}", b"%d" % width)
        ms = int(2000 * c.heartbeat_timeout) + 60_000  # the runtime ends a run whose peers died
        return max(
            int(c.client.blocking_key_value_get_bytes(f"{_PREFIX}/width/{index}/{p}", ms))
            for p in range(c.num_processes)
        )


def check_same(cluster: Cluster, described: dict[str, Any]) -> None:
    """Refuse a run whose processes differ in model, data or options (one line, naming them)."""
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).digest()
    digests = gather_bytes(cluster, "settings", digest)
    differ = [p for p, d in enumerate(digests) if d != digests[0]]
    if differ:
        msg = (
            f"Processes {differ} were started with another model, data or options than process 0: "
            "run the same command on every process."
        )
        raise DistributedError(msg)


def publish_error(cluster: Cluster, err: BaseException) -> None:
    """Tell the other processes why this one stops (their watchdogs end them)."""
    try:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        key = f"{_PREFIX}/error/{cluster.process_id}"
        cluster.client.key_value_set_bytes(key, first.encode(), True)
    except Exception:  # noqa: BLE001 - the runtime may be gone already; we exit anyway
        pass


def stop(cluster: Cluster, reason: str) -> None:
    """Publish ``reason`` (it names the failed process) for the others and end this process.
    Process 0 hosts the runtime's service: it waits a moment first, so that the others read the
    reason and stop with it rather than with the runtime's own abort when the service goes away."""
    publish_error(cluster, RuntimeError(reason))
    if cluster.is_coordinator:
        time.sleep(_GRACE)
    _kill(f"{reason}; process {cluster.process_id} stops, no output written.")


def check_devices(cluster: Cluster, k: int) -> int:
    """Refuse a run whose processes use different numbers of devices (the global mesh takes
    ``k`` from each); returns the devices of the whole run."""
    n_devices = gather_array(cluster, "devices", np.asarray([k], np.int64))
    counts = sorted({int(d[0]) for d in n_devices})
    if len(counts) > 1:
        msg = f"Every process must use as many devices (the global mesh), got {counts}."
        raise DistributedError(msg)
    return int(sum(int(d[0]) for d in n_devices))


@contextlib.contextmanager
def guarded(cluster: Cluster, *, clean: Callable[[], None] | None = None) -> Iterator[None]:
    """Run this process's part of a distributed command under a :class:`Watchdog`: a failure
    here (or in any other process) ends every process with one line, after ``clean`` (what
    this process must not leave behind). A body that returns marks this process finished."""
    if clean is not None:
        _cleanup.append(clean)
    watchdog = Watchdog(cluster, on_failure=clean).start()
    try:
        yield
        mark(cluster, "finished")
    except Exception as err:
        import jax

        if isinstance(err, jax.errors.JaxRuntimeError):
            # a collective lost a peer (gloo fails at once): the runtime finds the process that
            # stopped within its heartbeat timeout, and _runtime_failed names it
            time.sleep(cluster.heartbeat_timeout + 5.0)
        watchdog.stop()
        if clean is not None:
            clean()
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        stop(cluster, f"process {cluster.process_id} failed: {first}")
        raise  # unreachable: stop exits
    watchdog.stop()
    if clean is not None:
        _cleanup.remove(clean)


def parts_folder(output: str | os.PathLike) -> Path:
    """The hidden folder next to ``output`` where the processes write their parts."""
    out = Path(output).absolute()
    return out.parent / f".{out.name}.ldj-parts"


def wait_for(cluster: Cluster, key: str, processes: list[int]) -> None:
    """Wait until every process in ``processes`` has set ``key`` (the watchdog bounds it)."""
    pending = set(processes)
    while pending:
        pending = {p for p in pending if _try_get(cluster, f"{_PREFIX}/{key}/{p}") is None}
        if pending:
            time.sleep(_POLL)


def mark(cluster: Cluster, key: str) -> None:
    """Tell the other processes that this one reached ``key`` (again: a second mark is fine)."""
    cluster.client.key_value_set_bytes(f"{_PREFIX}/{key}/{cluster.process_id}", b"1", True)


def remove_parts(output: str | os.PathLike) -> None:
    shutil.rmtree(parts_folder(output), ignore_errors=True)


def ablate(
    model: Any,
    adata: Any,
    full: Any,
    opts: dict[type, Any],
    *,
    devices: list[Any],
    output: str | os.PathLike,
    cluster: Cluster,
    overwrite: bool,
) -> Any:
    """This process's part of a distributed ``ldj.ablate``: its rows, global baselines, then (on
    process 0) the one output. Every process returns the assembled result (read from the output
    on shared storage). Any failure ends every process (one line on stderr, exit status 1), with no
    output written."""
    from linear_decoder_jax import assemble, merge, options
    from linear_decoder_jax.results import AblationResult

    pid, n = cluster.process_id, cluster.num_processes
    folder = parts_folder(output)
    target = Path(output).absolute()

    def clean() -> None:
        remove_parts(output)
        for tmp in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    with guarded(cluster, clean=clean):
        described = {
            "model": model.fingerprint,
            "dtype": model.dtype,
            "n_obs": int(adata.n_obs),
            "output": str(target),
        }
        for o in opts.values():  # how each process runs may differ: devices, progress bar
            described.update(options.to_dict(o))
        for own in ("devices", "progress"):
            described.pop(own, None)
        check_same(cluster, described)
        n_devices = check_devices(cluster, len(devices))
        folder.mkdir(exist_ok=True)
        part = folder / f"part-{pid}-of-{n}.h5ad"
        lockstep = Lockstep(cluster, len(devices), int(adata.n_obs))
        run = options.ExecutionOptions
        opts = {**opts, run: dataclasses.replace(opts[run], shard=(pid, n))}
        assemble.ablate(
            model,
            adata,
            full,
            opts,
            devices=devices,
            output=part,
            overwrite=True,
            lockstep=lockstep,
        )
        mark(cluster, "done")
        if cluster.is_coordinator:
            wait_for(cluster, "done", list(range(n)))
            parts = [folder / f"part-{p}-of-{n}.h5ad" for p in range(n)]
            extra = {"n_processes": n, "n_devices": n_devices}
            merge.merge_parts(
                parts,
                output,
                overwrite=overwrite,
                settings=extra,
                whole_ok=n == 1,
                global_totals=True,
            )
            remove_parts(output)
            mark(cluster, "assembled")
        else:
            wait_for(cluster, "assembled", [0])
        result = AblationResult.read(output)
    return result
