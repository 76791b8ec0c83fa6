"""How durations and sizes read in logs, tables, reports and decision reasons.

One set of formatters for the controller's lines, the policies' reasons, the demo's view and
report and the command line, so the same number reads the same everywhere. Sizes are decimal
megabytes, as the paper (and rsync, iperf3) report them.
"""

from __future__ import annotations

MISSING = "-"
"""What a value that was not measured reads as."""


def duration(seconds: float | None, *, digits: int = 2, missing: str = MISSING) -> str:
    """Seconds from one second up (``1.25 s``), whole milliseconds below it (``420 ms``)."""
    if seconds is None:
        return missing
    return f"{seconds:.{digits}f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def seconds(value: float | None, *, digits: int = 3, missing: str = MISSING) -> str:
    """Always in seconds (``0.420 s``): for columns of figures that are compared."""
    return missing if value is None else f"{value:.{digits}f} s"


def millis(ms: float | None, *, digits: int = 1, missing: str = MISSING) -> str:
    """A value already in milliseconds (``4.2 ms``)."""
    return missing if ms is None else f"{ms:.{digits}f} ms"


def megabytes(nbytes: float | None, *, digits: int = 1, missing: str = MISSING) -> str:
    """Bytes as decimal megabytes (``8.8 MB``)."""
    return missing if nbytes is None else f"{nbytes / 1e6:.{digits}f} MB"


def byte_count(nbytes: int | None, *, missing: str = MISSING) -> str:
    """Exact bytes with thousands separators (``1,234,567 B``)."""
    return missing if nbytes is None else f"{nbytes:,} B"


def error(exc: BaseException, *, limit: int = 300) -> str:
    """An exception as one log line: its type and message, cut at ``limit`` characters.

    For a message a consumer rejects: the sender controls the text, which must neither flood
    the log nor span several lines.
    """
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
