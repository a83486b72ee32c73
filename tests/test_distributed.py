"""Multi-process runs on localhost (jax.distributed): one-process results, clean failures."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import free_port, process_env, random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax.options import DistributedOptions

JOIN = 8  # seconds to join, where a test waits for a join that cannot happen
STOPPED = 30  # seconds within which a killed or frozen process stops every other one (default)
assert (
    DistributedOptions.heartbeat_timeout + 10 <= STOPPED
)  # detection, then the exit (process 0: +3 s)


def _launch(model_dir, data, out, n, *extra, devices=1, port=None, ids=None):
    port = port or free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "linear_decoder_jax",
                "ablate",
                str(model_dir),
                str(data),
                "-o",
                str(out),
                "--float64",
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
                *extra,
            ],
            env=process_env(devices, compilation_cache=False),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (range(n) if ids is None else ids)
    ]


def _errors(stderr: str) -> list[str]:
    """Our error lines on stderr (the runtime logs its own lines with a severity and a date)."""
    return [line for line in stderr.splitlines() if line.startswith("ldj: error:")]


def _kill_mid_run(tmp, out, parts, *, n, victim, sig=signal.SIGKILL, extra=()):
    """Launch ``n`` slow processes (long refits) over an existing ``out``, send ``sig`` to
    ``victim`` once every process has joined and checked (the parts folder exists):
    (processes, signal time). The liveness timeout is the default one."""
    out.write_bytes(b"old result")
    extra = ["--overwrite", "--refit", "--refit-steps", "400", "--refit-tol", "0", *extra]
    procs = _launch(tmp / "model", tmp / "cells.h5ad", out, n, *extra)
    deadline = time.monotonic() + 120
    while not parts.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert parts.exists()
    time.sleep(1.0)
    procs[victim].send_signal(sig)
    return procs, time.monotonic()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model = random_model(seed=11, dtype="float64", n_input=40)
    adata = random_adata(model, n_obs=301, seed=12)
    adata.obs["group"] = np.where(np.arange(301) % 3 == 0, "a", "b")
    adata.obs.loc[adata.obs.index[5], "group"] = None  # a cell without a group
    model.save(tmp / "model")
    adata.write_h5ad(tmp / "cells.h5ad")
    return model, adata, tmp


@pytest.mark.parametrize(("n", "devices"), [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_processes_give_the_one_process_result(setup, tmp_path, n, devices):
    model, adata, tmp = setup
    out = tmp_path / "out.h5ad"
    extra = ["--baseline", "median", "--groupby", "group"]
    procs = _launch(tmp / "model", tmp / "cells.h5ad", out, n, *extra, devices=devices)
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    assert "wrote" in outputs[0][0] and all("wrote" not in o for o, _ in outputs[1:])
    got = ldj.AblationResult.read(out)
    whole = ldj.ablate(model, adata, baseline="median", groupby="group")
    assert list(got.obs_names) == list(adata.obs_names)
    np.testing.assert_allclose(
        got.settings["baseline_values"], whole.settings["baseline_values"], rtol=1e-6
    )
    for key in ("delta_nll", "delta_l1", "latent", "nll", "mean_lfc"):
        np.testing.assert_allclose(getattr(got, key), getattr(whole, key), rtol=1e-9, atol=1e-9)
    for key in ("mean", "median", "frac_positive"):
        np.testing.assert_allclose(got.groups[key].to_numpy(), whole.groups[key].to_numpy())
    assert int(got.groups["n_no_group"]) == 1 == int(whole.groups["n_no_group"])
    assert got.settings["n_processes"] == n and got.settings["n_devices"] == n * devices
    assert not any(tmp_path.glob(".*")), "parts or temporaries left behind"


@pytest.mark.parametrize(("n", "devices"), [(2, 2), (3, 1)])
def test_gene_scores_and_exact_shapley_give_the_one_process_result(setup, tmp_path, n, devices):
    """Totals reduced on the global mesh (mean LFC, per-group gene sums and cell counts) and
    the explained shares equal a one-process run."""
    model, adata, tmp = setup
    out = tmp_path / "out.h5ad"
    extra = ["--baseline", "mean", "--groupby", "group", "--gene-scores", "--shapley", "exact"]
    procs = _launch(tmp / "model", tmp / "cells.h5ad", out, n, *extra, devices=devices)
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    got = ldj.AblationResult.read(out)
    whole = ldj.ablate(
        model, adata, baseline="mean", groupby="group", gene_scores=True, shapley="exact"
    )
    np.testing.assert_allclose(
        got.settings["baseline_values"], whole.settings["baseline_values"], rtol=1e-9
    )
    fields = ("delta_nll", "mean_lfc", "gain_nll", "shapley_nll", "gene_n_cells")
    for key in (*fields, "gene_delta_nll", "gene_lfc"):
        a, b = np.asarray(got.arrays[key]), np.asarray(whole.arrays[key])
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(
        got.explained().to_numpy(float), whole.explained().to_numpy(float), rtol=1e-9
    )
    assert got.settings["n_processes"] == n and got.settings["n_devices"] == n * devices


def test_refit_samples_and_mean_baseline(setup, tmp_path):
    model, adata, tmp = setup
    out = tmp_path / "out.h5ad"
    extra = ["--baseline", "mean", "--refit", "--refit-steps", "20", "--n-samples", "2"]
    procs = _launch(tmp / "model", tmp / "cells.h5ad", out, 2, *extra)
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    got = ldj.AblationResult.read(out)
    whole = ldj.ablate(model, adata, baseline="mean", refit=True, refit_steps=20)
    np.testing.assert_allclose(
        got.settings["baseline_values"], whole.settings["baseline_values"], rtol=1e-9
    )
    # refit fits are per cell: equal to the one-process run; MC draws follow each process's keys
    np.testing.assert_allclose(got.unique_delta_nll, whole.unique_delta_nll, rtol=1e-6, atol=1e-6)
    assert got.delta_nll_se is not None and np.isfinite(got.delta_nll_se).all()


def test_a_killed_process_stops_the_others(setup, tmp_path):
    """SIGKILL of one process mid-run: the others exit non-zero within the timeout, naming it;
    no output appears and an existing one is untouched; no parts are left."""
    model, adata, tmp = setup
    out, parts = tmp_path / "out.h5ad", tmp_path / ".out.h5ad.ldj-parts"
    procs, killed_at = _kill_mid_run(tmp, out, parts, n=3, victim=1)
    for i in (0, 2):
        _, err = procs[i].communicate(timeout=STOPPED * 3)
        assert procs[i].returncode not in (0, None)
        assert time.monotonic() - killed_at < STOPPED
        lines = _errors(err)
        assert len(lines) == 1 and "process 1" in lines[0], err[-2000:]
    procs[1].wait()
    assert out.read_bytes() == b"old result"
    assert not parts.exists() and not any(tmp_path.glob(".out.h5ad.tmp-*"))


def test_unreachable_coordinator_and_mismatched_settings(setup, tmp_path):
    model, adata, tmp = setup
    out = tmp_path / "out.h5ad"
    # process 1 of 2 alone: nobody answers at the coordinator's address
    start = time.monotonic()
    (lonely,) = _launch(
        tmp / "model", tmp / "cells.h5ad", out, 2, "--join-timeout", str(JOIN), ids=[1]
    )
    _, err = lonely.communicate(timeout=JOIN * 6)
    assert lonely.returncode == 1 and time.monotonic() - start < JOIN * 4
    lines = _errors(err)
    assert len(lines) == 1 and "Could not join the distributed run" in lines[0], err[-2000:]
    # the same processes with different options: one line each, naming the processes
    port = free_port()
    a = _launch(tmp / "model", tmp / "cells.h5ad", out, 2, "--mode", "keep", port=port, ids=[0])
    b = _launch(tmp / "model", tmp / "cells.h5ad", out, 2, port=port, ids=[1])
    for p in (*a, *b):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1
        lines = _errors(err)
        assert len(lines) == 1 and "process" in lines[0].lower(), err[-2000:]
    assert not out.exists()


def test_api_refuses_distributed_without_output(setup):
    model, adata, _ = setup
    with pytest.raises(ldj.ConfigError, match="writes one output"):
        ldj.ablate(model, adata, distributed=True)


def test_cli_refuses_distributed_flags_without_distributed(setup, tmp_path, capsys):
    _, _, tmp = setup
    from linear_decoder_jax.cli import main

    argv = ["ablate", str(tmp / "model"), str(tmp / "cells.h5ad"), "-o", str(tmp_path / "o.h5ad")]
    assert main([*argv, "--num-processes", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ldj: error: --coordinator, --num-processes and --process-id need --distributed."
    ]
    assert not (tmp_path / "o.h5ad").exists()


def test_a_killed_coordinator_stops_the_others(setup, tmp_path):
    """SIGKILL of process 0 (it hosts the runtime's service) mid-run: the other exits non-zero
    within the timeout with one line naming process 0 and no stack trace; no output, no parts."""
    model, adata, tmp = setup
    out, parts = tmp_path / "out.h5ad", tmp_path / ".out.h5ad.ldj-parts"
    procs, killed_at = _kill_mid_run(tmp, out, parts, n=2, victim=0)
    _, err = procs[1].communicate(timeout=STOPPED * 3)
    assert procs[1].returncode not in (0, None)
    assert time.monotonic() - killed_at < STOPPED
    lines = [line for line in err.splitlines() if not line.startswith("ldj: compiling")]
    assert lines == [
        "ldj: error: lost the coordinator, process 0; process 1 stops, no output written."
    ], err[-2000:]
    assert not any(
        line.startswith(("***", "F1", "Check failed", "  @")) for line in err.splitlines()
    )
    procs[0].wait()
    assert out.read_bytes() == b"old result"
    assert not parts.exists() and not any(tmp_path.glob(".out.h5ad.tmp-*"))


@pytest.mark.parametrize("victim", [1, 0], ids=["peer", "coordinator"])
def test_a_frozen_process_stops_the_others(setup, tmp_path, victim):
    """SIGSTOP of one process mid-run (a frozen host): the other exits non-zero within the
    default liveness timeout, one line naming it; no output, old output intact, no parts. Once
    continued, the frozen process ends too."""
    model, adata, tmp = setup
    out, parts = tmp_path / "out.h5ad", tmp_path / ".out.h5ad.ldj-parts"
    procs, stopped_at = _kill_mid_run(tmp, out, parts, n=2, victim=victim, sig=signal.SIGSTOP)
    other = 1 - victim
    try:
        _, err = procs[other].communicate(timeout=STOPPED * 3)
        assert procs[other].returncode not in (0, None)
        assert time.monotonic() - stopped_at < STOPPED
        named = "lost the coordinator, process 0" if victim == 0 else "process 1"
        lines = _errors(err)
        assert len(lines) == 1 and named in lines[0], err[-2000:]
        assert not any(line.startswith(("***", "F1", "  @")) for line in err.splitlines())
        procs[victim].send_signal(signal.SIGCONT)
        procs[victim].communicate(timeout=STOPPED * 3)
        assert procs[victim].returncode not in (0, None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert out.read_bytes() == b"old result"
    assert not parts.exists() and not any(tmp_path.glob(".out.h5ad.tmp-*"))


_HOLD_GIL = """
import ctypes, sys
from linear_decoder_jax import anndata_io
from linear_decoder_jax.cli import console_main

libc, calls, read = ctypes.PyDLL(None), [0], anndata_io.nonzeros

def nonzeros(*args, **kwargs):  # a read that holds the GIL for 3 liveness timeouts, once
    calls[0] += 1
    if calls[0] == 2 and {hold}:
        libc.sleep(3 * {timeout})  # PyDLL: the GIL stays held for the whole call
    return read(*args, **kwargs)

anndata_io.nonzeros = nonzeros
sys.argv = {argv!r}
console_main()
"""


def test_a_read_holding_the_gil_is_not_silence(setup, tmp_path):
    """A process whose reading thread holds the GIL for 3x the liveness timeout (no Python runs
    in it, the runtime's heartbeats go on) is alive: the run completes."""
    model, adata, tmp = setup
    out, port, timeout = tmp_path / "out.h5ad", free_port(), 3
    procs = []
    for i in range(2):
        argv = ["ldj", "ablate", str(tmp / "model"), str(tmp / "cells.h5ad"), "-o", str(out)]
        argv += ["--float64", "--distributed", "--coordinator", f"127.0.0.1:{port}"]
        argv += ["--num-processes", "2", "--process-id", str(i)]
        argv += ["--heartbeat-timeout", str(timeout), "--batch-size", "32"]
        script = _HOLD_GIL.format(hold=i == 1, timeout=timeout, argv=argv)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=process_env(1, compilation_cache=False),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.monotonic()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    assert time.monotonic() - start > 3 * timeout  # the hold happened
    got = ldj.AblationResult.read(out)
    whole = ldj.ablate(model, adata).delta_nll
    np.testing.assert_allclose(got.delta_nll, whole, rtol=1e-9, atol=1e-9)
