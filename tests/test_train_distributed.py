"""``ldj train --distributed``: local processes joined by jax.distributed (gloo collectives
between CPU processes) train the model one process trains on the same global minibatches, and
a lost process ends the others with one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import make_adata
from helpers import free_port, process_env

import linear_decoder_jax as ldj
from linear_decoder_jax.params import to_flat

# 100 cells, 90 for training: minibatches of 32, 32 and 26 cells (26 is split over 2 devices,
# and runs replicated over 4)
SMALL = dict(batch_key="batch", max_epochs=2, batch_size=32, n_latent=3, n_hidden=16, seed=5)


def _flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _launch(data, out, n, *extra, devices=1, options=SMALL):
    port = free_port()
    argv = [sys.executable, "-m", "linear_decoder_jax", "train", str(data), "-o", str(out)]
    argv += [*_flags(options), "--quiet", "--distributed", "--coordinator", f"127.0.0.1:{port}"]
    argv += ["--num-processes", str(n), *extra]
    return [
        subprocess.Popen(
            [*argv, "--process-id", str(i)],
            env=process_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def _finish(procs, timeout=300):
    """(stdout, stderr) of each process; none is left running, even when one hangs."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-dist")
    adata = make_adata(4, n_obs=100, n_vars=20)
    on_disk = adata.copy()
    on_disk.X = sp.csr_matrix(on_disk.X)
    on_disk.write_h5ad(tmp / "cells.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = ldj.train(adata, progress_bar=False, **SMALL)  # one process, one device
    return tmp, whole


@pytest.mark.parametrize(("devices", "stream"), [(1, False), (2, True)])
def test_processes_train_the_one_process_model(data, tmp_path, devices, stream):
    tmp, whole = data
    out, state = tmp_path / "model", tmp_path / "state.npz"
    extra = ["--checkpoint", str(state), *(["--stream"] if stream else [])]
    procs = _launch(tmp / "cells.h5ad", out, 2, *extra, devices=devices)
    outputs = _finish(procs)
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "wrote" in outputs[0][0] and "wrote" not in outputs[1][0]  # process 0 writes
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model", "state.npz"]  # no temporaries
    got = ldj.load(out)
    expected, trained = to_flat(whole.host_params), to_flat(got.host_params)
    assert set(trained) == set(expected)
    for key in expected:  # equal up to the order of float32 reductions
        np.testing.assert_allclose(trained[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert set(got.history_) == set(whole.history_)
    for key, frame in whole.history_.items():
        np.testing.assert_allclose(got.history_[key].to_numpy(), frame.to_numpy(), rtol=1e-5)
    np.testing.assert_array_equal(got.train_indices, whole.train_indices)


def test_a_lost_process_ends_the_other_and_resume_continues(data, tmp_path):
    """SIGKILL of process 1 after a checkpoint: process 0 exits non-zero with one line naming
    it and no model is written; both processes started again with --resume continue from
    process 0's checkpoint to the model one process trains uninterrupted."""
    tmp, _ = data
    out, state = tmp_path / "model", tmp_path / "state.npz"
    extra = ["--checkpoint", str(state), "--heartbeat-timeout", "3"]
    procs = _launch(tmp / "cells.h5ad", out, 2, *extra, options=dict(SMALL, max_epochs=400))
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not state.exists():
        pytest.fail(f"no checkpoint within 120 s: {_finish(procs, timeout=1)}")
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    ((_, err), _) = _finish(procs, timeout=120)
    assert procs[0].returncode not in (0, None)
    assert time.monotonic() - killed < 30
    lines = [line for line in err.splitlines() if line.startswith("ldj: error:")]
    assert len(lines) == 1 and "process 1" in lines[0], err[-2000:]
    assert not out.exists()

    with np.load(state) as npz:  # the last finished epoch; max_epochs may change on resume
        epochs = json.loads(npz["state"].tobytes())["epoch"] + 3
    options = dict(SMALL, max_epochs=epochs)
    procs = _launch(tmp / "cells.h5ad", out, 2, *extra, "--resume", options=options)
    for p, (_, err) in zip(procs, _finish(procs), strict=True):
        assert p.returncode == 0, err[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = ldj.train(make_adata(4, n_obs=100, n_vars=20), progress_bar=False, **options)
    got = ldj.load(out)
    expected, trained = to_flat(whole.host_params), to_flat(got.host_params)
    for key in expected:
        np.testing.assert_allclose(trained[key], expected[key], rtol=1e-3, atol=1e-4, err_msg=key)
    for key, frame in whole.history_.items():
        np.testing.assert_allclose(got.history_[key].to_numpy(), frame.to_numpy(), rtol=1e-4)


def test_distributed_flags_without_distributed_are_refused(data, tmp_path, capsys):
    tmp, _ = data
    from linear_decoder_jax import cli

    argv = ["train", str(tmp / "cells.h5ad"), "-o", str(tmp_path / "m"), "--process-id", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ldj: error: --coordinator, --num-processes and --process-id need --distributed."
    ]
    with pytest.raises(ldj.ConfigError, match="need distributed=True"):
        ldj.train(tmp / "cells.h5ad", num_processes=2)
    assert not (tmp_path / "m").exists()
