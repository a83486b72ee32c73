"""Bounded, seeded fuzzing of the checkpoint reader and the h5ad path (well under a minute).

Every case must either load or raise one of our error classes (``ConverterError`` for
checkpoints, ``LDJError`` for data); none may run code, hang or kill the interpreter. Each failure
is reported with its kind and seed, so ``_checkpoint_case(kind, seed)`` or ``_h5ad_bytes(seed)``
rebuilds it.

* Checkpoints (in process, each case under a SIGALRM limit): the committed scvi-tools 1.4.2
  checkpoint ``tests/data/golden/model.pt`` with mutated ``data.pkl`` bytes or opcodes (the zip
  rebuilt around them), mutated or resized storage records, mutated archive bytes (stored and
  deflated archives), truncations, and code-running payloads spliced in at random opcode
  boundaries (alone: refused by name; with further mutations: refused or loaded, never run). The
  payloads would create a marker file, which must stay absent.
* h5ad content (in process): the demo counts with NaN, infinite, negative or fractional counts,
  dropped, duplicated, renamed or shuffled genes, renamed or missing batch categories, zeroed or
  subset cells, other matrix layouts, streamed from disk through ``ldj.ablate``.
* h5ad bytes (in a child process, restarted after a crash): random byte changes, blocks and
  truncations of the demo file, streamed through ``ldj.ablate``. The HDF5 C library itself can
  crash or hang on a few such files, which no Python code can catch; those cases are reported as
  warnings when the traceback shows the crash inside h5py, and fail the test otherwise.
"""

from __future__ import annotations

import json
import math
import os
import pickletools
import random
import re
import signal
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from reliability_tools import (
    DEMO_DATA,
    DEMO_MODEL,
    GOLDEN,
    ROOT,
    payloads,
    pkl_name,
    zip_bytes,
    zip_records,
)

import linear_decoder_jax as ldj
from converters import ConverterError, UnsafeCheckpointError, read_scvi_checkpoint
from linear_decoder_jax.config import ModelSpec
from linear_decoder_jax.errors import IncompatibleDataError, LDJError
from linear_decoder_jax.params import from_flat

CASE_SECONDS = 5  # per in-process case; a normal one takes milliseconds


class CaseTimeout(BaseException):  # not an Exception: no reader may swallow it
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def mutate(data: bytes, rng: random.Random, max_edits: int = 8) -> bytes:
    """Random byte edits: overwrite, bit flip, delete or insert a few bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, max_edits)):
        if not out:
            out += b"\x00"
        pos = rng.randrange(len(out))
        op = rng.random()
        if op < 0.4:
            out[pos] = rng.randrange(256)
        elif op < 0.6:
            out[pos] ^= 1 << rng.randrange(8)
        elif op < 0.8:
            del out[pos : pos + rng.randint(1, 8)]
        else:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

RECORDS = zip_records(GOLDEN)
PKL = pkl_name(RECORDS)
GOLDEN_BYTES = GOLDEN.read_bytes()
OPCODES = [(op.name, pos) for op, _, pos in pickletools.genops(RECORDS[PKL])]
STORAGES = [name for name in RECORDS if "/data/" in name]

#: kind -> number of seeded cases (about 400 in all, a few seconds)
CHECKPOINT_KINDS = {
    "pickle_bytes": 80,
    "pickle_opcodes": 60,
    "storage_bytes": 50,
    "archive_bytes": 60,
    "truncated": 40,
    "payload": 50,
    "payload_mutated": 60,
}


def _opcode_edit(data: bytes, rng: random.Random) -> bytes:
    """Delete, insert or overwrite with copies of whole opcodes (closer to a valid pickle than
    byte edits; after the first edit the boundaries are those of the original pickle)."""
    bounds = [pos for _, pos in OPCODES] + [len(data)]
    for _ in range(rng.randint(1, 3)):
        i, j = rng.randrange(len(bounds) - 1), rng.randrange(len(bounds) - 1)
        start, stop = bounds[i], bounds[i + 1]
        other = data[bounds[j] : bounds[j + 1]]
        choice = rng.random()
        if choice < 0.4:
            data = data[:start] + data[stop:]
        elif choice < 0.7:
            data = data[:start] + other + data[start:]
        else:
            data = data[:start] + other + data[stop:]
        bounds = [pos for pos in bounds if pos < len(data)] + [len(data)]
    return data


def _checkpoint_case(kind: str, seed: int, marker: Path) -> bytes:
    """The bytes of fuzz case ``seed`` of ``kind`` (a payload would create ``marker``)."""
    rng = random.Random(f"{kind}-{seed}")
    records = dict(RECORDS)
    compression = zipfile.ZIP_STORED
    if kind == "pickle_bytes":
        records[PKL] = mutate(records[PKL], rng)
    elif kind == "pickle_opcodes":
        records[PKL] = _opcode_edit(records[PKL], rng)
    elif kind == "storage_bytes":
        name = rng.choice(STORAGES)
        records[name] = mutate(records[name], rng, max_edits=4)
        if rng.random() < 0.3:  # or one value replaced by a non-finite one
            name = rng.choice([n for n in STORAGES if len(RECORDS[n]) >= 4])
            at = 4 * rng.randrange(len(records[name]) // 4)
            value = np.float32(rng.choice([math.nan, math.inf, -math.inf])).tobytes()
            records[name] = records[name][:at] + value + records[name][at + 4 :]
    elif kind == "archive_bytes":
        compression = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
        data = zip_bytes(records, compression)
        if rng.random() < 0.5:  # the central directory and local headers
            out = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                out[len(out) - 1 - rng.randrange(min(4000, len(out)))] = rng.randrange(256)
            return bytes(out)
        return mutate(data, rng)
    elif kind == "truncated":
        if rng.random() < 0.5:
            return GOLDEN_BYTES[: rng.randrange(len(GOLDEN_BYTES))]
        name = rng.choice([PKL, *STORAGES])
        records[name] = records[name][: rng.randrange(max(len(records[name]), 1))]
    elif kind in ("payload", "payload_mutated"):
        ops, _, _ = rng.choice(list(payloads(marker).values()))
        _, at = rng.choice(OPCODES)
        data = records[PKL]
        records[PKL] = data[:at] + ops + b"0" + data[at:]  # push the payload, then POP it
        if kind == "payload_mutated":
            records[PKL] = mutate(records[PKL], rng, max_edits=4)
    else:
        raise AssertionError(kind)
    return zip_bytes(records, compression)


def _load_checkpoint(path: Path) -> str:
    """'ok' or our error's class name; anything else raises."""
    try:
        ckpt = read_scvi_checkpoint(path)
    except ConverterError as err:
        return type(err).__name__
    for key, value in ckpt.params.items():
        assert value.dtype == np.float32 and np.isfinite(value).all(), key
    spec = ModelSpec.from_converter(ckpt.config)  # what ldj.load does next
    from_flat(ckpt.params, spec.model)
    json.dumps(ckpt.config)
    return "ok"


OURS = {
    "ok",
    "ConverterError",
    "MalformedCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
}


def test_fuzz_checkpoints(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    outcomes: Counter[tuple[str, str]] = Counter()
    failures = []
    for kind, n_cases in CHECKPOINT_KINDS.items():
        for seed in range(n_cases):
            path.write_bytes(_checkpoint_case(kind, seed, marker))
            try:
                with time_limit(CASE_SECONDS):
                    outcome = _load_checkpoint(path)
            except CaseTimeout:
                outcome = f"HANG (over {CASE_SECONDS} s)"
            except Exception as err:  # not one of ours: a finding
                outcome = f"{type(err).__name__}: {err}"
            if kind == "payload" and outcome != UnsafeCheckpointError.__name__:
                outcome = f"payload not refused ({outcome})"
            if marker.exists():
                outcome = f"RAN CODE ({outcome})"
                marker.unlink()
            outcomes[kind, outcome.split(":")[0]] += 1
            if outcome not in OURS:
                failures.append(f"{kind} seed {seed}: {outcome[:300]}")
    assert not failures, "\n".join(failures[:20])
    # the mutations reach past the zip layer: each error class and clean loads all occur
    seen = {outcome for _, outcome in outcomes}
    assert {"ok", "MalformedCheckpointError", "UnsafeCheckpointError"} <= seen, outcomes
    assert outcomes["payload", "UnsafeCheckpointError"] == CHECKPOINT_KINDS["payload"]


# --------------------------------------------------------------------------------------------
# h5ad content
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> ldj.LinearSCVI:
    return ldj.load(DEMO_MODEL)


def _content_case(adata: anndata.AnnData, seed: int) -> tuple[anndata.AnnData, str]:
    """A copy of ``adata`` with one to three random changes, and what they were."""
    rng = random.Random(f"content-{seed}")
    np_rng = np.random.default_rng(seed)
    a = adata.copy()
    done = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(
            [
                "nan", "inf", "negative", "fraction", "drop_genes", "duplicate_gene",
                "rename_batch", "drop_batch", "shuffle_genes", "extra_genes", "zero_cells",
                "subset_cells", "int_counts", "drop_obs_columns",
            ]
        )  # fmt: skip
        x = np.asarray(a.X.toarray() if sp.issparse(a.X) else a.X)
        if kind in ("nan", "inf", "negative", "fraction") and a.n_obs and a.n_vars:
            value = {"nan": np.nan, "inf": np.inf, "negative": -3.0, "fraction": 2.5}[kind]
            x = x.astype(np.float32)
            x[np_rng.integers(a.n_obs), np_rng.integers(a.n_vars)] = value
            a.X = x
        elif kind == "drop_genes" and a.n_vars:
            a = a[:, np_rng.random(a.n_vars) > rng.choice([0.01, 0.3, 1.0])].copy()
        elif kind == "duplicate_gene" and a.n_vars > 1:
            names = a.var_names.to_numpy().copy()
            i, j = np_rng.choice(a.n_vars, 2, replace=False)
            names[i] = names[j]
            a.var_names = names
        elif kind == "rename_batch" and "batch" in a.obs:
            a.obs["batch"] = a.obs["batch"].astype(str).replace("b1", f"batch-{seed}")
        elif kind == "drop_batch" and "batch" in a.obs:
            del a.obs["batch"]
        elif kind == "shuffle_genes":
            a = a[:, np_rng.permutation(a.n_vars)].copy()
        elif kind == "extra_genes":
            extra = anndata.AnnData(np.ones((a.n_obs, 2), np.float32), obs=a.obs[[]])
            extra.var_names = [f"EXTRA-{seed}-0", f"EXTRA-{seed}-1"]
            a = anndata.concat([a, extra], axis=1, merge="first")
        elif kind == "zero_cells" and a.n_obs:
            x = x.copy()
            x[np_rng.random(a.n_obs) < 0.2] = 0
            a.X = x
        elif kind == "subset_cells":
            a = a[np_rng.random(a.n_obs) < rng.choice([0.0, 0.05, 0.5])].copy()
        elif kind == "int_counts" and np.isfinite(x).all():
            a.X = np.rint(x).astype(np.int32)
        elif kind == "drop_obs_columns":
            a.obs = a.obs.drop(columns=["group", "planted"], errors="ignore")
        else:
            continue
        done.append(kind)
    layout = rng.choice(["dense", "csr", "csc"])
    if layout != "dense" and a.n_obs and a.n_vars:
        a.X = (sp.csr_matrix if layout == "csr" else sp.csc_matrix)(np.asarray(a.X))
    return a, f"{'+'.join(done) or 'unchanged'} ({layout})"


def _must_refuse(a: anndata.AnnData, model: ldj.LinearSCVI) -> bool:
    """Whether ``a`` breaks a data rule, judged independently of ``anndata_io``."""
    genes = list(model.spec.data.var_names)
    names = list(a.var_names)
    if a.n_obs == 0 or len(set(names)) < len(names) or not set(genes) <= set(names):
        return True
    batches = set(model.spec.data.batch_categories)
    if "batch" not in a.obs or not set(a.obs["batch"].astype(str)) <= batches:
        return True
    x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    x = x[:, [names.index(g) for g in genes]].astype(np.float64)
    return bool(~np.isfinite(x).all() or (x < 0).any() or (x != np.round(x)).any())


def test_fuzz_h5ad_content(demo_model: ldj.LinearSCVI, tmp_path: Path) -> None:
    demo = anndata.read_h5ad(DEMO_DATA)
    failures, outcomes = [], Counter()
    path, out = tmp_path / "cells.h5ad", tmp_path / "result.h5ad"
    for seed in range(60):
        adata, what = _content_case(demo, seed)
        refuse = _must_refuse(adata, demo_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(path)
        source = str(path) if seed % 2 else adata  # streamed from disk or in memory
        out.unlink(missing_ok=True)
        try:
            with time_limit(60), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Dropping N genes ..."
                result = ldj.ablate(demo_model, source, batch_size=16, output=out)
            outcome = "ok"
            arrays = (result.delta_nll, result.delta_l1, result.nll, result.mean_lfc)
            if not all(np.isfinite(np.asarray(a)).all() for a in arrays):
                outcome = "non-finite result"
            elif refuse:
                outcome = "loaded data that must be refused"
        except IncompatibleDataError:
            outcome = "refused"
            if not refuse:
                outcome = "refused valid data"
            elif out.exists():
                outcome = "refused but left an output"
        except LDJError as err:
            outcome = f"unexpected {type(err).__name__}: {err}"
        except CaseTimeout:
            outcome = "HANG"
        except Exception as err:
            outcome = f"{type(err).__name__}: {err}"
        outcomes[outcome.split(":")[0]] += 1
        if outcome not in ("ok", "refused"):
            failures.append(f"seed {seed} [{what}]: {outcome[:300]}")
    assert not failures, "\n".join(failures)
    assert outcomes["ok"] and outcomes["refused"], outcomes


# --------------------------------------------------------------------------------------------
# h5ad bytes, in a child process
# --------------------------------------------------------------------------------------------

N_H5AD_BYTES = 80
CHILD_CASE_SECONDS = 30  # the first case also compiles the model

_CHILD = """
import faulthandler, json, sys, warnings
from pathlib import Path
faulthandler.enable()
warnings.simplefilter("ignore")
import numpy as np
import linear_decoder_jax as ldj
from converters import ConverterError
from linear_decoder_jax.errors import LDJError

model = ldj.load({model!r})
for case in sys.argv[1:]:
    path = Path(case)
    out = path.with_suffix(".result.h5ad")
    print(json.dumps({{"start": case}}), flush=True)
    faulthandler.dump_traceback_later({seconds}, exit=True)
    try:
        result = ldj.ablate(model, str(path), batch_size=16, output=out)
        finite = all(
            np.isfinite(np.asarray(a)).all()
            for a in (result.delta_nll, result.delta_l1, result.nll, result.mean_lfc)
        )
        outcome = "ok" if finite else "non-finite result"
    except (LDJError, ConverterError) as err:
        outcome = "refused" if not out.exists() else "refused but left an output"
        if not isinstance(err, ldj.IncompatibleDataError):
            outcome = "unexpected " + type(err).__name__ + ": " + str(err)
    except Exception as err:
        outcome = type(err).__name__ + ": " + str(err)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({{"case": case, "outcome": outcome}}), flush=True)
"""


def _h5ad_bytes(seed: int) -> bytes:
    rng = random.Random(f"h5ad-{seed}")
    data = DEMO_DATA.read_bytes()
    kind = rng.choice(["flip", "flip", "block", "truncate"])
    if kind == "flip":
        return mutate(data, rng, max_edits=10)
    if kind == "block":
        at = rng.randrange(len(data))
        size = rng.randint(1, 64)
        return data[:at] + rng.randbytes(size) + data[at + size :]
    return data[: rng.randrange(len(data))]


def _inside_h5py(dump: str) -> bool:
    """Whether a faulthandler dump shows a thread stopped in h5py (in the HDF5 C code below it):
    the crashing thread after a fatal signal, any thread after the time limit."""
    blocks = re.split(r"^(?=(?:Current thread|Thread) 0x)", dump, flags=re.M)[1:]
    current = [b for b in blocks if b.startswith("Current thread")]
    for block in current or blocks:
        frames = [line for line in block.splitlines() if line.strip().startswith("File ")]
        if frames and f"{os.sep}h5py{os.sep}" in frames[0]:
            return True
    return False


def test_fuzz_h5ad_bytes(tmp_path: Path) -> None:
    cases = []
    for seed in range(N_H5AD_BYTES):
        cases.append(tmp_path / f"case{seed:03d}.h5ad")
        cases[-1].write_bytes(_h5ad_bytes(seed))
    script = textwrap.dedent(_CHILD).format(model=str(DEMO_MODEL), seconds=CHILD_CASE_SECONDS)
    outcomes: dict[str, str] = {}
    library_crashes, failures = [], []
    todo = [str(c) for c in cases]
    while todo:
        proc = subprocess.run(
            [sys.executable, "-c", script, *todo],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=CHILD_CASE_SECONDS * len(todo) + 120,
        )
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                outcomes[record["case"]] = record["outcome"]
        if proc.returncode == 0:
            break
        # the child died (a signal, or faulthandler's time limit) while reading ``started``
        assert started is not None and started not in outcomes, proc.stderr[-3000:]
        dump = "\n".join(
            line for line in proc.stderr.splitlines() if not line.startswith("Extension modules")
        )
        died = f"{Path(started).name}: exit {proc.returncode}\n{dump[-1500:]}"
        (library_crashes if _inside_h5py(proc.stderr) else failures).append(died)
        outcomes[started] = "died"
        todo = todo[todo.index(started) + 1 :]
    for case, outcome in sorted(outcomes.items()):
        if outcome not in ("ok", "refused", "died"):
            failures.append(f"{Path(case).name}: {outcome[:300]}")
    assert len(outcomes) == len(cases)
    assert not failures, "\n".join(failures[:10])
    assert len(library_crashes) <= N_H5AD_BYTES // 10, "\n".join(library_crashes)
    if library_crashes:
        warnings.warn(
            "The HDF5 library crashed or hung (inside h5py) on "
            + "; ".join(c.splitlines()[0] for c in library_crashes),
            stacklevel=1,
        )
    counts = Counter(outcomes.values())
    assert counts["ok"] and counts["refused"], counts
