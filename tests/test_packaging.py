"""Packaging and documentation facts: metadata, a torch-free runtime, docs that cover the API.

The runtime check that every module imports with torch and scvi-tools blocked lives in
``test_torch_free.py``; here a static scan adds the imports that only run inside functions. The
``ldj --help``-without-jax check lives in ``test_cli.py``. Building the wheel and installing it
into a fresh virtualenv without torch is a CI stage (``.ci/run``), not a unit test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import converters
import linear_decoder_jax as ldj
from linear_decoder_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "linear_decoder_jax",
    "linear_decoder_jax.families",
    "linear_decoder_jax.training",
    "converters",
)
# torch, scvi-tools, drvi-py and what they bring in for training; none may be imported at run time.
FORBIDDEN = {"torch", "scvi", "drvi", "lightning", "pytorch_lightning", "pyro", "torchmetrics"}
DOCS = ROOT / "docs"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_files() -> list[Path]:
    """Every module of the imported (installed or editable) packages."""
    folders = [Path(pkg.__file__).parent for pkg in (ldj, converters)]
    files = sorted(p for folder in folders for p in folder.rglob("*.py"))
    assert any(p.name == "ablation.py" for p in files) and any(
        p.name == "_torch_zip.py" for p in files
    )
    return files


# -- torch-free runtime ---------------------------------------------------------------------------


def _imported_roots(tree: ast.AST) -> set[str]:
    """Top-level names of every import in ``tree``, at module level or inside functions."""
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):  # importlib.import_module("x") / __import__("x")
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    roots.add(arg.value.split(".")[0])
    return roots


def test_no_module_imports_torch_or_scvi_anywhere():
    """Static scan: also the lazy imports inside functions, which importing a module never runs."""
    offenders = {
        str(path): sorted(roots & FORBIDDEN)
        for path in _source_files()
        if (roots := _imported_roots(ast.parse(path.read_text(), filename=str(path)))) & FORBIDDEN
    }
    assert not offenders, f"runtime modules import test-only packages: {offenders}"


def test_every_shipped_module_is_checked():
    """The modules setuptools puts in the wheel are the ones the torch-free tests walk."""
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["linear_decoder_jax*", "converters*"]
    root = Path(ldj.__file__).parent.parent  # converters/ sits beside it
    shipped = {
        ".".join(p.parent.relative_to(root).parts)
        for p in _source_files()
        if p.name == "__init__.py"
    }
    assert shipped == set(PACKAGES), "a sub-package appeared: check package-data and the wheel"


# -- metadata ---------------------------------------------------------------------------------------


def test_version_is_single_sourced():
    version = ldj.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", version)
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "linear_decoder_jax._version.__version__"
    }
    assert importlib.metadata.version("linear-decoder-jax") == version
    argv = [sys.executable, "-m", "linear_decoder_jax", "--version"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"ldj {version}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)


def test_project_metadata():
    project = _pyproject()["project"]
    assert project["name"] == "linear-decoder-jax"
    assert project["license"] == "BSD-3-Clause"
    assert project["requires-python"] == ">=3.11"
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    assert project["scripts"] == {"ldj": "linear_decoder_jax.cli:console_main"}
    deps = project["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in deps}
    assert {"jax", "numpy", "anndata", "flax", "orbax-checkpoint", "h5py"} <= names
    assert not names & {"torch", "scvi-tools"}, "torch / scvi-tools are test-only"
    # lower bounds only: this installs next to scanpy, scvi-tools or a CUDA jax
    assert all(">=" in d and not re.search(r"<|==|~=|!=", d) for d in deps), deps
    extras = project["optional-dependencies"]
    test = {re.split(r"[<>=!~\[ ]", d)[0] for d in extras["test"]}
    assert {"pytest", "hypothesis", "scvi-tools", "torch"} <= test
    assert any(d.startswith("jax[cuda") for d in extras["gpu"])
    assert {"mkdocs", "mkdocs-material"} <= {re.split(r"[<>=\[]", d)[0] for d in extras["docs"]}
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert "data/**/*" in package_data["linear_decoder_jax"]


def test_demo_data_is_package_data():
    from linear_decoder_jax.demo import demo_files

    folder = demo_files()
    assert folder.is_relative_to(Path(ldj.__file__).parent)
    assert {p.name for p in folder.iterdir()} >= {"model.pt", "counts.h5ad", "planted.json"}


# -- documentation ---------------------------------------------------------------------------------


def _api_pages() -> str:
    return "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))


def _directives() -> set[str]:
    return set(re.findall(r"^::: ([\w.]+)$", _api_pages(), re.M))


def test_api_reference_covers_the_public_api():
    documented = _directives()
    missing = [
        f"linear_decoder_jax.{name}"
        for name in ldj.__all__
        if name not in ("__version__", "pl") and f"linear_decoder_jax.{name}" not in documented
    ]
    missing += [
        f"converters.{n}" for n in converters.__all__ if f"converters.{n}" not in documented
    ]
    assert "linear_decoder_jax.pl" in documented, "ldj.pl is documented as a whole module"
    assert not missing, f"add these to docs/api/*.md: {missing}"


def _public_callables():
    """(qualified name, object) of every public function, class and method users call."""
    import linear_decoder_jax.pl as pl
    from linear_decoder_jax.report import write_report

    objects = [(f"ldj.{n}", getattr(ldj, n)) for n in ldj.__all__ if n not in ("__version__", "pl")]
    objects += [(f"converters.{n}", getattr(converters, n)) for n in converters.__all__]
    objects += [("linear_decoder_jax.report.write_report", write_report)]
    objects += [
        (f"ldj.pl.{n}", obj)
        for n, obj in vars(pl).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == pl.__name__
    ]
    for cls in (ldj.LinearSCVI, ldj.AblationResult):
        objects += [
            (f"ldj.{cls.__name__}.{n}", obj)
            for n, obj in vars(cls).items()
            if not n.startswith("_") and (inspect.isfunction(obj) or isinstance(obj, classmethod))
        ]
    return objects


def test_public_callables_have_docstrings():
    undocumented = [name for name, obj in _public_callables() if not inspect.getdoc(obj)]
    assert not undocumented, f"add a docstring (numpydoc) to: {undocumented}"


def _returns_problem(doc: str) -> str | None:
    """What is wrong with a numpydoc Returns section: its first line must be a type (or
    ``name : type``), with the description indented below it."""
    match = re.search(r"^Returns\n-------\n((?:.*\n?)*?)(?:\n\S[^\n]*\n-{3,}|\Z)", doc, re.M)
    if match is None:
        return None
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    if not lines:
        return "empty Returns section"
    head = lines[0]
    if head.startswith(" ") or "``" in head or head.rstrip().endswith("."):
        return f"first line {head!r} is prose, not a type"
    if len(lines) > 1 and not lines[1].startswith(" "):
        return f"description of {head!r} is not indented under it"
    return None


def test_returns_sections_are_numpydoc():
    """mkdocstrings renders the first line of a Returns section as the type."""
    problems = {
        name: problem
        for name, obj in _public_callables()
        if (doc := inspect.getdoc(obj)) and (problem := _returns_problem(doc))
    }
    assert not problems, problems


def test_cli_reference_covers_every_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = set(sub.choices)
    assert commands >= {"convert", "info", "ablate", "merge", "report", "demo"}
    page = (DOCS / "cli.md").read_text()
    marked = set(re.findall(r"^<!-- ldj-help (\w+) -->$", page, re.M))
    sections = set(re.findall(r"^## `ldj (\w+)`$", page, re.M))
    assert marked == commands and sections == commands, (commands, marked, sections)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.M | re.S)


def test_tutorial_runs(tmp_path):
    """The tutorial's code blocks, in order, torch and scvi-tools blocked, in an empty folder."""
    text = (DOCS / "tutorial.md").read_text()
    python, shell = _blocks(text, "python"), _blocks(text, "bash")
    assert len(python) >= 5 and shell
    block = (  # an import hook: sys.modules[m] = None would break scipy's torch lookups
        "class _Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(FORBIDDEN)!r}:\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, _Blocked())\n"
    )
    code = "import sys\n" + block + "\n".join(python)
    env = {**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "planted cells 56.1, others 1.6" in proc.stdout
    assert (tmp_path / "heatmap.png").is_file() and (tmp_path / "ablation.h5ad").is_file()
    if not any(
        (Path(d) / "ldj").is_file() for d in env["PATH"].split(os.pathsep) if d
    ):  # pragma: no cover - ldj is on PATH after `pip install -e .`
        pytest.skip("the ldj console script is not installed")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(shell)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "report.html").is_file()
