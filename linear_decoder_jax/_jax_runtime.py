"""The one place that reaches into JAX's private runtime (``jax._src``, jaxlib's extension, the
C++ terminate handler), for what no public API does; ``tests/test_jax_runtime.py`` exercises each
of these paths, so a JAX release that changes them fails that test, not a user's run.

* :func:`runtime_client` and :func:`coordinator_address`: the distributed runtime's client (its
  key-value store) and the coordinator's address; ``jax.distributed`` exposes neither.
* :func:`client_failure_callback`: within it, ``jax.distributed.initialize`` creates its runtime
  client with a failure callback. jax passes none, and the client's default then aborts the
  process with a C++ stack trace when the runtime reports a failed peer (a killed or frozen
  process, a lost coordinator): the client factory is patched for the call only.
* :func:`set_terminate_handler`: jaxlib 0.10 cannot hand the client's failure status to a Python
  callback: the call ends in ``std::terminate`` (a ``bad_cast``), which then runs this handler.
  Without libstdc++ the runtime's abort stays (the process still ends, with a stack trace).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable, Iterator
from typing import Any

_terminate_handler: Any = None  # the C function given to std::set_terminate, kept alive


def _distributed() -> Any:
    from jax._src import distributed

    return distributed


def runtime_client() -> Any:
    """The distributed runtime's client (key-value store) of this process, or None."""
    return _distributed().global_state.client


def coordinator_address() -> str | None:
    """``HOST:PORT`` of the coordinator (process 0's runtime service), when joined."""
    return _distributed().global_state.coordinator_address


@contextlib.contextmanager
def client_failure_callback(callback: Callable[[], None]) -> Iterator[None]:
    """Within, the distributed runtime client is created with ``callback`` as its failure
    handler (see the module docstring); the factory is restored on the way out."""
    lib = _distributed()._jax
    factory = lib.get_distributed_runtime_client

    def client(*args: Any, **kwargs: Any) -> Any:
        return factory(*args, **kwargs, missed_heartbeat_callback=lambda *_: callback())

    lib.get_distributed_runtime_client = client
    try:
        yield
    finally:
        lib.get_distributed_runtime_client = factory


def set_terminate_handler(handler: Callable[[], None]) -> bool:
    """Make ``handler`` the process's C++ terminate handler (once per process; later calls keep
    the first). False when libstdc++ cannot be found (the runtime's abort then stays)."""
    global _terminate_handler
    if _terminate_handler is not None:
        return True
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
        set_terminate = lib["_ZSt13set_terminatePFvvE"]  # std::set_terminate
    except (OSError, AttributeError):
        return False
    set_terminate.restype = ctypes.c_void_p
    set_terminate.argtypes = [ctypes.c_void_p]
    _terminate_handler = ctypes.CFUNCTYPE(None)(handler)
    set_terminate(ctypes.cast(_terminate_handler, ctypes.c_void_p))
    return True
