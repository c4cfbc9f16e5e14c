"""Progress for long work: a tqdm bar on a terminal, a few plain lines when output is redirected.

A bar redraws itself with carriage returns, which fill a log file with thousands of fragments; when
the stream is not a terminal, a line is printed at most every ``interval`` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

Report = Callable[[int, int, str], None]


class Progress:
    """``progress(done, total, what)``: tqdm on a TTY, else a line every ``interval`` seconds (with ETA)."""

    def __init__(self, description: str, stream: TextIO | None = None, interval: float = 15.0):
        self.description = description
        self.stream = stream or sys.stderr
        self.interval = interval
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._start = time.perf_counter()
        self._last = 0.0

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if self.interactive:
            self._tqdm(done, total, what)
            return
        now = time.perf_counter()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - self._start
        eta = f", ETA {elapsed / done * (total - done):.0f} s" if 0 < done < total else ""
        print(
            f"{self.description}: {done}/{total} {what} ({elapsed:.0f} s{eta})".rstrip(),
            file=self.stream,
            flush=True,
        )

    def _tqdm(self, done: int, total: int, what: str) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._bar.total != total:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=self.description, file=self.stream)
        self._bar.n = done
        self._bar.set_postfix_str(what[-40:], refresh=False)
        self._bar.refresh()
        if done >= total:
            self._bar.close()
            self._bar = None
