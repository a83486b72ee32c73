"""The CLI contract: one line on stderr saying what is wrong and what to do, exit code 1, no
traceback unless ``--debug``."""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import anndata
import numpy as np
import pytest
from reliability_tools import (
    BAD_DATA,
    DEMO_DATA,
    GOLDEN,
    ROOT,
    assert_one_line,
    replace_str,
    run_cli,
    with_pickle,
    write_converted_copy,
    zip_bytes,
    zip_records,
)

import linear_decoder_jax as ldj
from converters import (
    ConverterError,
)
from linear_decoder_jax.cli import main
from linear_decoder_jax.errors import (
    IncompatibleDataError,
)

# --------------------------------------------------------------------------------------------
# The CLI: one line saying what is wrong and what to do, exit 1, no traceback
# --------------------------------------------------------------------------------------------


def _checkpoint_cases(tmp: Path) -> dict[str, tuple[list[object], tuple[str, ...]]]:
    """name -> (argv, fragments of the one error line), for files made under ``tmp``."""
    empty, random_, truncated = tmp / "empty.pt", tmp / "random.pt", tmp / "truncated.pt"
    empty.write_bytes(b"")
    random_.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated.write_bytes(GOLDEN.read_bytes()[:50_000])
    nan = tmp / "nan.pt"
    records = zip_records(GOLDEN)
    records["model/data/3"] = struct.pack("<f", math.nan) + records["model/data/3"][4:]
    nan.write_bytes(zip_bytes(records))
    short = tmp / "short.pt"
    records = zip_records(GOLDEN)
    records["model/data/3"] = records["model/data/3"][:-4]
    short.write_bytes(zip_bytes(records))
    legacy = tmp / "legacy"
    legacy.mkdir()
    shutil.copy(GOLDEN, legacy / "model_params.pt")
    (tmp / "no_model").mkdir()
    scanvi = with_pickle(tmp / "scanvi.pt", replace_str("LinearSCVI", "SCANVI"))
    gene_cell = with_pickle(tmp / "gene_cell.pt", replace_str("gene-batch", "gene-cell"))
    hint = "model.save()"
    return {
        "empty": ([empty], ("file is empty", hint)),
        "random_bytes": ([random_], ("not a torch zip archive", hint)),
        "truncated": ([truncated], ("truncated or corrupt zip archive", hint)),
        "npz_not_torch": ([GOLDEN.parent / "counts.npz"], ("expected one <root>/data.pkl",)),
        "h5ad_not_torch": ([DEMO_DATA], ("not a torch zip archive",)),
        "nan_weight": ([nan], ("holds NaN or infinite values", hint)),
        "short_storage": ([short], ("holds 29436 bytes, expected 29440", hint)),
        "legacy_missing_files": ([legacy], ("layout is missing", "attr.pkl", "var_names.csv")),
        "no_model_file": ([tmp / "no_model"], ("found neither", "pass it with --prefix.")),
        "missing_path": ([tmp / "nowhere"], ("no such file or folder",)),
        "scanvi": ([scanvi], ("this is a SCANVI model, not LinearSCVI", "docs/index.md: Safety")),
        "gene_cell": ([gene_cell], ("dispersion='gene-cell' cannot be mirrored",)),
    }


CHECKPOINT_CASES = [
    "empty",
    "random_bytes",
    "truncated",
    "npz_not_torch",
    "h5ad_not_torch",
    "nan_weight",
    "short_storage",
    "legacy_missing_files",
    "no_model_file",
    "missing_path",
    "scanvi",
    "gene_cell",
]


@pytest.mark.parametrize("command", ["convert", "info"])
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_cli_checkpoint_errors(tmp_path: Path, capsys, case: str, command: str) -> None:
    argv, fragments = _checkpoint_cases(tmp_path)[case]
    if command == "convert":
        argv = [*argv, tmp_path / "out"]
    code, _, err = run_cli(capsys, command, *argv)
    assert_one_line(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_cli_damaged_converted_model(tmp_path: Path, converted: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    (model / "config.json").write_text("[]")
    code, _, err = run_cli(capsys, "info", model)
    assert_one_line(code, err, "not a valid model configuration", "ldj convert")


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_cli_data_errors(demo_adata, converted: Path, tmp_path: Path, capsys, case: str) -> None:
    edit, fragments = BAD_DATA[case]
    data = tmp_path / "cells.h5ad"
    edit(demo_adata.copy()).write_h5ad(data)
    out = tmp_path / "result.h5ad"
    code, _, err = run_cli(capsys, "ablate", converted, data, "-o", out, "--batch-size", "16")
    cli_fragments = [f for f in fragments if "=True" not in f]  # the CLI names flags instead
    line = assert_one_line(code, err, *cli_fragments)
    assert ("--allow-non-integer" in line) == (case == "non_integer_counts")
    assert "=True" not in line
    assert not out.exists()
    if case == "non_integer_counts":
        argv = ["ablate", converted, data, "-o", out, "--allow-non-integer"]
        assert run_cli(capsys, *argv)[0] == 0 and out.exists()


def test_cli_layer_and_file_errors(demo_adata, converted: Path, tmp_path: Path, capsys) -> None:
    model = write_converted_copy(
        converted, tmp_path / "model", lambda c: c["data"].update(layer="counts")
    )
    out = tmp_path / "result.h5ad"
    code, _, err = run_cli(capsys, "ablate", model, DEMO_DATA, "-o", out, "--layer", "counts")
    assert_one_line(code, err, "lacks layer 'counts'", "--layer", "--use-raw")
    for data in (GOLDEN, tmp_path / "missing.h5ad"):
        code, _, err = run_cli(capsys, "ablate", converted, data, "-o", out)
        assert_one_line(code, err, str(data))
    assert not out.exists()


def test_cli_debug_shows_the_traceback(tmp_path: Path, converted: Path, capsys) -> None:
    data = tmp_path / "cells.h5ad"
    anndata.AnnData(np.zeros((0, 3), np.float32)).write_h5ad(data)
    argv = ["ablate", converted, data, "-o", tmp_path / "r.h5ad"]
    assert_one_line(*run_cli(capsys, *argv)[::2])
    with pytest.raises(IncompatibleDataError):
        main(["--debug", *map(str, argv)])
    with pytest.raises(ConverterError):
        main(["--debug", "convert", str(GOLDEN.parent / "counts.npz"), str(tmp_path / "o")])


def test_docs_safety_section_matches_the_reader() -> None:
    text = (ROOT / "docs" / "index.md").read_text()
    section = text[text.index("## Safety") :]
    section = section[: (section + "\n## ").index("\n## ", 3)]
    for claim in ("allowlist", "os.system", "SCVI, SCANVI", "gene-cell", "stored or deflate"):
        assert claim in section, claim


def test_cli_merge_of_files_that_are_not_results(tmp_path: Path, capsys) -> None:
    text = tmp_path / "part.h5ad"
    text.write_text("not hdf5")
    for part in (text, DEMO_DATA):
        code, _, err = run_cli(capsys, "merge", part, "-o", tmp_path / "merged.h5ad")
        assert_one_line(code, err, str(part))
    assert not (tmp_path / "merged.h5ad").exists()


def test_overwrite_never_swaps_a_folder_for_a_file(tmp_path: Path) -> None:
    """--overwrite replaces an output of the same kind only, and never the source checkpoint."""
    from linear_decoder_jax._atomic import atomic_path

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(ldj.OutputExistsError, match="existing folder"):
        with atomic_path(folder, overwrite=True, directory=False):
            pass
    assert (folder / "keep.txt").read_text() == "precious"
    src = tmp_path / "scvi_model"
    src.mkdir()
    (src / "model.pt").write_bytes(GOLDEN.read_bytes())
    with pytest.raises(ldj.ConfigError, match="holds the checkpoint"):
        ldj.convert(src, src, overwrite=True)
    assert (src / "model.pt").read_bytes() == GOLDEN.read_bytes()
