"""Atomic writes: build the output under a temporary name beside it, rename into place at the end.

A crash or Ctrl-C while writing leaves any existing destination untouched and no partial output
(only a hidden temporary, removed on the way out when Python unwinds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from linear_decoder_jax.errors import OutputExistsError


def check_destination(
    dst: str | os.PathLike, *, overwrite: bool, directory: bool | None = None
) -> Path:
    """Refuse an existing ``dst`` unless ``overwrite`` (and, when ``directory`` is given, unless
    it is of that kind: a file never replaces a folder); return it as an absolute Path."""
    path = Path(dst).expanduser().absolute()
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it."
        raise OutputExistsError(msg)
    if directory is not None and path.exists() and path.is_dir() != directory:
        kind = "folder" if path.is_dir() else "file"
        msg = f"{path} is an existing {kind}; --overwrite replaces only the same kind of output."
        raise OutputExistsError(msg)
    if not path.parent.is_dir():
        msg = f"Cannot write {path}: the folder {path.parent} does not exist."
        raise FileNotFoundError(msg)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an old ``path`` is removed only after the new one is in place."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, overwrite: bool, directory: bool) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dst`` in one rename."""
    path = check_destination(dst, overwrite=overwrite, directory=directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    target = tmp if directory else tmp / path.name
    try:
        yield target
        _replace(target, path)
    finally:
        _remove(tmp)
