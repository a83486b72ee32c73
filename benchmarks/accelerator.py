"""One prepared command for a GPU machine: tests, throughput and where the time goes.

Made for a machine reached with little time and no network (Python 3.12 with a CUDA jax, flax,
optax, orbax-checkpoint, h5py, pandas, scipy, matplotlib, tqdm, jaxtyping and pytest; no
anndata, no scvi-tools). It installs nothing from a registry: anndata and its needs come from
wheels prepared beforehand, on a machine with network, into the git-ignored ``wheels/`` folder of
the repository (the machine gets a copy of the working tree)::

    pip download --only-binary :all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \\
        -d wheels/ anndata setuptools

Then, on the GPU machine, from the repository root::

    python benchmarks/accelerator.py              # about 5 minutes on one H100
    python benchmarks/accelerator.py --scale 0.1  # every size / 10
    python benchmarks/accelerator.py --dry-run    # tiny sizes, no install, CPU (CI runs this)

Steps, each recorded in ``benchmarks/results/accelerator-<card>.json`` as soon as it is measured
(a run cut off keeps what it measured; the dry run writes to a temporary folder unless ``--out``):

1. install: anndata from ``wheels/`` when it is missing (``pip install --no-index``), the project
   with ``--no-deps`` (an editable install; the source tree is on the path either way);
2. the device: platform, kind, count, the memory it reports (``memory_stats``);
3. the accelerator-relevant tests (vectorised sweep, refit lanes, attribution, sharding over
   devices, minibatch sizing) on the default backend, float32 matrix products at full precision
   (``tests/helpers.accelerator_precision``: TF32 off); the dry run only collects them;
4. the host-to-device copy rate of a minibatch's arrays (the non-zero blocks the driver sends)
   and of the dense block;
5. the throughput harness (``bench_throughput.make_h5ad``'s data, generated here: 2,000 genes x
   10 latents, ~10 % non-zeros) at 20k, 200k and 1M cells for NB and ZINB, streamed from h5ad
   to h5ad with ``ldj.ablate``, with the time of each stage (``linear_decoder_jax.stages``:
   reading, the copy to the device, compute, the copy back, writing) and the minibatch chosen
   from the device's memory; the exp+log floor of the same triples
   (``bench_ablation.floor_seconds``); the committed CPU numbers beside them.

There is no scvi-tools on the machine: the models have random weights (speed does not depend on
them). DRVI and training are not part of this project yet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

SIZES = (20_000, 200_000, 1_000_000)
DRY_SIZES = (300, 1_000)
N_LATENT = 10
BUDGET_S = 285.0  # stop starting new steps after this (the whole command within 5 minutes)
TESTS = (
    "tests/test_run.py::test_vectorised_sweep_equals_sequential",
    "tests/test_refit.py::test_vmapped_lanes_match_mapped_lanes",
    "tests/test_attribution.py::test_gene_scores_match_brute_force",
    "tests/test_attribution.py::test_exact_shapley_matches_brute_force",
    "tests/test_attribution.py::test_additivity_to_float32_rounding",
    "tests/test_attribution.py::test_agrees_with_the_plain_sweep",
    "tests/test_sizing.py",
    "tests/test_scale.py::test_four_devices_equal_one",
)
CPU_RESULTS = HERE / "results" / "throughput.json"


class Run:
    """The results so far, written (atomically) after every step."""

    def __init__(self, path: Path, budget: float):
        self.path, self.budget, self.start = path, budget, time.monotonic()
        self.data: dict[str, Any] = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M %Z")}}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def step(run: Run, name: str, need: float) -> bool:
    """Whether ``name`` may start (``need`` seconds left); a skipped step is recorded."""
    if run.left() >= need:
        print(f"== {name} ({run.left():.0f} s left)", flush=True)
        return True
    run.data.setdefault("skipped", []).append(name)
    run.save()
    print(f"== {name}: skipped, {run.left():.0f} s left", flush=True)
    return False


def install(wheels: Path) -> dict[str, Any]:
    """anndata from ``wheels`` when missing, then the project without its dependencies."""
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check"]
    done: dict[str, Any] = {}
    try:
        import anndata  # noqa: F401

        done["anndata"] = "present"
    except ImportError:
        if not wheels.is_dir():
            sys.exit(
                f"anndata is missing and {wheels} does not exist: see this script's docstring."
            )
        proc = subprocess.run([*pip, "--find-links", str(wheels), "anndata"], text=True)
        done["anndata"] = "installed from wheels" if proc.returncode == 0 else "install failed"
    links = ["--find-links", str(wheels)] if wheels.is_dir() else []
    if links:  # the build backend the editable install needs, when the machine's is older
        subprocess.run([*pip, *links, "setuptools>=77"], capture_output=True, text=True)
    proc = subprocess.run(
        [*pip, *links, "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
        capture_output=True,
        text=True,
    )
    done["project"] = "installed (--no-deps)" if proc.returncode == 0 else "on the path only"
    if proc.returncode != 0:
        print(proc.stderr[-1500:], file=sys.stderr)
    return done


def device_info() -> dict[str, Any]:
    import jax

    devices = jax.local_devices()
    d = devices[0]
    stats = d.memory_stats() or {}
    return {
        "platform": d.platform,
        "kind": getattr(d, "device_kind", d.platform),
        "count": len(devices),
        "memory_stats": {k: stats[k] for k in ("bytes_limit", "bytes_in_use") if k in stats},
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "default (true)"),
    }


def run_tests(dry: bool, timeout: float) -> dict[str, Any]:
    """The accelerator-relevant tests on the default backend (collected only in a dry run)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    if not dry:
        env["JAX_PLATFORMS"] = ""  # the tests' conftest would pick the CPU
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    if dry:
        cmd.append("--collect-only")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10, timeout)
        )
        tail, code = proc.stdout.strip().splitlines()[-1:] or [""], proc.returncode
    except subprocess.TimeoutExpired:
        tail, code = [f"cut off after {timeout:.0f} s"], None
    if code not in (0, None):
        print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
    return {"returncode": code, "summary": tail[0], "seconds": round(time.monotonic() - t0, 1)}


def make_model(likelihood: str, n_vars: int, seed: int = 0) -> Any:
    """A LinearSCVI with random weights, genes ``g0...`` and batches a, b, c (the harness's data)."""
    import jax
    import numpy as np

    import linear_decoder_jax as ldj
    from linear_decoder_jax.config import DataRegistry, LDVAEConfig, ModelSpec
    from linear_decoder_jax.params import abstract_params

    config = LDVAEConfig(
        n_input=n_vars, n_latent=N_LATENT, n_batch=3, gene_likelihood=likelihood, n_hidden=128
    )
    rng = np.random.default_rng(seed)

    def leaf(path: Any, spec: Any) -> Any:
        name = jax.tree_util.keystr(path)
        if name.endswith(".var"):
            return rng.uniform(0.5, 2.0, spec.shape).astype(np.float32)
        scale = 0.05 if "kernel" in name else 0.1
        return (rng.normal(size=spec.shape) * scale).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, abstract_params(config))
    data = DataRegistry(
        var_names=tuple(f"g{j}" for j in range(n_vars)),
        batch_key="batch",
        batch_categories=("a", "b", "c"),
    )
    return ldj.LinearSCVI(params, ModelSpec(config, data, {}), dtype="float32")


def copy_rate(path: Path, n_vars: int) -> dict[str, float]:
    """Host-to-device GB/s of one read block's minibatch arrays (non-zero blocks) and of the same
    cells as a dense float32 block."""
    import jax
    import numpy as np

    from linear_decoder_jax import anndata_io, sizing, sources

    device = jax.local_devices()[0]
    with sources.StoreSource(path) as adata:
        data = make_model("nb", n_vars).prepare(adata)
        size = sizing.choose_batch_size(
            data.n_obs, n_vars, N_LATENT, itemsize=4, vectorize=device.platform != "cpu",
            devices=[device],
        )  # fmt: skip
        mbs = []
        for mb in anndata_io.minibatches(data, size, n_vars=n_vars):
            mbs.append((mb.nz_index, mb.nz_count, mb.batch, mb.label))
            if len(mbs) * size >= 50_000:
                break
        dense = np.asarray(data.csr(0, min(data.n_obs, 20_000)).toarray(), np.float32)

    def rate(arrays: Any) -> float:
        nbytes = sum(a.nbytes for a in jax.tree.leaves(arrays))
        jax.block_until_ready(jax.device_put(arrays, device))  # warm
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(jax.device_put(arrays, device))
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    return {"minibatch_arrays_gb_s": rate(mbs), "dense_gb_s": rate(dense), "batch_size": size}


def sharding(model: Any, path: Path, out: Path) -> dict[str, Any]:
    """Every local device (a mesh over cells) against one: the largest difference of delta_nll,
    relative to the NLL's scale (float32 rounding of the NLL is the tolerance of the tests)."""
    import jax
    import numpy as np

    import linear_decoder_jax as ldj

    n = len(jax.local_devices())
    if n == 1:
        return {"devices": 1, "note": "one local device: nothing to shard over"}
    one = ldj.ablate(model, str(path), devices=1)
    every = ldj.ablate(model, str(path), output=out, overwrite=True)
    diff = np.abs(np.asarray(one.delta_nll) - np.asarray(every.delta_nll)).max()
    scale = float(np.abs(np.asarray(one.nll)).max())
    return {"devices": n, "max_abs_diff_delta_nll": float(diff), "nll_scale": scale,
            "within_float32": bool(diff <= 5e-6 * scale + 1e-5)}  # fmt: skip


def throughput(model: Any, path: Path, out: Path) -> dict[str, Any]:
    """A streamed ``ldj.ablate`` (h5ad in, h5ad out) timed whole and per stage; the first run of
    a size compiles, so a second one is timed when the first took under 20 s."""
    import linear_decoder_jax as ldj
    from linear_decoder_jax import stages

    runs = []
    for _ in range(2):
        with stages.record() as times:
            t0 = time.perf_counter()
            result = ldj.ablate(model, str(path), output=out, overwrite=True)
            wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, **times.as_dict()})
        if wall > 20:
            break
    best = min(runs, key=lambda r: r["wall_s"])
    n = int(result.settings["rows"][1] - result.settings["rows"][0])
    stage = {k: v for k, v in best.items() if k != "wall_s"}
    reader = best["read_s"] + best["copy_s"]
    writer = best["compute_s"] + best["fetch_s"] + best["write_s"]
    return {
        **best,
        # what no minibatch stage explains: opening, the obs, compiling, assembling the result
        "outside_stages_s": best["wall_s"] - max(reader, writer),
        "first_run_s": runs[0]["wall_s"],
        "cells_per_s": n / best["wall_s"],
        "batch_size": int(result.settings["batch_size"]),
        "bound_by": max(stage, key=stage.__getitem__).removesuffix("_s"),
    }


def drvi(path: Path, out: Path, n_vars: int) -> dict[str, Any]:
    """A default-shaped DRVI (32 latents, one per split, random weights) ablated over the same
    streamed file, latents and then splits, through the generic scorers."""
    import jax
    import numpy as np

    import linear_decoder_jax as ldj
    from linear_decoder_jax.config import DataRegistry, ModelSpec
    from linear_decoder_jax.families import drvi as family

    config = family.DRVIConfig(n_input=n_vars, n_latent=32, n_split=32)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (rng.normal(size=s.shape) * 0.05).astype(np.float32),
        family.abstract_params(config),
    )
    registry = DataRegistry(var_names=tuple(f"g{j}" for j in range(n_vars)))
    model = ldj.DRVI(params, ModelSpec(config, registry, {}), dtype="float32")
    row: dict[str, Any] = {}
    for unit in ("latent", "split"):
        runs = []
        for _ in range(2):  # the first compiles
            t0 = time.perf_counter()
            ldj.ablate(model, str(path), output=out, overwrite=True, unit=unit)
            runs.append(time.perf_counter() - t0)
        row[f"{unit}_s"], row[f"{unit}_first_s"] = min(runs), runs[0]
    return row


def training(path: Path) -> dict[str, Any]:
    """``ldj.train`` on the file's cells (in memory, batch key, scvi-tools' defaults), compiled by
    a first call: the time of one epoch (two epochs minus one, so set-up cancels) and of a
    2-epoch call."""
    import anndata

    import linear_decoder_jax as ldj

    adata = anndata.read_h5ad(path)
    t0 = time.perf_counter()
    ldj.train(adata, batch_key="batch", max_epochs=1, seed=0, progress_bar=False)  # compiles
    walls = {0: time.perf_counter() - t0}
    for epochs in (1, 2):
        t0 = time.perf_counter()
        ldj.train(adata, batch_key="batch", max_epochs=epochs, seed=0, progress_bar=False)
        walls[epochs] = time.perf_counter() - t0
    return {
        "n_obs": adata.n_obs,
        "epoch_s": walls[2] - walls[1],
        "two_epochs_s": walls[2],
        "first_call_s": walls[0],
    }


def table(r: dict[str, Any]) -> str:
    cpu = r.get("cpu_reference", {})
    lines = [
        f"device: {r.get('device', {}).get('kind')} x {r.get('device', {}).get('count')}",
        "| likelihood | cells | wall s | cells/s | read | copy | compute | fetch | write | "
        "outside | bound by | batch | CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for key, row in r.get("throughput", {}).items():
        lik, n = key.split("/")
        ref = cpu.get(key)
        lines.append(
            f"| {lik} | {int(n):,} | {row['wall_s']:.2f} | {row['cells_per_s']:,.0f} | "
            + " | ".join(
                f"{row[f'{s}_s']:.2f}" for s in ("read", "copy", "compute", "fetch", "write")
            )
            + f" | {row['outside_stages_s']:.2f} | {row['bound_by']} | {row['batch_size']} | {'' if ref is None else f'{ref:.2f}'} |"
        )
    if "copy_rate" in r:
        c = r["copy_rate"]
        lines.append(
            f"host-to-device: minibatch arrays {c['minibatch_arrays_gb_s']:.2f} GB/s, "
            f"dense {c['dense_gb_s']:.2f} GB/s"
        )
    if "tests" in r:
        lines.append(f"tests: {r['tests']['summary']} ({r['tests']['seconds']} s)")
    if "sharding" in r:
        lines.append(f"sharding over every local device: {r['sharding']}")
    if r.get("skipped"):
        lines.append(f"skipped (time): {', '.join(r['skipped'])}")
    return "\n".join(lines)


def cpu_reference() -> dict[str, float]:
    """The committed CPU numbers (``results/throughput.json``): streamed API seconds, by
    ``likelihood/cells``."""
    if not CPU_RESULTS.exists():
        return {}
    r = json.loads(CPU_RESULTS.read_text())
    n0 = r.get("scvi_n_obs", 20_000)
    out = {f"{lik}/{n0}": r[lik]["api_streamed_s"] for lik in ("nb", "zinb") if lik in r}
    out |= {f"cli:nb/{c['n_obs']}": c["wall_s"] for c in r.get("cli", [])}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, no install, CPU")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size by this")
    parser.add_argument("--sizes", type=int, nargs="+", help="cells (default 20k 200k 1M)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the steps")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--wheels", type=Path, default=ROOT / "wheels")
    parser.add_argument("--out", type=Path, help="results JSON (default: by the card's name)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ["JAX_PLATFORMS"] = "cpu"
    installed = {"skipped": "dry run"} if dry else install(args.wheels)

    import bench_throughput  # reused: the data generator (make_h5ad), the gene count

    info = device_info()
    card = re.sub(r"[^a-z0-9]+", "-", str(info["kind"]).lower()).strip("-") or "unknown"
    tmp_dir = tempfile.TemporaryDirectory(prefix="ldj-accelerator-")
    tmp = Path(tmp_dir.name)
    default = (tmp if dry else HERE / "results") / f"accelerator-{card}.json"
    run = Run(args.out or default, args.budget)
    run.data["meta"].update({"dry_run": dry, "installed": installed, "argv": sys.argv[1:]})
    run.data["device"] = info
    run.data["cpu_reference"] = cpu_reference()
    run.save()
    print(f"device: {info}", flush=True)
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # a compilation cache of this run only
    from linear_decoder_jax import enable_compilation_cache

    enable_compilation_cache()

    if not args.skip_tests and step(run, "tests", 30):
        run.data["tests"] = run_tests(dry, timeout=min(120.0, run.left() - 60))
        run.save()
        print(f"tests: {run.data['tests']}", flush=True)

    sizes = args.sizes or (DRY_SIZES if dry else SIZES)
    sizes = sorted({max(100, int(n * args.scale)) for n in sizes})
    n_vars = bench_throughput.N_VARS
    files: dict[int, Path] = {}
    models = {lik: make_model(lik, n_vars) for lik in ("nb", "zinb")}
    run.data["throughput"] = {}
    for i, n in enumerate(sizes):
        need = 10 + n / 20_000  # generating and running a size, roughly (H100)
        if not step(run, f"data {n}", need):
            break
        t0 = time.perf_counter()
        files[n] = tmp / f"cells{n}.h5ad"
        bench_throughput.make_h5ad(files[n], n)
        run.data.setdefault("generate_s", {})[str(n)] = time.perf_counter() - t0
        if i == 0 and step(run, "copy rate", 10):
            run.data["copy_rate"] = copy_rate(files[n], n_vars)
            run.save()
        if i == 0 and step(run, "sharding", 20):
            run.data["sharding"] = sharding(models["nb"], files[n], tmp / "out.h5ad")
            run.save()
        for lik, model in models.items():
            if not step(run, f"{lik} {n}", need / 2):
                continue
            row = throughput(model, files[n], tmp / "out.h5ad")
            run.data["throughput"][f"{lik}/{n}"] = row
            run.save()
            print(f"{lik} {n}: {row}", flush=True)
        if i == 0 and step(run, "drvi", 20):
            run.data["drvi"] = {str(n): drvi(files[n], tmp / "out.h5ad", n_vars)}
            run.save()
            print(f"drvi {n}: {run.data['drvi']}", flush=True)
        if i == 0 and step(run, "training", 30):
            run.data["training"] = {str(n): training(files[n])}
            run.save()
            print(f"training {n}: {run.data['training']}", flush=True)
        files.pop(n).unlink()
    if step(run, "floor", 5):
        bench_ablation = bench_throughput._bench("bench_ablation")
        n = sizes[0]
        run.data["floor_s"] = {str(n): bench_ablation.floor_seconds(n, N_LATENT, n_vars)}
        run.save()
    print(table(run.data))
    print(f"wrote {run.path}" + (" (dry run: a temporary folder, removed)" if dry else ""))
    tmp_dir.cleanup()


if __name__ == "__main__":
    main()
