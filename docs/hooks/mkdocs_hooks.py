"""mkdocs hooks: the CLI reference from the parser itself, and Sphinx roles in docstrings.

* ``docs/cli.md``: a line ``<!-- ldj-help -->`` becomes ``ldj --help``, ``<!-- ldj-help ablate -->``
  becomes ``ldj ablate --help``, so the reference cannot drift from the code. The parser is
  imported from ``linear_decoder_jax.cli`` (no jax import).
* Docstrings use Sphinx cross-reference roles (``:class:`~pkg.Name```), which mkdocstrings shows
  verbatim; they are rendered as plain code (``Name``) instead.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):<code>(~?)([^<]*)</code>")
MARKER = re.compile(r"^<!-- ldj-help(?: (?P<command>[a-z]+))? -->$", re.MULTILINE)


def help_text(command: str | None) -> str:
    """``ldj [COMMAND] --help`` as printed in an 88-column terminal."""
    os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal width
    from linear_decoder_jax.cli import build_parser

    parser = build_parser()
    if command is None:
        return parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        msg = f"docs/cli.md names `ldj {command}`, which is not a subcommand of ldj"
        raise ValueError(msg)
    return sub.choices[command].format_help()


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: f"```text\n{help_text(m['command'])}```", markdown)


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    return ROLE.sub(_role, html)
