"""``ldj report`` end to end on the real demo result: valid HTML, embedded PNGs, exact tables."""

from __future__ import annotations

import base64
import dataclasses
import io
import subprocess
import sys
from html.parser import HTMLParser

import anndata
import matplotlib.image
import numpy as np
import pytest
from test_pl import demo_result

from linear_decoder_jax import demo as demo_module
from linear_decoder_jax import report
from linear_decoder_jax.cli import main
from linear_decoder_jax.errors import IncompatibleDataError, OutputExistsError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}


class Page(HTMLParser):
    """Strict enough for our output: every non-void tag closed in order; tables and images kept."""

    def __init__(self, text: str):
        super().__init__()
        self.stack: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(attrs["class"], [])
        elif tag == "tr":
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        assert tag not in ("script", "link", "iframe"), f"unexpected <{tag}>"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th"):
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _records(page: Page, cls: str) -> list[dict[str, str]]:
    header, *rows = page.tables[cls]
    return [dict(zip(header, row, strict=True)) for row in rows]


def _png_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    png = base64.b64decode(src[len(prefix) :], validate=True)
    assert png.startswith(PNG_SIGNATURE)
    assert matplotlib.image.imread(io.BytesIO(png), format="png").ndim == 3
    return png


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo result h5ad, the input h5ad (with X_umap) and a result lacking obs and embeddings."""
    _, adata, result = demo_result()
    root = tmp_path_factory.mktemp("report")
    result.write(root / "ablation.h5ad")
    adata.write_h5ad(root / "counts.h5ad")
    settings = {**result.settings, "groupby": ""}
    bare = dataclasses.replace(
        result, obs=result.obs[["batch"]], embeddings={}, groups=None, settings=settings
    )
    bare.write(root / "bare.h5ad")
    return root, adata, result


def test_cli_report_end_to_end(files, capsys):
    root, adata, result = files
    html_path, pngs = root / "report.html", root / "figures"
    argv = ["report", str(root / "ablation.h5ad"), "-o", str(html_path), "--top", "2"]
    assert main([*argv, "--png-dir", str(pngs)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {html_path}"
    page = Page(html_path.read_text(encoding="utf-8"))
    assert page.links and all(link.startswith("#") for link in page.links)  # nothing remote

    groups = result.groups
    rows = _records(page, "top-latents")
    shown = []
    for group, table in groups["mean"].iterrows():
        mine = [r for r in rows if r["cell_type"] == group]
        best = list(table.sort_values(ascending=False).index[:2])
        assert [r["latent"] for r in mine] == best and [r["rank"] for r in mine] == ["1", "2"]
        for r in mine:
            name = r["latent"]
            assert int(r["cells"]) == groups["n_cells"].loc[group, "n_cells"]
            assert float(r["mean delta_nll"]) == pytest.approx(table[name], abs=5e-4)
            median = groups["median"].loc[group, name]
            assert float(r["median delta_nll"]) == pytest.approx(median, abs=5e-4)
            frac = groups["frac_positive"].loc[group, name]
            assert float(r["cells with delta > 0"].rstrip("%")) / 100 == pytest.approx(
                frac, abs=5e-4
            )
            loadings = result.loadings[:, int(name[2:])]
            top_up = np.asarray(result.var_names)[np.argsort(-loadings, kind="stable")[:5]]
            assert r["top genes, loading > 0 (up to 5)"] == ", ".join(top_up)
        shown += best
    shown = sorted(set(shown), key=lambda n: -result.delta_nll[:, int(n[2:])].mean())

    cells = _records(page, "top-cells")
    expected = result.top_cells()
    expected = [r for name in shown for r in expected[expected.latent == name].itertuples()]
    assert len(cells) == len(expected) == 10 * len(shown)
    for got, want in zip(cells, expected, strict=True):
        assert (got["latent"], int(got["rank"]), got["cell"]) == (want.latent, want.rank, want.cell)
        assert float(got["delta_nll"]) == pytest.approx(want.delta_nll, abs=5e-4)
        assert got["cell_type"] == adata.obs.loc[want.cell, "cell_type"]

    settings = dict(page.tables["settings"][1:])
    assert settings["cells"] == str(adata.n_obs) and settings["mode"] == "drop"
    assert settings["baseline"] == "zero" and settings["groups from"] == "obs['cell_type']"
    assert settings["embedding"] == "X_umap"

    embedded = [_png_bytes(src) for src in page.images]
    names = ["group_heatmap.png", *(f"latent_{n}.png" for n in shown)]
    assert len(embedded) == len(names)
    assert sorted(p.name for p in pngs.iterdir()) == sorted(names)
    assert [(pngs / n).read_bytes() for n in names] == embedded


def test_report_refuses_to_overwrite(files, capsys):
    root, _, _ = files
    out = root / "twice.html"
    argv = [
        "report",
        str(root / "ablation.h5ad"),
        "-o",
        str(out),
        "--groupby",
        "batch",
        "--top",
        "1",
    ]
    assert main(argv) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --overwrite to replace it." in err
    assert out.read_bytes() == before
    with pytest.raises(OutputExistsError):
        report.write_report(root / "ablation.h5ad", out)
    assert main([*argv, "--overwrite"]) == 0


def test_report_takes_obs_and_embeddings_from_data(files, capsys):
    root, _, result = files
    out = root / "bare.html"
    argv = ["report", str(root / "bare.h5ad"), "-o", str(out), "--groupby", "cell_type"]
    assert main(argv) == 1
    assert "groupby column 'cell_type' is not in the result's obs" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--data", str(root / "counts.h5ad")]) == 0
    page = Page(out.read_text(encoding="utf-8"))
    assert dict(page.tables["settings"][1:])["embedding"] == "X_umap"
    assert {r["cell_type"] for r in _records(page, "top-latents")} == {"B", "Monocyte", "T/NK"}

    alone = report.write_report(root / "bare.h5ad", root / "alone.html")
    page = Page(alone.read_text(encoding="utf-8"))
    settings = dict(page.tables["settings"][1:])
    assert settings["groups from"] == "all cells (no groupby)"
    assert settings["embedding"].startswith("PCA of the latent space")
    top = _records(page, "top-latents")
    assert [r["group"] for r in top] == ["all cells"] * 3
    best = np.argsort(-result.delta_nll.mean(0))[:3]
    assert [r["latent"] for r in top] == [result.latent_names[j] for j in best]
    assert len(page.images) == 1 + 3

    with pytest.raises(IncompatibleDataError, match="no such file"):
        report.write_report(root / "missing.h5ad", root / "x.html")
    with pytest.raises(IncompatibleDataError, match="is not a readable h5ad file"):
        report.write_report(root / "alone.html", root / "x.html")


def test_demo_ends_with_its_report(tmp_path, capsys):
    assert demo_module.run(out=str(tmp_path)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"report: {tmp_path / 'report.html'}")
    page = Page((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert {r["group"] for r in _records(page, "top-latents")} == {"planted", "other"}
    assert len(list((tmp_path / "figures").glob("*.png"))) == len(page.images)
    res = anndata.read_h5ad(tmp_path / "ablation.h5ad")
    assert res.n_obs == 80


def test_help_imports_neither_jax_nor_matplotlib():
    code = (
        "import sys\n"
        "from linear_decoder_jax.cli import main\n"
        "try:\n"
        "    main(['report', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'matplotlib' not in sys.modules and 'jax' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "--png-dir" in out.stdout
