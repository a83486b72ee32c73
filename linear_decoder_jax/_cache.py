"""Persistent JAX compilation cache: the sweep compiles once per shape, not once per process.

The CLI turns it on (``LDJ_COMPILATION_CACHE=0`` turns it off); API users opt in with
``ldj.enable_compilation_cache()``. It is JAX's own on-disk cache, process-wide by JAX's design,
which is why the library never enables it on import.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linear-decoder-jax" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Cache compiled sweeps under ``path`` (default ``~/.cache/linear-decoder-jax/jax``).

    Returns the folder, or None when it cannot be created (the cache is then simply not used).
    """
    import jax

    folder = Path(path) if path is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
