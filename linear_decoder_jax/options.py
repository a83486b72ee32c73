"""The options of an ablation run, each declared once: one frozen dataclass per concern.

A field holds the option's default, its ``Literal`` choices and its help text; ``__post_init__``
checks it (like ``LDVAEConfig``); ``to_dict`` is what the run records in ``uns["ablation"]``. The
CLI builds its ``ldj ablate`` flags from these fields (:func:`add_arguments`) and forwards the
parsed values by name (:func:`values`); ``api.ablate`` keeps the keyword signature users know, and
``tests/test_options.py`` checks its defaults against these. Jax-free, so the CLI parser builds
without importing jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from linear_decoder_jax.errors import ConfigError

Mode = Literal["drop", "keep"]
Unit = Literal["latent", "split"]
LibraryChoice = Literal["model", "observed"]
Baseline = Literal["zero", "mean", "median"]
Optimizer = Literal["lbfgs", "adam"]
Shapley = Literal["auto", "exact", "permutation"]
TraverseGrid = Literal["range", "quantile"]

MODES: tuple[Mode, ...] = get_args(Mode)
UNITS: tuple[Unit, ...] = get_args(Unit)
LIBRARIES: tuple[LibraryChoice, ...] = get_args(LibraryChoice)
BASELINES: tuple[Baseline, ...] = get_args(Baseline)
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
SHAPLEY: tuple[Shapley, ...] = get_args(Shapley)
TRAVERSE_GRIDS: tuple[TraverseGrid, ...] = get_args(TraverseGrid)

DEFAULT_REFIT_STEPS: dict[Optimizer, int] = {"lbfgs": 100, "adam": 2000}
MAX_EXACT_SHAPLEY_LATENTS = 12  # exact Shapley values enumerate 2^K coalitions per cell
GENE_SCORES_BUDGET = 2 * 2**30  # bytes of the groups x latents x genes tables (gene_scores=True)
TRAVERSE_TAIL = 0.01  # the named traversal grids span the 1st to the 99th percentile


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with its CLI help and ``argparse`` extras (``type``, ``metavar``; a
    ``None`` ``cli`` flag means the option has no CLI flag)."""
    return field(default=default, metadata={"help": help, "cli": cli})


def _is_int(value: Any, *, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= low


def _check_choice(name: str, value: Any, literal: Any) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(f"Expected {name} one of {allowed}, got {value!r} instead.")


# -- CLI value parsers (argparse ``type=``) ---------------------------------------------------------
def parse_baseline(value: str) -> Any:
    """``zero | mean | median | VALUE | FILE.npy`` (one value per latent)."""
    if value in BASELINES:
        return value
    if value.endswith(".npy"):
        import numpy as np

        try:
            return np.load(value, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"Cannot read baseline values from {value}: {err}") from err
    try:
        return float(value)
    except ValueError:
        msg = f"--baseline must be zero, mean, median, a number or a .npy file, got {value!r}."
        raise argparse.ArgumentTypeError(msg) from None


def parse_grid(value: str) -> Any:
    """``range | quantile | V1,V2,... | FILE.npy`` (the traversal grid)."""
    if value in TRAVERSE_GRIDS:
        return value
    if value.endswith(".npy"):
        import numpy as np

        try:
            return np.load(value, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"Cannot read traversal grid values from {value}: {err}") from err
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        msg = f"--traverse-grid must be range, quantile, comma-separated numbers or a .npy file, got {value!r}."
        raise argparse.ArgumentTypeError(msg) from None


def parse_latents(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        msg = f"--latents must be comma-separated integers such as 0,3, got {value!r}."
        raise argparse.ArgumentTypeError(msg) from None


def parse_shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        msg = f"--shard must look like I/N (e.g. 0/4), got {value!r}."
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {value}: need 0 <= I < N.")
    return i, n


# -- the options ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepOptions:
    """What the plain sweep scores: which units, against which baseline, how."""

    latents: Sequence[int] | None = _opt(
        None,
        "indices of the units to ablate (default all), in result column order",
        type=parse_latents,
        metavar="I,J,...",
    )
    baseline: Any = _opt(
        "zero",
        "value a removed latent is set to: zero | mean | median (over the input cells' decoder "
        "inputs) | VALUE | FILE.npy (one value per latent)",
        type=parse_baseline,
    )
    mode: Mode = _opt(
        "drop", "drop: the unit at its baseline; keep: every other unit at its baseline"
    )
    unit: Unit = _opt(
        "latent",
        "latent: one column per latent; split: one column per split of the decoder, removed from "
        "its aggregation (families with an additive decoder, e.g. DRVI)",
    )
    library: LibraryChoice = _opt(
        "model", "model: the model's own library; observed: log total counts"
    )
    n_samples: int = _opt(
        0, "average over this many draws z ~ q(z|x) (0: at the posterior mean)", type=int
    )
    seed: int = _opt(0, "seed of every random draw (z samples, permutations)", type=int)
    gene_scores: bool = _opt(
        False,
        "also each gene's mean NLL change and log fold change per latent and --groupby group",
    )

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, Mode)
        _check_choice("unit", self.unit, Unit)
        _check_choice("library", self.library, LibraryChoice)
        if not _is_int(self.n_samples, low=0):
            raise ConfigError(f"Expected n_samples >= 0, got {self.n_samples!r} instead.")
        if not _is_int(self.seed, low=0):
            raise ConfigError(f"Expected seed >= 0 (an integer), got {self.seed!r} instead.")
        if self.gene_scores and self.n_samples:
            raise ConfigError("gene_scores are computed at the posterior mean: use n_samples=0.")


@dataclass(frozen=True)
class ShapleyOptions:
    """Shapley values of each cell's likelihood gain over the latents."""

    shapley: Shapley | None = _opt(
        None,
        "decompose each cell's likelihood gain over the latents: exact (enumerates 2^K "
        f"coalitions, K <= {MAX_EXACT_SHAPLEY_LATENTS}), permutation (sampled), or auto (the "
        "default of a bare --shapley: exact up to that K, permutation above, e.g. DRVI's 32)",
        nargs="?",
        const="auto",
    )
    n_permutations: int = _opt(
        64, "antithetic permutations for --shapley permutation (even, >= 4)", type=int
    )

    def __post_init__(self) -> None:
        if self.shapley is not None:
            _check_choice("shapley", self.shapley, Shapley)
        if self.shapley in ("auto", "permutation") and not (
            _is_int(self.n_permutations, low=4) and self.n_permutations % 2 == 0
        ):
            msg = f"Expected an even n_permutations >= 4 (antithetic pairs), got {self.n_permutations!r}."
            raise ConfigError(msg)

    def method(self, n_latent: int) -> Literal["exact", "permutation"]:
        """The method a run uses: ``auto`` is exact up to the enumeration limit, permutation above."""
        if self.shapley == "auto":
            return "exact" if n_latent <= MAX_EXACT_SHAPLEY_LATENTS else "permutation"
        if self.shapley is None:
            raise ConfigError("No Shapley method: shapley is None.")
        return self.shapley

    def check(self, n_latent: int) -> None:
        """Refuse exact Shapley values over too many latents (they enumerate 2^K coalitions)."""
        if self.shapley == "exact" and n_latent > MAX_EXACT_SHAPLEY_LATENTS:
            msg = (
                f"Exact Shapley values enumerate 2^{n_latent} coalitions per cell (limit "
                f"K <= {MAX_EXACT_SHAPLEY_LATENTS}); use shapley='permutation' with n_permutations."
            )
            raise ConfigError(msg)


@dataclass(frozen=True)
class RefitOptions:
    """The refit: each latent's unique contribution, the other latents re-fitted per cell."""

    refit: bool = _opt(
        False, "also score unique contributions: re-fit the other latents per cell (slower)"
    )
    refit_steps: int | None = _opt(
        None,
        "step budget per fit (default: "
        + ", ".join(f"{n} {o}" for o, n in DEFAULT_REFIT_STEPS.items())
        + ")",
        type=int,
    )
    refit_tol: float = _opt(1e-3, "gradient-norm tolerance, nats per unit of z", type=float)
    optimizer: Optimizer = _opt("lbfgs", "refit optimiser")

    def __post_init__(self) -> None:
        if not self.refit:
            return
        _check_choice("optimizer", self.optimizer, Optimizer)
        if self.refit_steps is not None and not _is_int(self.refit_steps, low=0):
            msg = f"Expected refit_steps >= 0 (an integer), got {self.refit_steps!r} instead."
            raise ConfigError(msg)
        tol = self.refit_tol
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not float(tol) >= 0:
            raise ConfigError(f"Expected refit_tol >= 0, got {tol!r} instead.")

    @property
    def steps(self) -> int:
        """The step budget (the optimiser's default when not given)."""
        if self.refit_steps is None:
            return DEFAULT_REFIT_STEPS[self.optimizer]
        return int(self.refit_steps)


@dataclass(frozen=True)
class TraversalOptions:
    """The latent traversal: each ablated latent moved over a grid of values, cell by cell."""

    traverse: bool = _opt(
        False,
        "also traverse each latent: set it to each grid value in every cell (the other latents "
        "at the cell's posterior mean) and record each gene's mean log fold change and the mean "
        "NLL change along the grid, per --groupby group",
    )
    traverse_grid: Any = _opt(
        "range",
        f"range: --traverse-steps values evenly spaced from the latent's {TRAVERSE_TAIL:.0%} to "
        f"its {1 - TRAVERSE_TAIL:.0%} quantile over the input cells' decoder inputs; quantile: "
        "its quantiles at evenly spaced probabilities between those; V1,V2,... or FILE.npy: "
        "the same values for every latent (a .npy may hold one row per traversed latent; "
        "write --traverse-grid=-2,0,2 when the first value is negative)",
        type=parse_grid,
    )
    traverse_steps: int = _opt(
        11, "grid values per latent of the range and quantile grids (>= 2)", type=int
    )

    def __post_init__(self) -> None:
        if not _is_int(self.traverse_steps, low=2):
            msg = f"Expected traverse_steps >= 2 (an integer), got {self.traverse_steps!r} instead."
            raise ConfigError(msg)
        if isinstance(self.traverse_grid, str):
            _check_choice("traverse_grid", self.traverse_grid, TraverseGrid)


@dataclass(frozen=True)
class DataOptions:
    """Where the counts and the groups are."""

    groupby: str | None = _opt(None, "obs column for group summaries")
    groupby_max: int = _opt(
        50, "refuse a numeric --groupby column with more distinct values (bin it instead)", type=int
    )
    layer: str | None = _opt(
        "auto",
        "where the counts are: a layer name, X, or auto (the layer the model was set up with if "
        "the data has it, else X)",
    )
    use_raw: bool = _opt(False, "read the counts from .raw")
    allow_non_integer: bool = _opt(
        False,
        "accept counts that are fractional by nature (e.g. ambient-corrected); not for "
        "log-normalised data: point --layer or --use-raw at the raw counts instead",
    )

    def __post_init__(self) -> None:
        if not _is_int(self.groupby_max, low=1):
            raise ConfigError(f"Expected groupby_max >= 1, got {self.groupby_max!r} instead.")


@dataclass(frozen=True)
class ExecutionOptions:
    """How the run is cut and placed: minibatches, devices, shards."""

    batch_size: int | None = _opt(None, "cells per minibatch (default: automatic)", type=int)
    devices: int | None = _opt(None, "use this many local devices (default: all)", type=int)
    shard: tuple[int, int] | None = _opt(
        None,
        "I/N: score only the I-th of N row ranges; join parts with `ldj merge`",
        type=parse_shard,
    )
    progress: bool = _opt(False, "progress bar", flag=None)

    def __post_init__(self) -> None:
        if self.batch_size is not None and not _is_int(self.batch_size, low=1):
            raise ConfigError(f"Expected batch_size >= 1, got {self.batch_size!r} instead.")


@dataclass(frozen=True)
class DistributedOptions:
    """Joining a multi-process run (``linear_decoder_jax.distributed``)."""

    distributed: bool = _opt(
        False, "join a multi-process run (auto-detected on Slurm, Open MPI, TPU pods)"
    )
    coordinator: str | None = _opt(None, "process 0's address", metavar="HOST:PORT")
    num_processes: int | None = _opt(None, "processes in the run", type=int, metavar="N")
    process_id: int | None = _opt(None, "this process, 0 <= I < N", type=int, metavar="I")
    join_timeout: float = _opt(
        300.0,
        "seconds the processes may take to join (they may start minutes apart on a cluster)",
        type=float,
    )
    heartbeat_timeout: float = _opt(
        15.0,
        "seconds a killed or frozen process goes unnoticed before every process stops (the "
        "runtime's own heartbeats: a long compile or read does not count as silence)",
        type=float,
    )


GROUPS: dict[str, tuple[type, ...]] = {
    "run": (
        SweepOptions,
        ShapleyOptions,
        RefitOptions,
        TraversalOptions,
        DataOptions,
        ExecutionOptions,
    ),
    "distributed": (DistributedOptions,),
}
ALL: tuple[type, ...] = GROUPS["run"] + GROUPS["distributed"]


def to_dict(opts: Any) -> dict[str, Any]:
    """The fields of one options object, as recorded."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def split(kwargs: dict[str, Any]) -> dict[type, Any]:
    """Build every options object from keyword arguments named as their fields (checks run)."""
    out = {}
    for cls in ALL:
        names = {f.name for f in dataclasses.fields(cls)}
        out[cls] = cls(**{k: v for k, v in kwargs.items() if k in names})
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: Any, classes: Sequence[type]) -> None:
    """One ``argparse`` flag per field of ``classes``: ``Literal`` fields get their choices,
    booleans are switches, the default and help come from the field."""
    for cls in classes:
        for f in dataclasses.fields(cls):
            cli = dict(f.metadata["cli"])
            if "flag" in cli and cli.pop("flag") is None:
                continue
            # argparse %-formats help: a literal % (e.g. "1%") must be doubled
            kwargs: dict[str, Any] = {"help": f.metadata["help"].replace("%", "%%"), **cli}
            choices = [a for a in get_args(_literal(f.type)) if a is not None]
            if f.default is False:
                kwargs["action"] = "store_true"
            else:
                kwargs["default"] = f.default
                if choices:
                    kwargs["choices"] = tuple(choices)
                if f.default is not None and "choices" not in kwargs:
                    kwargs["help"] += f" (default {f.default})"
            parser.add_argument(_flag(f.name), **kwargs)


def _literal(annotation: Any) -> Any:
    """The ``Literal`` inside a field's annotation (a string under postponed evaluation)."""
    if isinstance(annotation, str):
        name = annotation.split("|")[0].strip()
        return globals().get(name)
    return annotation


def values(args: argparse.Namespace, classes: Sequence[type]) -> dict[str, Any]:
    """The parsed flags of :func:`add_arguments`, by field name (for ``api.ablate(**...)``)."""
    return {
        f.name: getattr(args, f.name)
        for cls in classes
        for f in dataclasses.fields(cls)
        if hasattr(args, f.name)
    }
