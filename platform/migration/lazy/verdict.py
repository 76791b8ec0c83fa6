"""The verdict on a lazy restore, from the lazy-pages daemon's exit code and ``-v4`` log.

The destination's daemon is the only judge of a lazy transfer: every task must report all its
lazy pages transferred, or every page it lacks must be one it released itself.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fogmig.platform.migration.lazy.errors import LazyPagesFailed


def parse_lazy_pages_log(text: str) -> list[tuple[int, int]]:
    """Every ``UFFD transferred pages: (copied/total)`` of a lazy-pages log, one per task."""
    return [(t.copied, t.total) for t in parse_lazy_pages_events(text).tasks]


@dataclass(frozen=True, slots=True)
class TaskTransfer:
    """One task's summary line: ``copied`` of its ``total`` lazy pages went in through uffd."""

    pid: int
    copied: int
    total: int


@dataclass(frozen=True, slots=True)
class AddressEvent:
    """A change the restored task made to its own lazy memory, as the daemon logged it.

    ``remove`` (MADV_DONTNEED and the like) and ``unmap`` release ``[start, start+length)``;
    ``remap`` (mremap) moves that range to ``to``. Addresses are the task's at that moment.
    """

    pid: int
    kind: str
    start: int
    length: int
    to: int | None = None


@dataclass(frozen=True, slots=True)
class LazyPagesLog:
    tasks: list[TaskTransfer]
    events: list[AddressEvent]


_LOG_LINE_RE = re.compile(
    r"(?P<pid>\d+)-\d+: (?:"
    r"UFFD transferred pages: \((?P<copied>\d+)/(?P<total>\d+)\)"
    r"|(?P<kind>REMOVE|UNMAP): (?P<start>[0-9a-f]+)\((?P<len>[0-9a-f]+)\)"
    r"|REMAP: (?P<from>[0-9a-f]+) -> (?P<to>[0-9a-f]+) \((?P<rlen>\d+)\)"
    r")"
)


def parse_lazy_pages_events(text: str) -> LazyPagesLog:
    """The per-task summaries and, in log order, the address events of a ``-v4`` log."""
    tasks: list[TaskTransfer] = []
    events: list[AddressEvent] = []
    for m in _LOG_LINE_RE.finditer(text):
        pid = int(m["pid"])
        if m["copied"] is not None:
            tasks.append(TaskTransfer(pid, int(m["copied"]), int(m["total"])))
        elif m["kind"] is not None:
            # CRIU prints these two in hex without 0x: "%llx(%llx)".
            events.append(
                AddressEvent(pid, m["kind"].lower(), int(m["start"], 16), int(m["len"], 16))
            )
        else:
            events.append(
                AddressEvent(pid, "remap", int(m["from"], 16), int(m["rlen"]), int(m["to"], 16))
            )
    return LazyPagesLog(tasks, events)


def released_and_missing(
    lazy: Collection[int], served: Collection[int], events: list[AddressEvent]
) -> tuple[int, int]:
    """Judge one task's short transfer: (pages it released itself, pages that never arrived).

    ``lazy`` and ``served`` are image addresses (what the daemon asks the server for);
    ``events`` are that task's, in order, at run-time addresses, so remaps are followed.
    A page counts as released when a remove/unmap covered it; missing when it was neither
    served nor released: the restored memory has a hole.
    """
    image = np.fromiter(lazy, dtype=np.int64, count=len(lazy))
    runtime = image.copy()
    released = np.zeros(image.size, dtype=bool)
    for ev in events:
        inside = (runtime >= ev.start) & (runtime < ev.start + ev.length) & ~released
        if ev.kind == "remap":
            assert ev.to is not None
            runtime[inside] += ev.to - ev.start
        else:
            released |= inside
    served_mask = np.isin(image, np.fromiter(served, dtype=np.int64, count=len(served)))
    return int(released.sum()), int((~released & ~served_mask).sum())


@dataclass(frozen=True, slots=True)
class LazyPagesOutcome:
    """How the destination's lazy-pages daemon ended: the only judge of a lazy transfer.

    A task passes with ``copied == total``, or, when the server's record of served pages was
    given, if every lazy page it lacks was released by the task itself before it was needed
    (``missing`` 0): a service that frees memory during the lazy phase is healthy, and a strict
    N/N would condemn it.
    """

    returncode: int | None
    tasks: list[TaskTransfer]
    log_path: Path
    expected_tasks: int | None = None
    argv: list[str] = field(default_factory=list)
    released: dict[int, int] = field(default_factory=dict)
    missing: dict[int, int] | None = None

    @property
    def transfers(self) -> list[tuple[int, int]]:
        return [(t.copied, t.total) for t in self.tasks]

    @property
    def pages_transferred(self) -> int:
        return sum(t.copied for t in self.tasks)

    @property
    def pages_expected(self) -> int:
        return sum(t.total for t in self.tasks)

    def _task_ok(self, task: TaskTransfer) -> bool:
        if task.copied == task.total:
            return True
        if self.missing is None or self.missing.get(task.pid, 1) != 0:
            return False
        return task.copied + self.released.get(task.pid, 0) >= task.total

    @property
    def ok(self) -> bool:
        if self.returncode != 0 or not self.tasks:
            return False
        if self.expected_tasks is not None and len(self.tasks) < self.expected_tasks:
            return False
        return all(self._task_ok(t) for t in self.tasks)

    def describe(self) -> str:
        parts = []
        for t in self.tasks:
            part = f"{t.pid}: {t.copied}/{t.total}"
            if t.copied != t.total and t.pid in self.released:
                part += f" ({self.released[t.pid]} released by the task"
                if self.missing is not None:
                    part += f", {self.missing.get(t.pid, 0)} missing"
                part += ")"
            parts.append(part)
        done = ", ".join(parts) or "no task reported"
        return f"lazy-pages exited {self.returncode}, pages transferred per task: {done}"

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise LazyPagesFailed(
                f"lazy page transfer incomplete ({self.describe()})",
                cmd=self.argv,
                returncode=self.returncode,
                log_path=self.log_path,
                hint="the restored service lacks memory pages: stop it; the source's "
                "complete dump is still the safe copy",
            )
