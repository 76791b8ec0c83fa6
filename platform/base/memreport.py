"""What a long-running daemon's memory is made of, on request (an operator's diagnostic).

A soak judges a daemon's resident size; when it creeps, the question is whether Python objects
pile up (a leak in the daemon's own bookkeeping) or the allocator keeps freed memory (glibc's
arenas, pymalloc's pools). :func:`memory_report` answers both in one look: the resident size,
glibc's ``mallinfo2`` (bytes in use, free but kept, mapped), the live objects per type from the
garbage collector, and, when :mod:`tracemalloc` runs (``FOGMIG_TRACEMALLOC=1`` in the daemon's
environment, costly), the source lines holding the most memory. :class:`MemoryWatch` keeps the
previous report so that each one also says what grew since.

Agents log a report on ``SIGUSR2`` (``kill -USR2 <agent pid>``; the PID is in the agents'
directory).
"""

from __future__ import annotations

import ctypes
import gc
import os
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fogmig.platform.base.heap import libc, resident_bytes

TRACE_ENV = "FOGMIG_TRACEMALLOC"
"""Set to 1 in a daemon's environment to trace allocations by source line (slows it down)."""


class _MallInfo2(ctypes.Structure):
    # struct mallinfo2 of glibc >= 2.33: ten size_t fields.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@cache
def _mallinfo2() -> Any:
    lib = libc()
    if lib is None:
        return None
    try:
        fn = lib.mallinfo2
    except AttributeError:
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


@dataclass(frozen=True, slots=True)
class Allocator:
    """glibc's view of its heap (``mallinfo2``), in bytes."""

    heap: int
    """Bytes the arenas took from the system (brk and arena mappings; ``arena``)."""
    in_use: int
    """Bytes handed out from the arenas (``uordblks``)."""
    free: int
    """Bytes free inside the arenas, kept by the allocator (``fordblks``)."""
    mapped: int
    """Bytes in chunks mapped on their own (large allocations; ``hblkhd``)."""


def allocator() -> Allocator | None:
    """glibc's figures, or None without glibc >= 2.33."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return Allocator(
        heap=int(info.arena),
        in_use=int(info.uordblks),
        free=int(info.fordblks),
        mapped=int(info.hblkhd),
    )


def objects_by_type() -> Counter[str]:
    """Live objects the garbage collector tracks, per type name (containers and instances:
    ints and strings are not tracked and do not count)."""
    return Counter(type(o).__qualname__ for o in gc.get_objects())


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """One look at the process's memory."""

    rss: int | None
    allocator: Allocator | None
    objects: Counter[str]
    traced: list[tuple[str, int, int]] = field(default_factory=list)
    """(source line, bytes, blocks) holding the most memory, when tracemalloc runs."""
    grown: list[tuple[str, int]] = field(default_factory=list)
    """(type name, objects more than at the previous report), largest growth first."""
    traced_grown: list[tuple[str, int]] = field(default_factory=list)
    """(source line, bytes more than at the previous report), when tracemalloc runs."""

    def lines(self, top: int = 12) -> list[str]:
        """The report as log lines."""
        mb = 1 / 1e6
        out = [f"resident {self.rss * mb:.1f} MB" if self.rss is not None else "resident ?"]
        if self.allocator is not None:
            a = self.allocator
            out.append(
                f"glibc heap {a.heap * mb:.1f} MB: {a.in_use * mb:.1f} MB in use, "
                f"{a.free * mb:.1f} MB free and kept; {a.mapped * mb:.1f} MB mapped apart"
            )
        total = sum(self.objects.values())
        common = ", ".join(f"{n} {c}" for n, c in self.objects.most_common(top))
        out.append(f"{total} tracked objects: {common}")
        if self.grown:
            out.append(
                "grown since the last report: "
                + ", ".join(f"{n} {c:+d}" for n, c in self.grown[:top])
            )
        for where, size, count in self.traced[:top]:
            out.append(f"traced {where}: {size / 1024:.1f} KiB in {count} blocks")
        for where, size in self.traced_grown[:top]:
            out.append(f"traced growth {where}: {size / 1024:+.1f} KiB")
        return out


class MemoryWatch:
    """Makes reports, each compared with the one before."""

    def __init__(self, *, trace: bool | None = None) -> None:
        if trace is None:
            trace = os.environ.get(TRACE_ENV, "") not in ("", "0")
        if trace and not tracemalloc.is_tracing():
            tracemalloc.start(1)
        self._objects: Counter[str] | None = None
        self._snapshot: tracemalloc.Snapshot | None = None

    def report(self, top: int = 12) -> MemoryReport:
        gc.collect()
        objects = objects_by_type()
        grown: list[tuple[str, int]] = []
        if self._objects is not None:
            delta = objects.copy()
            delta.subtract(self._objects)
            grown = [(n, c) for n, c in delta.most_common() if c > 0]
        self._objects = objects
        traced: list[tuple[str, int, int]] = []
        traced_grown: list[tuple[str, int]] = []
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            traced = [(str(s.traceback), s.size, s.count) for s in snap.statistics("lineno")[:top]]
            if self._snapshot is not None:
                diff = snap.compare_to(self._snapshot, "lineno")
                traced_grown = [(str(d.traceback), d.size_diff) for d in diff[:top]]
            self._snapshot = snap
        return MemoryReport(
            rss=resident_bytes(),
            allocator=allocator(),
            objects=objects,
            traced=traced,
            grown=grown,
            traced_grown=traced_grown,
        )
