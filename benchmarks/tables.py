"""Plain-text tables for the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import sys


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print ``rows`` under ``header``, right-aligned columns, and flush (long runs print as they go)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()
