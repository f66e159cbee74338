"""The demo's report on standard output: a header line and a closing line per step, details indented.

Everything else (the jobs' logs, Spark's own output) goes to the demo's log file, so the report stays
readable. Progress bars are tqdm bars on the same stream.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Optional, TextIO

INDENT = " " * 6


class DemoError(RuntimeError):
    """A step that cannot go on; the message says what failed and what to read or do."""


class Console:
    """Write the report lines of a run with ``steps`` numbered steps."""

    def __init__(self, stream: TextIO, steps: int, progress: bool = True):
        self.stream = stream
        self.steps = steps
        self.progress = progress

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, number: int, title: str) -> None:
        self.line(f"[{number}/{self.steps}] {title}")

    def detail(self, text: str) -> None:
        for part in text.splitlines() or [""]:
            self.line(INDENT + part)

    def done(self, seconds: float) -> None:
        self.detail(f"done in {seconds:.0f} s")

    def bar(self, total: int, desc: str, unit: str = "ev"):
        """Return a tqdm bar, indented like the details (disabled without progress output)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=INDENT + desc, unit=unit, file=self.stream, disable=not self.progress,
                    mininterval=1.0, dynamic_ncols=True)


class Stopwatch:
    """Seconds since creation, on the monotonic clock."""

    def __init__(self):
        self.started = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.started


def count(value: int) -> str:
    """Format an integer with thousands separators."""
    return f"{value:,}"


def instant(epoch_ms: Optional[int]) -> str:
    """Format epoch milliseconds as a UTC date and time (``2018-09-24 14:27:30Z``)."""
    if epoch_ms is None:
        return "n/a"
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def day(epoch_ms: int) -> str:
    """Format epoch milliseconds as a UTC date."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def duration(seconds: Optional[float]) -> str:
    """Format a duration in the largest fitting unit: seconds, minutes, hours, days or years."""
    if seconds is None:
        return "n/a"
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def clip(text: Optional[str], width: int) -> str:
    """Return ``text`` cut to ``width`` characters, marking a cut with an ellipsis."""
    text = text or "(no title)"
    return text if len(text) <= width else text[:width - 1] + "…"
