"""A plain-text progress line for loading (no dependency): files and bytes read so far.

Shown only when asked for, or by default when stderr is a terminal, and then on one rank only
(the caller decides which). Redraws at most ~10 times a second.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..planning.render import fmt_bytes


class Progress:
    """``update(nbytes, file)`` after each read; ``close()`` prints the final line."""

    def __init__(self, total_bytes: int, total_files: int, label: str = "xtp load",
                 stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total_bytes, self.total_files = total_bytes, total_files
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done_bytes = 0
        self.files: set = set()
        self._last = 0.0
        self._start = time.monotonic()

    @classmethod
    def auto(cls, flag: bool | None, is_main: bool, total_bytes: int, total_files: int,
             label: str = "xtp load") -> Progress:
        """On if ``flag`` is True (main rank only); with ``None``, on when stderr is a tty."""
        tty = getattr(sys.stderr, "isatty", lambda: False)()
        enabled = is_main and (flag if flag is not None else tty)
        return cls(total_bytes, total_files, label, enabled=bool(enabled))

    def update(self, nbytes: int, file=None) -> None:
        self.done_bytes += nbytes
        if file is not None:
            self.files.add(file)
        now = time.monotonic()
        if self.enabled and now - self._last > 0.1:
            self._last = now
            self._draw("\r")

    def _draw(self, start: str, end: str = "") -> None:
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        secs = time.monotonic() - self._start
        self.stream.write(
            f"{start}{self.label}: files {len(self.files)}/{self.total_files}, "
            f"{fmt_bytes(self.done_bytes)} / {fmt_bytes(self.total_bytes)} ({pct:.0f}%), "
            f"{secs:.1f} s{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw("\r", "\n")
