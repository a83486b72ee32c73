"""A whole ablation run: the options resolved into a plan, the scorers built, the driver run,
the result assembled.

:func:`ablate` receives the model's family, its parameters and the prepared data (never the
facade), plus the options objects of ``options``; it knows no output name: the scorers say which
fields they fill and what they record (``Scorer.settings``), and ``results.derive`` builds the
group tables from the finished arrays (shared with ``merge``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, NamedTuple

import jax
import numpy as np

from linear_decoder_jax import (
    ablation,
    anndata_io,
    attribution,
    options,
    results,
    schema,
    sources,
    traversal,
)
from linear_decoder_jax._atomic import atomic_path
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.family import Family
from linear_decoder_jax.pipeline import (
    OwnRows,
    Placement,
    Plan,
    decoder_inputs,
    execute,
    shard_rows,
    vectorize_default,
)
from linear_decoder_jax.sizing import choose_batch_size


class Model(NamedTuple):
    """What a run needs of a model: its family, parameters (device arrays of its dtype) and
    identity (recorded as provenance)."""

    family: Family
    params: Any
    dtype: str
    var_names: list[str]
    fingerprint: str
    source: dict[str, str]  # {"model": path, "scvi_version": ...}
    loadings: np.ndarray | None  # (n_vars, n_latent) or None: the result's varm["loadings"]


def versions() -> dict[str, str]:
    """Versions recorded in a result's provenance."""
    from importlib.metadata import version

    from linear_decoder_jax._version import __version__

    return {
        "linear_decoder_jax": __version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "anndata": version("anndata"),
    }


def embeddings(adata: Any) -> dict[str, np.ndarray]:
    """The input's 2-D embeddings (obsm entries with two columns, e.g. ``X_umap``)."""
    out = {}
    for key in adata.obsm.keys():
        value = adata.obsm[key]
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 2:
            out[key] = np.asarray(value)
    return out


class ObsRows:
    """The obs rows [lo, hi) of ``adata`` for the result, checked writable first
    (``anndata_io.check_obs_writable``). A streamed h5ad whose obs is not read yet is read on a
    thread beside the sweep (anndata and pandas take ~0.8 s to import), started by the first
    :meth:`check`, once the first minibatch is dispatched; :meth:`check` raises its error while
    the sweep runs, so an unwritable column still stops the run in seconds."""

    def __init__(self, adata: Any, lo: int, hi: int):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

        def load() -> None:
            try:
                obs = adata.obs.iloc[lo:hi].copy()
                anndata_io.check_obs_writable(obs)
                self._value = obs
            except BaseException as err:  # raised by check() or result()
                self._error = err

        if not sources.as_source(adata).obs_loaded:
            self._thread = threading.Thread(target=load, daemon=True)
        else:
            load()
            self.check()

    def check(self) -> None:
        if self._thread is not None and self._thread.ident is None:
            self._thread.start()
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        if self._thread is not None and self._thread.ident is not None:
            self._thread.join()

    def result(self) -> Any:
        self.check()
        self.wait()
        self.check()
        return self._value

    def __enter__(self) -> ObsRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()


def ablate(
    model: Model,
    adata: Any,
    full: anndata_io.CellData,
    opts: dict[type, Any],
    *,
    devices: list[Any],
    output: Any,
    overwrite: bool,
    lockstep: Placement | None = None,
) -> results.AblationResult:
    """Resolve the options into a :class:`Plan`, run the scorers over ``full`` (the data prepared
    for the model; a shard's rows of it) and assemble the ``AblationResult`` (in memory, or
    streamed into ``output`` and read back memory-mapped). ``lockstep``: the placement of a
    distributed run (this process scores its rows on it; baselines and totals cover every
    process's cells)."""
    sweep: options.SweepOptions = opts[options.SweepOptions]
    shap: options.ShapleyOptions = opts[options.ShapleyOptions]
    refit_opts: options.RefitOptions = opts[options.RefitOptions]
    trav: options.TraversalOptions = opts[options.TraversalOptions]
    data_opts: options.DataOptions = opts[options.DataOptions]
    run_opts: options.ExecutionOptions = opts[options.ExecutionOptions]
    family = model.family
    if sweep.unit == "split" and not family.additive:
        msg = (
            f"unit='split' removes a split from an additive decoder's aggregation; a "
            f"{family.name} model's decoder is not additive: ablate latents (unit='latent')."
        )
        raise ConfigError(msg)
    units = family.unit_latents() if sweep.unit == "split" else None
    n_units = len(units) if units is not None else family.n_latent
    unit_names = family.split_names() if units is not None else family.latent_names()
    groupby = data_opts.groupby
    group_names: tuple[str, ...] = ()
    all_codes = None
    if groupby is not None:  # refuses a missing or continuous column before any work; the
        # groups come from every input cell, so all shards and processes share one list
        all_codes, group_names, _ = anndata_io.group_codes(
            adata.obs, groupby, max_groups=data_opts.groupby_max
        )
    lo, hi = shard_rows(run_opts.shard, full.n_obs)
    data = full.restrict(lo, hi)
    if data.n_obs == 0:
        raise ConfigError(
            f"Shard {run_opts.shard} of {full.n_obs} cells is empty; use fewer shards."
        )
    idx = ablation.resolve_latents(sweep.latents, n_units)
    if shap.shapley is not None:
        shap.check(family.n_latent)
        if units is not None:
            raise ConfigError("Shapley values are over latents: use unit='latent' with shapley.")
    if trav.traverse and units is not None:
        raise ConfigError("A traversal moves latents: use unit='latent' with traverse.")
    if trav.traverse and sweep.n_samples:
        raise ConfigError("A traversal is computed at the posterior mean: use n_samples=0.")
    if refit_opts.refit and units is not None:
        raise ConfigError("refit=True re-fits latents: use unit='latent' with refit.")
    if refit_opts.refit and sweep.mode != "drop":
        msg = (
            f"refit=True re-fits the other latents with latent k at its baseline, which is "
            f'mode="drop"; got mode={sweep.mode!r} instead.'
        )
        raise ConfigError(msg)
    named_grid = trav.traverse and isinstance(trav.traverse_grid, str)
    grid_shape = () if isinstance(trav.traverse_grid, str) else np.shape(trav.traverse_grid)
    steps = grid_shape[-1] if grid_shape else trav.traverse_steps
    if trav.traverse:
        traversal.check_budget(len(group_names), len(idx), steps, family.n_vars)
    dtype = np.dtype(model.dtype)
    n_dev = len(devices)
    vectorize = vectorize_default(devices)
    size = run_opts.batch_size or choose_batch_size(
        data.n_obs if lockstep is None else lockstep.max_rows,  # type: ignore[attr-defined]
        family.n_vars,
        len(idx) * (steps if trav.traverse else 1),  # the widest vmapped body
        itemsize=dtype.itemsize,
        vectorize=vectorize,
        devices=devices,
        n_scores=1 + (shap.shapley is not None) + trav.traverse,
    )
    size = int(-(-size // n_dev) * n_dev)  # a multiple of the device count
    codes = None if all_codes is None else all_codes[lo:hi]
    if sweep.gene_scores:
        attribution.check_gene_budget(
            len(group_names), len(idx), family.n_vars, budget=options.GENE_SCORES_BUDGET
        )

    def make_plan(baseline: np.ndarray, name: str, rows: tuple[int, int]) -> Plan:
        return Plan(
            latents=tuple(int(i) for i in idx),
            baseline_name=name,
            baseline=tuple(float(b) for b in baseline),
            mode=sweep.mode,
            library=sweep.library,
            n_samples=sweep.n_samples,
            seed=sweep.seed,
            batch_size=size,
            dtype=str(dtype),
            devices=tuple(devices),
            rows=rows,
            vectorize=vectorize,
            group_names=group_names,
            units=units,
        )

    local = Placement(devices)
    place = local if lockstep is None else lockstep
    # in memory: checked here, before any work; a streamed file: read beside the work
    obs_rows = ObsRows(adata, lo, hi)
    with jax.enable_x64(dtype == np.float64), obs_rows:  # no reading thread outlives the run
        params = model.params
        stats = None
        if named_grid or (isinstance(sweep.baseline, str) and sweep.baseline in ("mean", "median")):
            obs_rows.check()  # a streamed file's obs is read beside this pass
            zero = np.zeros(family.n_latent)
            if lockstep is None:  # over all input cells, shards too
                stats = decoder_inputs(
                    family, params, full, make_plan(zero, "zero", (0, full.n_obs)), place=local
                )
            else:  # each process its own rows, gathered on the global mesh
                stats = decoder_inputs(
                    family, params, data, make_plan(zero, "zero", (lo, hi)), place=lockstep
                )
        base_name, base_values = ablation.resolve_baseline(sweep.baseline, stats, family.n_latent)
        scorers: list[Any] = []
        refit_scorer = None
        if refit_opts.refit:
            from linear_decoder_jax import refit  # optax: only for refits

            refit.check_baseline(base_values, idx, family.latent_names(), family=family)
        plan = make_plan(base_values, base_name, (lo, hi))
        scorers.append(
            ablation.SweepScorer(family, params, plan, place=place, gene_scores=sweep.gene_scores)
        )
        if trav.traverse:
            grid = traversal.resolve_grid(
                trav.traverse_grid,
                None if stats is None else stats[:, idx],
                len(idx),
                trav.traverse_steps,
            )
            scorers.append(traversal.TraversalScorer(family, params, plan, grid, place=place))
        if shap.shapley is not None:
            scorers.append(
                attribution.ShapleyScorer(
                    family,
                    params,
                    plan,
                    place=place,
                    method=shap.method(family.n_latent),
                    n_permutations=shap.n_permutations,
                )
            )
        if refit_opts.refit:
            refit_scorer = refit.RefitScorer(
                family,
                params,
                plan,
                optimizer=refit_opts.optimizer,
                steps=refit_opts.steps,
                tol=float(refit_opts.refit_tol),
                mesh=local.mesh,
            )
            scorers.append(
                refit_scorer if lockstep is None else OwnRows(refit_scorer, lockstep, local)
            )
        sizes = {"obs": data.n_obs, "ablated": len(idx), "latent": family.n_latent}
        shapes = {}
        for s in scorers:
            for name in s.fields:
                f = schema.BY_NAME[name]
                shapes[name] = (
                    schema.shape(f, sizes),
                    np.dtype(bool if f.dtype == "bool" else dtype),
                )
        with contextlib.ExitStack() as stack:
            stream = None
            if output is None:
                sink: dict[str, Any] = {k: np.empty(sh, dt) for k, (sh, dt) in shapes.items()}
            else:
                tmp = stack.enter_context(atomic_path(output, overwrite=overwrite, directory=False))
                stream = results.H5adStream(tmp, shapes)
                stack.callback(stream.close)
                sink = stream.arrays
            totals = execute(
                family,
                params,
                data,
                plan,
                scorers,
                sink,
                place=place,
                groups=codes,
                progress=run_opts.progress,
                watch=obs_rows.check,
            )
            obs = obs_rows.result()
            arrays = {**(sink if stream is None else stream.read_back()), **totals}
            settings = {
                "family": family.name,
                "unit": sweep.unit,
                "baseline": base_name,
                "baseline_values": np.asarray(base_values, dtype=np.float64),
                "mode": sweep.mode,
                "latents": idx.astype(np.int64),
                "latent_names": [unit_names[i] for i in idx],
                "all_latent_names": family.latent_names(),
                "library": sweep.library,
                "n_samples": sweep.n_samples,
                "seed": sweep.seed,
                "dtype": str(dtype),
                "batch_size": size,
                "n_devices": n_dev,
                "groupby": groupby or "",
                "shard": np.asarray(run_opts.shard or (0, 1), dtype=np.int64),
                "rows": np.asarray([lo, hi], dtype=np.int64),
                "n_obs_total": full.n_obs,
                "versions": versions(),
                "source_model": model.source.get("model", ""),
                "source_scvi_version": model.source.get("scvi_version", ""),
                "model_fingerprint": model.fingerprint,
                "has_loadings": model.loadings is not None,
                "gene_scores": bool(sweep.gene_scores),
            }
            for s in scorers:
                settings.update(s.settings())
            if refit_scorer is None:
                settings["refit"] = False
            if not trav.traverse:
                settings["traverse"] = False
            if shap.shapley is None:
                settings.update(shapley="", n_permutations=0)
            groups, explained = results.derive(arrays, obs, settings)
            result = results.AblationResult(
                arrays=arrays,
                loadings=model.loadings,
                obs=obs,
                var_names=model.var_names,
                settings=settings,
                embeddings={k: v[lo:hi] for k, v in embeddings(adata).items()},
                groups=groups,
                explained_table=explained,
            )
            if stream is not None:
                stream.finish(result)
    if output is not None:
        return results.AblationResult.read(output)
    return result
