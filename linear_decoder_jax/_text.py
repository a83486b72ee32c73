"""Message helpers shared by the error paths."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_PREVIEW = 5


def preview(items: Iterable[Any], n: int = _PREVIEW) -> str:
    """The first ``n`` items quoted and joined, then "and N more"."""
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(str(i)) for i in items[:n]) + more
