"""Streamed post-copy: the remote pages of a lazy restore pulled continuously, faults first.

CRIU's lazy-pages daemon asks for one range at a time and only when no other request of the
task is pending, so alone it uses a fraction of a long link. :class:`StreamedPages` keeps
several small requests in flight over parallel channels (so the link stays busy while a
fault never queues behind more than a few small units), pulls the region after each fault
first (:class:`~fogmig.platform.migration.lazy.plan.StreamPlan`), and answers the daemon from
what has arrived. Log level WARNING for a stream that stopped (faults still get through).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import PageServerError
from fogmig.platform.migration.lazy.plan import Accessed, PageState, StreamPlan, Unit
from fogmig.platform.migration.lazy.sources import PageSource, PageTally

log = logging.getLogger(__name__)

Fetch = Callable[[int, int, int], Awaitable[bytes]]
"""(pid, vaddr, nr_pages) -> the pages (a prefix is allowed) or empty bytes."""

UNIT_PAGES = 16
"""Pages per stream request (64 KiB): what a fault may queue behind per channel."""
DEFAULT_CHANNELS = 4
MIN_CHANNELS, MAX_CHANNELS = 2, 6
TIMELINE_S = 30
DEFAULT_FAULT_AROUND = 4
MAX_FAULT_AROUND = 32
FAULT_AROUND_SHARE = 0.25
"""The pages fetched with a fault may take this share of a round trip on the link."""


def stream_channels(
    rate_bytes_per_s: float | None, rtt_s: float | None, *, unit_pages: int = UNIT_PAGES
) -> int:
    """How many stream channels (one unit in flight each) a link needs.

    Enough units in flight to cover the link's bandwidth-delay product plus one, so the link
    never idles; no more, because every byte in flight beyond it waits in the link's queue,
    ahead of the next fault's reply. Unknown link: :data:`DEFAULT_CHANNELS`.
    """
    if not rate_bytes_per_s or not rtt_s or rate_bytes_per_s <= 0 or rtt_s <= 0:
        return DEFAULT_CHANNELS
    bdp_units = rate_bytes_per_s * rtt_s / (unit_pages * PAGE_SIZE)
    return max(MIN_CHANNELS, min(MAX_CHANNELS, math.ceil(bdp_units) + 1))


def fault_pages(rate_bytes_per_s: float | None, rtt_s: float | None) -> int:
    """Pages to fetch with each fault: the faulting one and those after it.

    A restored interpreter faults on pages scattered over its heaps, a neighbour often next;
    every fault costs a round trip, each extra page only its bytes. So the longer the round
    trip against the link's rate, the more neighbours ride along: as many as a quarter of a
    round trip carries, 4 at least (4 on the orchestration link, about 10 on the mobility
    link), at most 32."""
    if not rate_bytes_per_s or not rtt_s or rate_bytes_per_s <= 0 or rtt_s <= 0:
        return DEFAULT_FAULT_AROUND
    pages = int(rate_bytes_per_s * rtt_s * FAULT_AROUND_SHARE / PAGE_SIZE)
    return max(DEFAULT_FAULT_AROUND, min(MAX_FAULT_AROUND, pages))


@dataclass(slots=True)
class StreamCounts:
    """How the daemon's requests were answered (logged at the end of a lazy restore)."""

    preloaded: int = 0
    """Pages that came with the execution state (the working set)."""
    units: int = 0
    """Units the stream fetched."""
    from_stream: int = 0
    """Requests answered with pages that had already arrived."""
    waited: int = 0
    """Requests that waited for the stream (in flight, or moved to its front)."""
    faults_on_demand: int = 0
    """Faults fetched on their own channel: the process waited a round trip."""
    fault_wait_s: float = 0.0
    """Their total time."""
    fault_seconds: list[float] = field(default_factory=lambda: [0.0] * TIMELINE_S)
    """Seconds the process waited on faults, per second since the stream started (first
    :data:`TIMELINE_S`): what the devices wait for right after the restore."""
    fault_counts: list[int] = field(default_factory=lambda: [0] * TIMELINE_S)

    def note_fault(self, since_start_s: float, wait_s: float, *, on_demand: bool = True) -> None:
        """A fault that blocked the process ``wait_s``: fetched on demand, or (``on_demand``
        false) waiting for a page the stream had in flight."""
        if on_demand:
            self.faults_on_demand += 1
            self.fault_wait_s += wait_s
        slot = int(since_start_s)
        if 0 <= slot < TIMELINE_S:
            self.fault_seconds[slot] += wait_s
            self.fault_counts[slot] += 1

    def describe(self) -> str:
        last = max((i for i, n in enumerate(self.fault_counts) if n), default=-1)
        timeline = ", ".join(
            f"{n}/{w:.2f}s"
            for n, w in zip(
                self.fault_counts[: last + 1], self.fault_seconds[: last + 1], strict=True
            )
        )
        return (
            f"{self.preloaded} pages came with the state, {self.units} units streamed; "
            f"requests: {self.from_stream} served at once, "
            f"{self.waited} waited for the stream, {self.faults_on_demand} faults fetched "
            f"on demand ({self.fault_wait_s:.2f} s in all); faults that blocked the process, "
            f"count/wait per second from the start: {timeline or 'none'}"
        )


class StreamedPages:
    """Remote pages streamed ahead over ``ahead`` channels, faults through ``demand``.

    A request whose first page has arrived is answered at once with the arrived prefix. A
    fault (the process is blocked on the page) that has not been fetched goes to the source
    on the demand channel, and the region after it is pulled next; any other request (the
    daemon's own background transfer) waits for the stream, whose next unit is then that
    region. A page in flight is waited for, never fetched twice.
    """

    def __init__(
        self,
        demand: PageSource,
        ahead: Sequence[Fetch],
        wanted: Mapping[int, Collection[int]],
        *,
        unit_pages: int = UNIT_PAGES,
        boost_units: int = 4,
        fault_around: int = DEFAULT_FAULT_AROUND,
        accessed: Accessed | None = None,
    ) -> None:
        self.demand = demand
        self.fault_around = fault_around
        """Pages fetched with a fault: the faulting one and those right after it."""
        self._ahead = list(ahead)
        self.plan = StreamPlan(
            wanted, unit_pages=unit_pages, boost_units=boost_units, accessed=accessed
        )
        self._cache: dict[tuple[int, int], bytes] = {}
        self._waiters: dict[tuple[int, int], asyncio.Future[None]] = {}
        self._more = asyncio.Event()
        """Set when the plan may have a unit again (a boost, pages given back)."""
        self._workers: list[asyncio.Task[None]] = []
        self._alive = 0
        self._tally = PageTally()
        self.error: BaseException | None = None
        """Why a stream channel stopped, if one did."""
        self.counts = StreamCounts()
        self._started = time.monotonic()

    @property
    def tally(self) -> PageTally:
        d = self.demand.tally
        t = self._tally
        return PageTally(
            local_pages=d.local_pages,
            local_bytes=d.local_bytes,
            remote_pages=d.remote_pages + t.remote_pages,
            remote_bytes=d.remote_bytes + t.remote_bytes,
            remote_requests=d.remote_requests + t.remote_requests,
        )

    def preload(self, pages: Mapping[tuple[int, int], bytes]) -> int:
        """Take pages that came with the execution state (the working set) as arrived, before
        the stream starts; how many of them the restore wants (others are ignored)."""
        taken = 0
        for (pid, vaddr), page in pages.items():
            if len(page) != PAGE_SIZE or not self.plan.take(pid, vaddr):
                continue
            self._cache[(pid, vaddr)] = page
            self.plan.arrived(Unit(pid, vaddr, 1), 1)
            taken += 1
        self.counts.preloaded += taken
        return taken

    def start(self) -> None:
        self._started = time.monotonic()
        for n, fetch in enumerate(self._ahead):
            self._workers.append(asyncio.create_task(self._work(fetch), name=f"stream-pages-{n}"))
        self._alive = len(self._workers)

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._alive = 0
        self._wake_all()

    # ------------------------------------------------------------------ the stream

    async def _work(self, fetch: Fetch) -> None:
        try:
            while True:
                unit = self.plan.next_unit()
                if unit is None:
                    if self.plan.pages_left == 0:
                        return
                    self._more.clear()
                    await self._more.wait()
                    continue
                try:
                    data = await fetch(unit.pid, unit.vaddr, unit.nr_pages)
                except BaseException:
                    self.plan.failed(unit)
                    self._arrive(unit)
                    raise
                self._take(unit, data)
        except (FogmigError, OSError) as exc:
            # Faults still reach the source on their own channel; only the head start is lost.
            self.error = exc
            log.warning("page stream stopped: %s", exc)
        finally:
            self._alive -= 1
            self._wake_all()

    def _take(self, unit: Unit, data: bytes) -> None:
        if len(data) % PAGE_SIZE or len(data) > unit.nr_pages * PAGE_SIZE:
            self.plan.failed(unit)
            self._arrive(unit)
            raise PageServerError(
                f"source answered {len(data)} bytes for {unit.nr_pages} pages at "
                f"{unit.vaddr:#x} of task {unit.pid}"
            )
        self.counts.units += 1
        if data:
            self._tally.add_remote(len(data))
        self._store(unit, data)

    def _store(self, unit: Unit, data: bytes) -> None:
        """Keep the pages of ``unit`` that arrived; the rest go back to the plan."""
        n = len(data) // PAGE_SIZE
        for i, key in enumerate(unit.pages()):
            if i < n and self.plan.state(*key) is PageState.IN_FLIGHT:
                self._cache[key] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        self.plan.arrived(unit, n)
        if n < unit.nr_pages:
            self._more.set()
        self._arrive(unit)

    def _arrive(self, unit: Unit) -> None:
        for key in unit.pages():
            waiter = self._waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _wake_all(self) -> None:
        self._more.set()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _until_changed(self, key: tuple[int, int]) -> None:
        waiter = self._waiters.get(key)
        if waiter is None or waiter.done():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[key] = waiter
        await asyncio.shield(waiter)

    # ------------------------------------------------------------------ the daemon's side

    async def read(self, pid_id: int, vaddr: int, nr_pages: int, *, fault: bool = False) -> bytes:
        key = (pid_id, vaddr)
        waited = False
        asked = time.monotonic()
        while True:
            state = self.plan.state(pid_id, vaddr)
            if state is PageState.ARRIVED:
                if waited:
                    self.counts.waited += 1
                    if fault:
                        # The process was blocked on a page the stream had in flight.
                        self.counts.note_fault(
                            asked - self._started, time.monotonic() - asked, on_demand=False
                        )
                else:
                    self.counts.from_stream += 1
                return self._serve_arrived(pid_id, vaddr, nr_pages)
            if state in (PageState.UNKNOWN, PageState.SERVED):
                return await self._fetch_demand(pid_id, vaddr, nr_pages)
            if state is PageState.WANTED:
                self.plan.boost(pid_id, vaddr)
                self._more.set()
                if fault or self._alive == 0:
                    # The process waits for this very page, or no stream is left.
                    return await self._fetch_fault(pid_id, vaddr, nr_pages)
            waited = True
            await self._until_changed(key)

    def give_back(self, pid_id: int, vaddr: int, data: bytes) -> None:
        """Served pages the daemon did not get: arrived again, answered from here."""
        for i in range(len(data) // PAGE_SIZE):
            addr = vaddr + i * PAGE_SIZE
            if self.plan.unserve(pid_id, addr):
                self._cache[(pid_id, addr)] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]

    def _serve_arrived(self, pid: int, vaddr: int, nr_pages: int) -> bytes:
        pieces: list[bytes] = []
        addr = vaddr
        while len(pieces) < nr_pages:
            page = self._cache.pop((pid, addr), None)
            if page is None:
                break
            pieces.append(page)
            addr += PAGE_SIZE
        self.plan.served(pid, vaddr, len(pieces))
        return b"".join(pieces)

    async def _fetch_fault(self, pid: int, vaddr: int, nr_pages: int) -> bytes:
        """The faulting page and the few after it (memory is touched in neighbourhoods) on the
        demand path; with no stream left, a whole unit."""
        want = self.fault_around if self._alive else self.plan.unit_pages
        taken = 0
        while taken < want and self.plan.take(pid, vaddr + taken * PAGE_SIZE):
            taken += 1
        unit = Unit(pid, vaddr, taken)
        self.plan.boost(pid, vaddr + taken * PAGE_SIZE)
        self._more.set()
        started = time.monotonic()
        try:
            data = await self.demand.read(pid, vaddr, taken)
        except BaseException:
            self.plan.failed(unit)
            self._arrive(unit)
            raise
        finally:
            self.counts.note_fault(started - self._started, time.monotonic() - started)
        self._store(unit, data)
        return self._serve_arrived(pid, vaddr, nr_pages)

    async def _fetch_demand(self, pid: int, vaddr: int, nr_pages: int) -> bytes:
        data = await self.demand.read(pid, vaddr, nr_pages)
        self.plan.served(pid, vaddr, len(data) // PAGE_SIZE)
        return data
