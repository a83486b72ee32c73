"""Data-parallel training on two (host-platform) devices equals one device.

Run in a subprocess: the device count must be set before jax starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).parent

SCRIPT = r"""
import json, sys, warnings
import numpy as np
sys.path.insert(0, sys.argv[1])
import jax
from conftest import make_adata
import linear_decoder_jax as ldj
from linear_decoder_jax.params import to_flat
assert len(jax.devices()) == 2, jax.devices()
from linear_decoder_jax.training.trainer import _Placement
rows = _Placement(jax.devices()).cells(np.zeros((1, 32)), 1)
assert len(rows.sharding.device_set) == 2 and not rows.sharding.is_fully_replicated
adata = make_adata(4, n_obs=100, n_vars=20)
out = {}
warnings.simplefilter("ignore")
for n in (1, 2):
    # 90 training cells: two minibatches of 32 cells split over the devices, one of 26
    model = ldj.train(adata, batch_key="batch", devices=n, max_epochs=1, batch_size=32,
                      n_latent=3, n_hidden=16, progress_bar=False, seed=5)
    out[n] = {k: np.asarray(v).tolist() for k, v in to_flat(model.host_params).items()}
print(json.dumps(out))
"""


def test_two_devices_equal_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(TESTS.parent))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TESTS)], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    assert set(one) == set(two)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=2e-6, err_msg=key)
