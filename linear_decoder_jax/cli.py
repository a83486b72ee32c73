"""The ``ldj`` command line: ``convert``, ``info``, ``ablate``, ``report``, ``demo``, ``enrich``,
``compare``, ``train`` and ``export``.

``main(argv) -> int`` is testable; ``console_main`` is the console-script entry point. jax and the
converter are imported inside each command, after the paths have been checked, so ``ldj --help``
and a mistyped path are answered at once. A user error prints one line on stderr and exits 1
(argparse usage errors exit 2); ``--debug`` shows the traceback. Warnings are one-line notes, and
messages name the CLI's flags where the library's name its keyword arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from linear_decoder_jax import options
from linear_decoder_jax._version import __version__

EXIT_ERROR = 1


def _model_source(path: str, prefix: str | None):
    import linear_decoder_jax as ldj

    return ldj.load(path, prefix=prefix)


def _cmd_convert(args: argparse.Namespace) -> int:
    import linear_decoder_jax as ldj

    dst = ldj.convert(args.src, args.dst, prefix=args.prefix, overwrite=args.overwrite)
    print(f"wrote {dst}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    model = _model_source(args.path, args.prefix)
    c, d = model.config, model.spec.data
    genes = ", ".join(d.var_names[:5]) + (" ..." if len(d.var_names) > 5 else "")
    if model.family.name != "linear_scvi":  # another family: its own options, as recorded
        options_ = ", ".join(f"{k}={v}" for k, v in c.to_dict().items())
        lines = [
            f"model:        {model.path}",
            f"family:       {model.family.name}",
            f"source:       {model.spec.source.get('layout', 'converted')} layout",
            f"latents:      {c.n_latent}; splits {', '.join(model.family.split_names()[:6])}",
            f"genes:        {c.n_input} ({genes})",
            f"options:      {options_}",
        ]
        print("\n".join(lines))
        return 0
    lines = [
        f"model:        {model.path}",
        f"family:       {model.family.name}",
        "source:       trained with linear-decoder-jax (ldj train)"
        if model.spec.source.get("trained_with")
        else f"source:       scvi-tools {model.spec.source.get('scvi_version') or 'unknown'} "
        f"({model.spec.source.get('layout', 'converted')} layout)",
        f"likelihood:   {c.gene_likelihood}, dispersion {c.dispersion}",
        f"latents:      {c.n_latent} ({c.latent_distribution}), encoder {c.n_layers} x "
        f"{c.n_hidden}",
        f"library:      {'observed' if c.use_observed_lib_size else 'encoded q(l|x)'}",
        f"decoder:      batch norm {'yes' if c.decoder_batch_norm else 'no'}, "
        f"bias {'yes' if c.decoder_bias else 'no'}",
        f"genes:        {c.n_input} ({genes})",
        f"batches:      {c.n_batch}"
        + (f" from obs[{d.batch_key!r}]: {', '.join(d.batch_categories)}" if d.batch_key else ""),
        f"labels:       {c.n_labels}"
        + (f" from obs[{d.labels_key!r}]: {', '.join(d.label_categories)}" if d.labels_key else ""),
        f"counts:       {'layer ' + repr(d.layer) if d.layer else 'X'}",
    ]
    print("\n".join(lines))
    return 0


#: ``ldj train`` flags -> ``ldj.train`` keywords; a flag left out keeps the library's default
#: (scvi-tools'), so no default is written twice.
_TRAIN_OPTIONS = {
    "layer": str, "batch_key": str, "labels_key": str, "n_hidden": int, "n_latent": int,
    "n_layers": int, "dropout_rate": float, "dispersion": str, "gene_likelihood": str,
    "latent_distribution": str, "max_epochs": int, "batch_size": int, "train_size": float,
    "validation_size": float, "lr": float, "weight_decay": float, "eps": float,
    "optimizer": str, "n_epochs_kl_warmup": int, "n_steps_kl_warmup": int,
    "max_kl_weight": float, "min_kl_weight": float, "early_stopping_patience": int,
    "check_val_every_n_epoch": int, "seed": int, "checkpoint": str, "checkpoint_every": int,
    "devices": int,
}  # fmt: skip
_TRAIN_SWITCHES = ("use_observed_lib_size", "bias", "early_stopping", "reduce_lr_on_plateau",
                   "allow_non_integer", "resume")  # fmt: skip


def _cmd_train(args: argparse.Namespace) -> int:
    _check_distributed_flags(args)
    import linear_decoder_jax as ldj

    cluster = _join(args)
    kwargs = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    kwargs |= options.values(args, options.GROUPS["distributed"])
    kwargs |= {k: True for k in _TRAIN_SWITCHES if getattr(args, k)}
    if args.no_batch_norm:
        kwargs["use_batch_norm"] = False
    if args.no_shuffle_set_split:
        kwargs["shuffle_set_split"] = False
    if args.reference is not None:
        kwargs["reference"] = ldj.load(args.reference)
    if args.unfreeze_batchnorm_decoder:
        kwargs["freeze_batchnorm_decoder"] = False
    data = args.data if args.stream else _read_h5ad(args.data)
    model = ldj.train(data, progress_bar=not args.quiet, **kwargs)
    if cluster is not None:  # process 0 writes the model and reports the run; the others wait
        from linear_decoder_jax import distributed  # (their exit would end process 0's run)

        with distributed.guarded(cluster):
            if not cluster.is_coordinator:
                distributed.wait_for(cluster, "saved", [0])
                return 0
            dst = model.save(args.output, overwrite=args.overwrite)
            distributed.mark(cluster, "saved")
    else:
        dst = model.save(args.output, overwrite=args.overwrite)
    history = model.history_
    last = {k: float(v.iloc[-1, 0]) for k, v in history.items() if len(v)}
    summary = ", ".join(
        f"{k}={last[k]:.4g}" for k in ("elbo_train", "elbo_validation") if k in last
    )
    print(f"wrote {dst} ({len(history['train_loss'])} epochs; {summary})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import linear_decoder_jax as ldj

    model = ldj.load(args.model)
    if not isinstance(model, ldj.LinearSCVI):
        from linear_decoder_jax.errors import ConfigError

        raise ConfigError(
            f"ldj export writes LinearSCVI models; {args.model} is a {model.family.name} model."
        )
    dst = model.export_scvi(args.output, overwrite=args.overwrite)
    print(f"wrote {dst}/model.pt (load with scvi.model.LinearSCVI.load({str(dst)!r}, adata=...))")
    return 0


def _compilation_cache() -> None:
    if os.environ.get("LDJ_COMPILATION_CACHE", "1") != "0":
        from linear_decoder_jax._cache import enable_compilation_cache

        enable_compilation_cache()


def _compile_status() -> None:
    """Say so before a run whose compilation cache is empty: the first one waits for XLA."""
    from linear_decoder_jax._cache import default_cache_dir

    cache = default_cache_dir()
    off = os.environ.get("LDJ_COMPILATION_CACHE", "1") == "0"
    if off or not cache.is_dir() or not any(cache.iterdir()):
        when = "compilation cache off" if off else "first run, cached afterwards"
        print(f"ldj: compiling ({when})...", file=sys.stderr, flush=True)


def _check_distributed_flags(args: argparse.Namespace) -> None:
    given = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and any(v is not None for v in given):
        from linear_decoder_jax.errors import ConfigError

        raise ConfigError("--coordinator, --num-processes and --process-id need --distributed.")
    if args.distributed:  # the runtime logs every peer's failure; ours is the one-line error
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _join(args: argparse.Namespace) -> Any:
    """Join the distributed run of ``--distributed`` (its ``Cluster``; None without), before
    anything starts jax's backend (restoring a model does)."""
    if args.distributed:
        from linear_decoder_jax import distributed

        return distributed.initialize(
            coordinator=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            join_timeout=args.join_timeout,
            heartbeat_timeout=args.heartbeat_timeout,
        )
    return None


def _cmd_ablate(args: argparse.Namespace) -> int:
    _check_distributed_flags(args)
    _compile_status()
    import linear_decoder_jax as ldj

    _compilation_cache()
    _join(args)
    model = ldj.load(args.model, prefix=args.prefix, dtype="float64" if args.float64 else "float32")
    values = options.values(args, options.ALL)
    values["progress"] = sys.stderr.isatty()
    result = ldj.ablate(  # streams DATA from disk and writes OUT as it goes
        model, args.data, output=args.output, overwrite=args.overwrite, **values
    )
    if args.distributed and result.settings.get("n_processes") and not _is_process_zero():
        return 0  # process 0 reports the distributed run
    print(result.summary())
    print(f"wrote {Path(args.output).absolute()}")
    return 0


def _is_process_zero() -> bool:
    import jax

    return jax.process_index() == 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from linear_decoder_jax import merge

    result = merge.merge_parts(args.parts, args.output, overwrite=args.overwrite)
    print(result.summary())
    print(f"wrote {Path(args.output).absolute()}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from linear_decoder_jax import report

    path = report.write_report(
        args.result,
        args.output,
        groupby=args.groupby,
        top=args.top,
        data=args.data,
        png_dir=args.png_dir,
        gene_sets=args.gene_sets,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from linear_decoder_jax import demo

    _compilation_cache()

    return demo.run(out=args.out, overwrite=args.overwrite)


def _write_csv(table, output: str, *, overwrite: bool) -> None:
    """Write ``table`` to ``output`` atomically (an existing file needs ``overwrite``)."""
    from linear_decoder_jax._atomic import atomic_path

    with atomic_path(output, overwrite=overwrite, directory=False) as tmp:
        table.to_csv(tmp, index=False)


def _read_h5ad(path: str):
    """The AnnData at ``path``; a missing or foreign file is a one-line error."""
    import anndata

    from linear_decoder_jax.errors import IncompatibleDataError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        return anndata.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a foreign file
        msg = f"{path} is not a readable h5ad file ({type(err).__name__}: {err})."
        raise IncompatibleDataError(msg) from err


def _cmd_enrich(args: argparse.Namespace) -> int:
    import linear_decoder_jax as ldj
    from linear_decoder_jax._atomic import check_destination

    check_destination(args.output, overwrite=args.overwrite)
    result = ldj.AblationResult.read(args.result)
    table = ldj.enrichment(
        result,
        args.gene_sets,
        score=args.score,
        group=args.group,
        direction=args.direction,
        min_size=args.min_size,
        max_size=args.max_size,
    )
    _write_csv(table, args.output, overwrite=args.overwrite)
    with_cols = ["latent", "direction", "gene_set", "n_genes", "statistic", "padj"]
    print(table[with_cols].head(args.top).to_string(index=False))
    print(f"wrote {Path(args.output).absolute()} ({len(table)} tests)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import linear_decoder_jax as ldj

    if args.output is not None:
        from linear_decoder_jax._atomic import check_destination

        check_destination(args.output, overwrite=args.overwrite)
    _compilation_cache()
    model_a = _model_source(args.model_a, args.prefix_a)
    model_b = _model_source(args.model_b, args.prefix_b)
    table = ldj.compare(model_a, model_b, _read_h5ad(args.data), genes=args.genes)
    print(table.to_string(index=False))
    if args.output is not None:
        _write_csv(table, args.output, overwrite=args.overwrite)
        print(f"wrote {Path(args.output).absolute()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldj",
        description="Exact JAX LinearSCVI: convert scvi-tools checkpoints, score latents per cell.",
    )
    parser.add_argument("--version", action="version", version=f"ldj {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a scvi-tools LinearSCVI checkpoint (no torch)")
    p.add_argument("src", help="scvi-tools model directory or .pt file")
    p.add_argument("dst", help="directory to create (orbax params + config.json)")
    p.add_argument("--prefix", help="file-name prefix used when the model was saved")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="describe a converted model or a scvi-tools checkpoint")
    p.add_argument("path")
    p.add_argument("--prefix", help="file-name prefix used when the model was saved")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("ablate", help="score every latent for every cell; write an h5ad")
    p.add_argument("model", help="converted model directory or scvi-tools model directory")
    p.add_argument("data", help="cells to score: .h5ad file or .zarr store (folder or zip)")
    p.add_argument("-o", "--output", required=True, help="result .h5ad to write")
    p.add_argument("--prefix", help="file-name prefix of a scvi-tools model")
    p.add_argument("--float64", action="store_true", help="compute in double precision")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    options.add_arguments(p, options.GROUPS["run"])
    d = p.add_argument_group(
        "distributed", "one command on every process of a cluster (jax.distributed); one OUT"
    )
    options.add_arguments(d, options.GROUPS["distributed"])
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("merge", help="join `ldj ablate --shard` parts into one result")
    p.add_argument("parts", nargs="+", help="part .h5ad files, in any order")
    p.add_argument("-o", "--output", required=True, help="merged .h5ad to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("report", help="self-contained HTML report (and PNG figures) of a result")
    p.add_argument("result", help="result .h5ad written by ldj ablate")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--groupby", help="obs column for per-group sections (default: the result's)")
    p.add_argument("--top", type=int, default=3, help="latents listed per group (default 3)")
    p.add_argument(
        "--data", help="the ablated input (.h5ad or .zarr), for obs columns and embeddings"
    )
    p.add_argument("--png-dir", help="folder that also receives the figures as PNG files")
    p.add_argument("--gene-sets", help="GMT file: add the gene-set enrichment of every latent")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="run the bundled real-data demo and show what it finds")
    p.add_argument("--out", help="folder for the demo outputs (default: a new temporary folder)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("enrich", help="gene-set enrichment of every latent (rank-sum, BH)")
    p.add_argument("result", help="result .h5ad written by ldj ablate")
    p.add_argument("--gene-sets", required=True, help="gene sets as a GMT file")
    p.add_argument("-o", "--output", required=True, help="CSV table to write")
    p.add_argument(
        "--score",
        choices=("loadings", "delta_nll", "lfc"),
        default="loadings",
        help="gene ranking: signed loadings, or per-gene scores of --gene-scores runs",
    )
    p.add_argument("--group", help="group whose per-gene scores rank the genes")
    p.add_argument("--direction", choices=("positive", "negative", "both"), default="both")
    p.add_argument("--min-size", type=int, default=5, help="smallest set tested (default 5)")
    p.add_argument("--max-size", type=int, default=500, help="largest set tested (default 500)")
    p.add_argument("--top", type=int, default=10, help="rows printed (default 10)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_enrich)

    p = sub.add_parser("compare", help="match the latents of two models on the same cells")
    p.add_argument("model_a", help="first model (converted or scvi-tools directory)")
    p.add_argument("model_b", help="second model")
    p.add_argument("data", help="h5ad with the cells both models encode")
    p.add_argument("-o", "--output", help="CSV table to write")
    p.add_argument("--genes", choices=("same", "intersection"), default="same")
    p.add_argument("--prefix-a", help="file-name prefix of a scvi-tools model A")
    p.add_argument("--prefix-b", help="file-name prefix of a scvi-tools model B")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("train", help="train a LinearSCVI model (scvi-tools' objective, in JAX)")
    p.add_argument("data", help="h5ad with raw counts")
    p.add_argument("-o", "--output", required=True, help="model directory to create")
    for name, kind in _TRAIN_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=kind, default=None, help="default: ldj.train's (scvi-tools')")
    for name in _TRAIN_SWITCHES:
        p.add_argument("--" + name.replace("_", "-"), action="store_true")
    p.add_argument("--no-batch-norm", action="store_true", help="decoder without BatchNorm")
    p.add_argument("--no-shuffle-set-split", action="store_true")
    p.add_argument("--reference", help="model to map DATA onto (query mapping: new batches)")
    p.add_argument("--unfreeze-batchnorm-decoder", action="store_true",
                   help="query mapping: train the decoder's BatchNorm too")  # fmt: skip
    p.add_argument("--stream", action="store_true",
                   help="read minibatches from the file at each step (never the whole matrix)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.add_argument("--overwrite", action="store_true")
    d = p.add_argument_group(
        "distributed", "one command on every process of a cluster (jax.distributed); one model"
    )
    options.add_arguments(d, options.GROUPS["distributed"])
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="write a model as a scvi-tools LinearSCVI directory")
    p.add_argument("model", help="model directory (ldj train / ldj convert)")
    p.add_argument("output", help="scvi-tools model directory to create (model.pt)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from converters import ConverterError
    from linear_decoder_jax.errors import LDJError

    return (LDJError, ConverterError, FileNotFoundError, PermissionError, IsADirectoryError)


def _hint(err: BaseException) -> str:
    """What to do about an expected error whose message says only what is wrong."""
    from converters import MalformedCheckpointError, UnsafeCheckpointError, UnsupportedModelError
    from linear_decoder_jax.errors import CheckpointFormatError

    if isinstance(err, UnsafeCheckpointError):
        return (
            "Nothing in the file was run. Load checkpoints only from sources you trust, or save "
            "the model again with scvi-tools in a session you trust."
        )
    if isinstance(err, MalformedCheckpointError):
        return (
            "Point ldj at the folder written by scvi-tools' model.save() (or its model.pt); if "
            "the file is damaged, save the model again."
        )
    if isinstance(err, UnsupportedModelError):
        return "ldj converts only LinearSCVI models it can mirror exactly (docs/index.md: Safety)."
    if isinstance(err, CheckpointFormatError):
        return "Convert the scvi-tools model again with `ldj convert`."
    return ""


def _exists(path: str, what: str) -> None:
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{path}: no such file or folder ({what}).")


def _writable(path: str, overwrite: bool, *, h5ad: bool) -> None:
    target = Path(path).expanduser().absolute()
    if h5ad and target.suffix != ".h5ad":
        from linear_decoder_jax.errors import ConfigError

        msg = f"Expected an output name ending in .h5ad, got {path!r} instead (results are h5ad)."
        raise ConfigError(msg)
    if target.exists() and not overwrite:
        from linear_decoder_jax.errors import OutputExistsError

        raise OutputExistsError(f"{target} already exists; pass --overwrite to replace it.")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot write {target}: the folder {target.parent} does not exist."
        )


def check_paths(args: argparse.Namespace) -> None:
    """The command's input and output paths, checked before jax or anndata is imported."""
    command = args.command
    if command == "convert":
        _exists(args.src, "the scvi-tools model")
        _writable(args.dst, args.overwrite, h5ad=False)
    elif command == "info":
        _exists(args.path, "the model")
    elif command == "ablate":
        _exists(args.model, "the model")
        _exists(args.data, "the cells to score")
        _writable(args.output, args.overwrite, h5ad=True)
    elif command == "merge":
        for part in args.parts:
            _exists(part, "a result part")
        _writable(args.output, args.overwrite, h5ad=True)
    elif command == "train":
        _exists(args.data, "the cells to train on")
        if args.reference is not None:
            _exists(args.reference, "the reference model")
        _writable(args.output, args.overwrite, h5ad=False)
    elif command == "export":
        _exists(args.model, "the model")
        _writable(args.output, args.overwrite, h5ad=False)
    elif command == "report":
        _exists(args.result, "the result")
        if args.data is not None:
            _exists(args.data, "the ablated input")
        _writable(args.output, args.overwrite, h5ad=False)


# "pass overwrite=True (CLI: --overwrite)" -> "pass --overwrite": the library's messages name both.
_KEYWORD_WITH_FLAG = re.compile(r"\b\w+=(?:'[^']*'|[^\s()]*) \(CLI: ([^)]*)\)")


def cli_words(message: str) -> str:
    """A library message in the CLI's words: keyword arguments replaced by their flags."""
    return _KEYWORD_WITH_FLAG.sub(r"\1", message)


def _note(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Show a warning as one line (no source line); library deprecations are not the user's."""
    if issubclass(category, DeprecationWarning | PendingDeprecationWarning | FutureWarning):
        return
    print(f"ldj: note: {cli_words(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _note
            check_paths(args)
            return int(args.func(args))
    except KeyboardInterrupt:
        print("ldj: interrupted; no output was written.", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug or not isinstance(err, _expected_errors()):
            if args.debug:
                raise
            print(f"ldj: internal error ({type(err).__name__}): {err}", file=sys.stderr)
            print("ldj: re-run with --debug for the traceback.", file=sys.stderr)
            return EXIT_ERROR
        message = cli_words(" ".join(f"{err} {_hint(err)}".split()))
        print(f"ldj: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def console_main() -> None:
    """The ``ldj`` command. Once a command has returned, its files are closed and renamed into
    place, so the process ends without the interpreter's teardown of jax's runtime and of every
    module (~0.5 s of a 5 s ``ldj ablate``, measured). A distributed run exits normally: its
    cluster client shuts down at exit."""
    code = main()
    jax = sys.modules.get("jax")  # imported by the commands that need it
    if jax is not None and jax.distributed.is_initialized():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (ldj info | head -1): nothing left to say
            pass
    os._exit(code)
