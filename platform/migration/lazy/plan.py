"""Which remote pages to pull next: the sans-IO schedule of the streamed post-copy.

The destination streams the pages of a lazy restore from the source in small units over
several channels at once. :class:`StreamPlan` decides which unit goes next: the region just
after a page fault first (the process is likely to touch it next), then the background order:
the mappings the service touched most (the share of a mapping referenced while the migration
began) first, and among equals small regions before large ones (stacks, heaps and interpreter
structures before bulk buffers). It tracks every page's state so that no page is fetched twice.
"""

from __future__ import annotations

import bisect
import json
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from fogmig.platform.base.vocabulary import PAGE_SIZE

ACCESSED_FILE = "fogmig-accessed.json"
"""In a lazy layout: per task, ``[start, end, referenced bytes]`` of the mappings the service
touched while the migration began (see ``runtime/access.py``)."""

Accessed = Mapping[int, Sequence[tuple[int, int, int]]]


def write_accessed(lazy_dir: Path, accessed: Accessed) -> None:
    if accessed:
        data = {str(pid): [list(r) for r in regions] for pid, regions in accessed.items()}
        (lazy_dir / ACCESSED_FILE).write_text(json.dumps(data))


def read_accessed(lazy_dir: Path) -> dict[int, list[tuple[int, int, int]]]:
    """What :func:`write_accessed` wrote; empty if absent or not in that shape (the order then
    falls back to region size: it is a hint, never a condition)."""
    try:
        raw = json.loads((lazy_dir / ACCESSED_FILE).read_text())
        return {
            int(pid): [(int(a), int(b), int(r)) for a, b, r in regions]
            for pid, regions in raw.items()
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


class PageState(IntEnum):
    """Where one wanted page stands."""

    UNKNOWN = 0
    """Not in the plan: the source was never asked to stream it."""
    WANTED = 1
    IN_FLIGHT = 2
    ARRIVED = 3
    """Here, waiting for the daemon to ask for it."""
    SERVED = 4
    """Handed to the daemon: never fetched again."""


@dataclass(frozen=True, slots=True)
class WalkAhead:
    """What the daemon's background walk (ascending addresses) finds from one address on."""

    contiguous: int
    """ARRIVED pages contiguous in memory there: what one reply can carry."""
    ahead: int
    """ARRIVED pages in address order, across gaps and served pages: what its next requests
    get at once."""
    next_state: PageState
    """The state of the page that ends ``ahead`` (UNKNOWN at the task's end)."""
    next_vaddr: int


@dataclass(frozen=True, slots=True)
class Unit:
    """``nr_pages`` contiguous pages from ``vaddr`` of task ``pid``, fetched in one call."""

    pid: int
    vaddr: int
    nr_pages: int

    def pages(self) -> Iterator[tuple[int, int]]:
        for i in range(self.nr_pages):
            yield self.pid, self.vaddr + i * PAGE_SIZE


class _Task:
    """The wanted pages of one task: sorted addresses and a state per page."""

    def __init__(self, vaddrs: Collection[int]) -> None:
        self.vaddrs = sorted(set(vaddrs))
        self.state = bytearray([PageState.WANTED]) * len(self.vaddrs)
        self.cursor = 0
        """No page is WANTED between the walk's last position and here (so finding the next
        one is linear over the whole restore, not per unit)."""

    def index(self, vaddr: int) -> int | None:
        i = bisect.bisect_left(self.vaddrs, vaddr)
        return i if i < len(self.vaddrs) and self.vaddrs[i] == vaddr else None

    def contiguous(self, i: int) -> bool:
        """Whether page ``i`` directly follows page ``i - 1`` in memory."""
        return i > 0 and self.vaddrs[i] == self.vaddrs[i - 1] + PAGE_SIZE


class _RegionIndex:
    """Which accessed mapping holds an address, and how much of it was touched."""

    def __init__(self, regions: Sequence[tuple[int, int, int]]) -> None:
        self._regions = sorted(r for r in regions if r[1] > r[0])
        self._starts = [r[0] for r in self._regions]

    def __call__(self, vaddr: int) -> tuple[int, float]:
        """(index of the mapping or -1, share of it referenced)."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i >= 0 and vaddr < self._regions[i][1]:
            start, end, referenced = self._regions[i]
            return i, referenced / (end - start)
        return -1, 0.0


class StreamPlan:
    """The order in which the remote pages of a lazy restore are pulled; no I/O.

    ``wanted`` lists, per task, the pages the source holds for this restore. Callers take
    units with :meth:`next_unit`, report them with :meth:`arrived` or :meth:`failed`, mark
    what the daemon received with :meth:`served`, and steer the order with :meth:`boost`.
    """

    def __init__(
        self,
        wanted: Mapping[int, Collection[int]],
        *,
        unit_pages: int = 16,
        boost_units: int = 4,
        accessed: Accessed | None = None,
    ) -> None:
        if unit_pages < 1 or boost_units < 1:
            raise ValueError("unit_pages and boost_units must be at least 1")
        self.unit_pages = unit_pages
        self.boost_units = boost_units
        self._tasks = {pid: _Task(v) for pid, v in wanted.items() if v}
        self._left = sum(len(t.vaddrs) for t in self._tasks.values())
        """Pages still WANTED."""
        self._boosts: deque[tuple[int, int, int]] = deque()
        """(pid, index, units left) regions to pull before the background order."""
        self._background = self._runs_in_order(accessed or {})
        self._cursor = 0
        self._retry: deque[tuple[int, int]] = deque()
        """(pid, index) of pages given back after a failed or short fetch."""

    def _runs_in_order(self, accessed: Accessed) -> list[tuple[int, int, int]]:
        """(pid, first index, end index) of every contiguous run within one mapping, the most
        touched mappings first, then the shortest runs.

        What a process touched just before it froze it touches again as soon as it runs;
        without that hint, small regions (stacks, heaps, interpreter structures) go before
        large ones, typically a bulk buffer touched at its own pace.
        """
        runs: list[tuple[float, int, int, int]] = []
        for pid, task in self._tasks.items():
            region_of = _RegionIndex(accessed.get(pid, ()))
            first = 0
            where = region_of(task.vaddrs[0]) if task.vaddrs else (-1, 0.0)
            for i in range(1, len(task.vaddrs) + 1):
                here = region_of(task.vaddrs[i]) if i < len(task.vaddrs) else (-2, 0.0)
                if i == len(task.vaddrs) or not task.contiguous(i) or here[0] != where[0]:
                    runs.append((where[1], pid, first, i))
                    first, where = i, here
        runs.sort(key=lambda r: (-r[0], r[3] - r[2], r[1], r[2]))
        return [(pid, first, end) for _, pid, first, end in runs]

    # ------------------------------------------------------------------ queries

    @property
    def pages_left(self) -> int:
        """Pages nobody has fetched or asked for yet."""
        return self._left

    def first_page(self) -> tuple[int, int] | None:
        """(task, address) of the lowest wanted page of the first task, if any."""
        for pid, task in self._tasks.items():
            if task.vaddrs:
                return pid, task.vaddrs[0]
        return None

    def state(self, pid: int, vaddr: int) -> PageState:
        task = self._tasks.get(pid)
        i = task.index(vaddr) if task is not None else None
        if task is None or i is None:
            return PageState.UNKNOWN
        return PageState(task.state[i])

    def walk_ahead(self, pid: int, vaddr: int, limit: int) -> WalkAhead:
        """What the daemon's background walk finds from ``vaddr`` on (at most ``limit``
        arrived pages looked at)."""
        task = self._tasks.get(pid)
        start = task.index(vaddr) if task is not None else None
        if task is None or start is None:
            return WalkAhead(0, 0, PageState.UNKNOWN, vaddr)
        contiguous, ahead, run = 0, 0, True
        i = start
        while i < len(task.vaddrs) and ahead < limit:
            state = task.state[i]
            if state == PageState.SERVED:
                run = False
            elif state == PageState.ARRIVED:
                run = run and (i == start or task.contiguous(i))
                contiguous += run
                ahead += 1
            else:
                return WalkAhead(contiguous, ahead, PageState(state), task.vaddrs[i])
            i += 1
        if i >= len(task.vaddrs):
            return WalkAhead(contiguous, ahead, PageState.UNKNOWN, vaddr)
        return WalkAhead(contiguous, ahead, PageState(task.state[i]), task.vaddrs[i])

    # ------------------------------------------------------------------ steering

    def frontier_unit(self, pid: int, vaddr: int) -> Unit | None:
        """A unit at the first WANTED page from ``vaddr`` on (marked in flight): the pages
        that the daemon's background walk, which asks for ascending addresses, reaches next.
        Arrived pages do not count as ahead: the walk takes them at once."""
        task = self._tasks.get(pid)
        if task is None:
            return None
        i = max(bisect.bisect_left(task.vaddrs, vaddr), task.cursor)
        while i < len(task.vaddrs) and task.state[i] != PageState.WANTED:
            i += 1
        task.cursor = i
        if i >= len(task.vaddrs):
            return None
        return self._unit_from(pid, i, scan=0)[0]

    def boost(self, pid: int, vaddr: int) -> None:
        """Pull the region from ``vaddr`` on next (a fault there, or the daemon waits for it)."""
        task = self._tasks.get(pid)
        if task is None:
            return
        i = bisect.bisect_left(task.vaddrs, vaddr)
        if i < len(task.vaddrs):
            self._boosts.appendleft((pid, i, self.boost_units))

    def take(self, pid: int, vaddr: int) -> bool:
        """Mark one WANTED page in flight outside the plan's units (a fault fetched on its
        own); False if it is not WANTED."""
        task = self._tasks.get(pid)
        i = task.index(vaddr) if task is not None else None
        if task is None or i is None or task.state[i] != PageState.WANTED:
            return False
        task.state[i] = PageState.IN_FLIGHT
        self._left -= 1
        return True

    def next_unit(self) -> Unit | None:
        """The next unit to fetch (marked in flight), or None when no page is WANTED."""
        if self._left == 0:
            return None
        while self._boosts:
            pid, i, units = self._boosts[0]
            # Look no further than the boosted region: beyond it is the background's turn.
            unit, end = self._unit_from(pid, i, scan=units * self.unit_pages)
            if unit is None or units <= 1:
                self._boosts.popleft()
            else:
                self._boosts[0] = (pid, end, units - 1)
            if unit is not None:
                return unit
        while self._retry:
            pid, i = self._retry.popleft()
            unit, _ = self._unit_from(pid, i, scan=0)
            if unit is not None:
                return unit
        while self._cursor < len(self._background):
            pid, start, end = self._background[self._cursor]
            unit, after = self._unit_from(pid, start, scan=end - start, limit=end)
            if unit is not None:
                # The rest of this run stays first in line.
                self._background[self._cursor] = (pid, after, end)
                return unit
            self._cursor += 1
        return None

    def next_batch(
        self, *, walk: tuple[int, int] | None = None, max_runs: int = 32, max_pages: int = 0
    ) -> list[Unit]:
        """Units of one task to fetch in one call (marked in flight): up to ``max_pages`` (a
        unit's worth by default) in at most ``max_runs`` runs, so that scattered small runs
        (heaps with holes) cost one round trip, not one each. With ``walk``, the pages the
        daemon's background walk reaches next come first (:meth:`frontier_unit`), then the
        plan's order."""
        batch: list[Unit] = []
        pages = 0
        while len(batch) < max_runs and pages < (max_pages or self.unit_pages):
            unit = self.frontier_unit(*walk) if walk is not None else None
            unit = unit or self.next_unit()
            if unit is None:
                break
            if batch and unit.pid != batch[0].pid:
                self.failed(unit)  # another task's: first in line for the next call
                break
            batch.append(unit)
            pages += unit.nr_pages
        return batch

    def _unit_from(
        self, pid: int, i: int, *, scan: int, limit: int | None = None
    ) -> tuple[Unit | None, int]:
        """Take up to a unit of contiguous WANTED pages at index ``i`` or at most ``scan``
        pages after it; the unit and the index after it."""
        task = self._tasks[pid]
        end = len(task.vaddrs) if limit is None else limit
        stop = min(end, i + scan)
        while i < stop and task.state[i] != PageState.WANTED:
            i += 1
        if i >= end or task.state[i] != PageState.WANTED:
            return None, i
        first = i
        while (
            i < end
            and i - first < self.unit_pages
            and task.state[i] == PageState.WANTED
            and (i == first or task.contiguous(i))
        ):
            task.state[i] = PageState.IN_FLIGHT
            i += 1
        self._left -= i - first
        return Unit(pid, task.vaddrs[first], i - first), i

    # ------------------------------------------------------------------ outcomes

    def arrived(self, unit: Unit, nr_pages: int) -> None:
        """The first ``nr_pages`` of ``unit`` arrived; the rest (a short reply) go back."""
        task = self._tasks[unit.pid]
        first = task.index(unit.vaddr)
        assert first is not None
        for k in range(unit.nr_pages):
            i = first + k
            if task.state[i] != PageState.IN_FLIGHT:
                continue  # served meanwhile (fetched on its own): keep that state
            if k < nr_pages:
                task.state[i] = PageState.ARRIVED
            else:
                task.state[i] = PageState.WANTED
                task.cursor = min(task.cursor, i)
                self._left += 1
                if k == nr_pages:
                    self._retry.append((unit.pid, i))

    def failed(self, unit: Unit) -> None:
        """Nothing of ``unit`` arrived: its pages are WANTED again."""
        self.arrived(unit, 0)

    def unserve(self, pid: int, vaddr: int) -> bool:
        """A page the daemon was sent but did not take is ARRIVED again; False if it was
        not SERVED."""
        task = self._tasks.get(pid)
        i = task.index(vaddr) if task is not None else None
        if task is None or i is None or task.state[i] != PageState.SERVED:
            return False
        task.state[i] = PageState.ARRIVED
        return True

    def served(self, pid: int, vaddr: int, nr_pages: int) -> None:
        """The daemon received these pages: never fetch them again."""
        task = self._tasks.get(pid)
        if task is None:
            return
        for k in range(nr_pages):
            i = task.index(vaddr + k * PAGE_SIZE)
            if i is None:
                continue
            if task.state[i] == PageState.WANTED:
                self._left -= 1
            task.state[i] = PageState.SERVED
