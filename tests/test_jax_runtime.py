"""The private JAX that ``linear_decoder_jax._jax_runtime`` patches, exercised: a JAX release that
changes it fails here, not in a user's distributed run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_patched_client_factory_is_what_jax_distributed_calls():
    """``client_failure_callback`` reaches the client ``jax.distributed.initialize`` creates (it
    takes a failure callback), and the client and coordinator address are where we read them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _run(
        f"""
        import jax
        from jax._src import distributed
        from linear_decoder_jax import _jax_runtime

        lib, made = distributed._jax, []
        factory = lib.get_distributed_runtime_client

        def spy(*args, **kwargs):
            made.append(kwargs)
            return factory(*args, **kwargs)

        lib.get_distributed_runtime_client = spy
        assert _jax_runtime.runtime_client() is None
        with _jax_runtime.client_failure_callback(lambda: None):
            jax.distributed.initialize(
                "127.0.0.1:{port}", 1, 0, heartbeat_timeout_seconds=5, shutdown_timeout_seconds=5
            )
        assert lib.get_distributed_runtime_client is spy  # restored on the way out
        assert len(made) == 1 and callable(made[0]["missed_heartbeat_callback"]), made
        assert made[0]["heartbeat_timeout"] == 5
        client = _jax_runtime.runtime_client()
        client.key_value_set_bytes("ldj/probe", b"42")
        assert client.key_value_try_get_bytes("ldj/probe") == b"42"
        assert _jax_runtime.coordinator_address() == "127.0.0.1:{port}"
        jax.distributed.shutdown()
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_terminate_handler_ends_the_process_in_python():
    """``set_terminate_handler`` makes a Python function the C++ terminate handler: what the
    runtime client's failure ends in (``std::terminate``) runs it instead of the abort."""
    proc = _run(
        """
        import ctypes, ctypes.util, os, sys
        from linear_decoder_jax import _jax_runtime

        def handler():
            sys.stdout.write("handled\\n")
            sys.stdout.flush()
            os._exit(3)

        assert _jax_runtime.set_terminate_handler(handler)
        lib = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
        lib["_ZSt9terminatev"]()  # std::terminate
        """
    )
    assert proc.returncode == 3 and proc.stdout == "handled\n", proc.stderr[-3000:]
