"""Startup (issue 16, point 10): path and argument errors are answered before jax or anndata is
imported, and a cold run says that it is compiling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from linear_decoder_jax.cli import main
from linear_decoder_jax.demo import demo_files

DEMO = demo_files()
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["ablate", "{model}", "missing.h5ad", "-o", "{tmp}/r.h5ad"], "missing.h5ad: no such file"),
        (["ablate", "nowhere", "{data}", "-o", "{tmp}/r.h5ad"], "nowhere: no such file"),
        (["ablate", "{model}", "{data}", "-o", "{tmp}/r.csv"], "ending in .h5ad"),
        (["ablate", "{model}", "{data}", "-o", "{tmp}/no/r.h5ad"], "does not exist"),
        (["convert", "{model}", "{tmp}"], "already exists; pass --overwrite"),
        (["report", "{tmp}/r.h5ad", "-o", "{tmp}/r.html"], "no such file"),
    ],
)
def test_path_errors_come_before_heavy_imports(tmp_path: Path, argv, fragment) -> None:
    args = [
        a.format(model=DEMO / "model.pt", data=DEMO / "counts.h5ad", tmp=tmp_path) for a in argv
    ]
    code = f"""
import sys
from linear_decoder_jax.cli import main
rc = main({args!r})
heavy = [m for m in ("jax", "anndata", "h5py", "zarr") if m in sys.modules]
print(rc, heavy)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    rc, heavy = done.stdout.split(" ", 1)
    assert rc == "1" and heavy.strip() == "[]", done.stdout
    assert done.stderr.count("\n") == 1 and fragment in done.stderr, done.stderr


def test_typo_answered_end_to_end() -> None:
    """How fast: benchmarks/bench_startup.py (no timed unit tests on shared machines)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "linear_decoder_jax",
            "ablate",
            str(DEMO / "model.pt"),
            "typo.h5ad",
            "-o",
            "r.h5ad",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 1 and "typo.h5ad: no such file" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_cold_run_says_it_is_compiling(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LDJ_COMPILATION_CACHE", "0")  # leave the test process's jax config alone
    argv = [
        "ablate",
        str(DEMO / "model.pt"),
        str(DEMO / "counts.h5ad"),
        "-o",
        str(tmp_path / "r.h5ad"),
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "ldj: compiling (compilation cache off)..."


def test_empty_cache_says_first_run(tmp_path: Path, capsys, monkeypatch) -> None:
    from linear_decoder_jax import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LDJ_COMPILATION_CACHE", raising=False)
    cli._compile_status()
    assert capsys.readouterr().err == "ldj: compiling (first run, cached afterwards)...\n"
    (tmp_path / "linear-decoder-jax" / "jax").mkdir(parents=True)
    (tmp_path / "linear-decoder-jax" / "jax" / "entry").write_text("x")
    cli._compile_status()
    assert capsys.readouterr().err == ""
