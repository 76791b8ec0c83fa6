"""Streamed post-copy: the remote pages of a lazy restore pulled continuously, faults first.

CRIU's lazy-pages daemon asks for one range at a time and only when no other request of the
task is pending, so alone it uses a fraction of a long link. :class:`StreamedPages` keeps
several small requests in flight over parallel channels (so the link stays busy while a
fault never queues behind more than a few small units), pulls the region after each fault
first (:class:`~fogmig.platform.migration.lazy.plan.StreamPlan`), and answers the daemon from
what has arrived. The daemon takes replies in request order, so its background requests are
answered so as never to wait for the link while a fault queues behind them: one channel keeps
ahead of their walk, and each leaves a reserve of arrived pages for the next. Log level
WARNING for a stream that stopped (faults still get through).
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
FetchRuns = Callable[[int, Sequence[tuple[int, int]]], Awaitable[list[bytes]]]
"""(pid, [(vaddr, nr_pages), ...]) -> per run, its pages (a prefix, maybe empty), in one call."""

UNIT_PAGES = 16
"""Pages per stream request (64 KiB): what a fault may queue behind per channel."""
DEFAULT_CHANNELS = 4
MIN_CHANNELS, MAX_CHANNELS = 2, 6
TIMELINE_S = 30
DEFAULT_FAULT_AROUND = 4
MAX_FAULT_AROUND = 32
FAULT_AROUND_SHARE = 0.25
"""The pages fetched with a fault may take this share of a round trip on the link."""
RESERVE_PAGES = 16
"""Arrived pages held back at the daemon's background walk: its next request can then always
be answered at once when a fault queues behind it (the daemon takes replies in order)."""
WALK_UNITS = 2
"""Units the walk's channel fetches per call: it must keep ahead of a walk that takes
whatever the other channels brought as well."""
FIRST_FAULTS = 16
MAX_HOLD_S = 0.25
"""The longest a background request is held back waiting for more pages."""


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
    first_faults: list[int] = field(default_factory=list)
    """Where the first :data:`FIRST_FAULTS` faults that blocked the process were: the pages
    a working set sent with the state should have held."""
    held: int = 0
    """Times a background request was held back to keep a reserve of arrived pages."""
    preempted: int = 0
    """Held requests answered early because another request (a fault) queued behind."""

    def note_fault(
        self, since_start_s: float, wait_s: float, *, on_demand: bool = True, vaddr: int = 0
    ) -> None:
        """A fault at ``vaddr`` that blocked the process ``wait_s``: fetched on demand, or
        (``on_demand`` false) waiting for a page the stream had in flight."""
        if len(self.first_faults) < FIRST_FAULTS:
            self.first_faults.append(vaddr)
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
            f"on demand ({self.fault_wait_s:.2f} s in all), {self.held} held back "
            f"({self.preempted} let go by a later request); faults that blocked the process, "
            f"count/wait per second from the start: {timeline or 'none'}"
            + (
                "; first at " + " ".join(f"{v:#x}" for v in self.first_faults)
                if self.first_faults
                else ""
            )
        )


class StreamedPages:
    """Remote pages streamed ahead over ``ahead`` channels, faults through ``demand``.

    A fault (the process is blocked on the page) is answered at once when its page has
    arrived; one that has not been fetched goes to the source on the demand channel, and the
    region after it is pulled next. The daemon's own background requests walk the addresses
    upwards, one at a time, and the daemon takes replies in request order: a fault asked for
    while a background request waits for the link waits as long. So the first channel
    fetches the pages that walk reaches next (:data:`WALK_UNITS` units a call), and a
    background request is answered with the arrived pages but the last :data:`RESERVE_PAGES`;
    with no more than those it is held until more arrive, or another request comes in after
    it (:meth:`note_request`; then it takes one page and goes). A request whose first page
    has not arrived waits for the stream, whose next unit is then that region. A page in
    flight is waited for, never fetched twice.
    """

    def __init__(
        self,
        demand: PageSource,
        ahead: Sequence[FetchRuns],
        wanted: Mapping[int, Collection[int]],
        *,
        unit_pages: int = UNIT_PAGES,
        boost_units: int = 4,
        fault_around: int = DEFAULT_FAULT_AROUND,
        accessed: Accessed | None = None,
        reserve: int = RESERVE_PAGES,
        walk_units: int = WALK_UNITS,
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
        self.reserve = reserve
        self._walk_pages = walk_units * unit_pages
        self._walk: tuple[int, int] | None = None
        """(task, address) where the daemon's background walk asks next."""
        self._asked = 0
        """Requests so far: one that came after a held request waits behind it."""
        self._asked_signal: asyncio.Future[None] | None = None
        """Resolved (and replaced) when a request comes in: held requests let go."""

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
        first = self.plan.first_page()
        if first is not None and self._walk is None:
            self._walk = first  # where the daemon's walk will begin
        for n, fetch in enumerate(self._ahead):
            self._workers.append(
                asyncio.create_task(self._work(fetch, walk=n == 0), name=f"stream-pages-{n}")
            )
        self._alive = len(self._workers)

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._alive = 0
        self._wake_all()

    # ------------------------------------------------------------------ the stream

    async def _work(self, fetch: FetchRuns, *, walk: bool = False) -> None:
        try:
            while True:
                follow = self._walk if walk and self.reserve else None
                batch = self.plan.next_batch(walk=follow, max_pages=self._walk_pages if walk else 0)
                if not batch:
                    if self.plan.pages_left == 0:
                        return
                    self._more.clear()
                    await self._more.wait()
                    continue
                try:
                    runs = await fetch(batch[0].pid, [(u.vaddr, u.nr_pages) for u in batch])
                    if len(runs) != len(batch):
                        raise PageServerError(
                            f"source answered {len(runs)} runs for {len(batch)} of task "
                            f"{batch[0].pid}"
                        )
                except BaseException:
                    self._give_up(batch)
                    raise
                for k, (unit, data) in enumerate(zip(batch, runs, strict=True)):
                    try:
                        self._take(unit, data)
                    except PageServerError:
                        self._give_up(batch[k + 1 :])
                        raise
        except (FogmigError, OSError) as exc:
            # Faults still reach the source on their own channel; only the head start is lost.
            self.error = exc
            log.warning("page stream stopped: %s", exc)
        finally:
            self._alive -= 1
            self._wake_all()

    def _take(self, unit: Unit, data: bytes) -> None:
        if len(data) % PAGE_SIZE or len(data) > unit.nr_pages * PAGE_SIZE:
            self._give_up([unit])
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

    def _give_up(self, units: Sequence[Unit]) -> None:
        """Nothing of ``units`` arrived: their pages are wanted again, their waiters look."""
        for unit in units:
            self.plan.failed(unit)
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
        self.note_request()
        order = self._asked
        if not fault:
            self._walk = key
            self._more.set()
        while True:
            state = self.plan.state(pid_id, vaddr)
            if state is PageState.ARRIVED and not fault:
                share = await self._background_share(pid_id, vaddr, nr_pages, asked, order)
                if share == 0:
                    continue  # a page changed meanwhile: look again
                self._walk = (pid_id, vaddr + share * PAGE_SIZE)
                self._more.set()
                nr_pages = share
            if state is PageState.ARRIVED:
                if waited:
                    self.counts.waited += 1
                    if fault:
                        # The process was blocked on a page the stream had in flight.
                        self.counts.note_fault(
                            asked - self._started,
                            time.monotonic() - asked,
                            on_demand=False,
                            vaddr=vaddr,
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

    async def _background_share(
        self, pid: int, vaddr: int, nr_pages: int, asked: float, order: int
    ) -> int:
        """How many of the arrived pages at ``vaddr`` a background request gets now; 0 after
        a wait (for a page, a later request or the hold's end), to look again.

        ``order`` is the request's place among all requests: any later one (a fault, the
        usual case) is answered only after this one, so the hold ends the moment it comes.
        """
        walk = self.plan.walk_ahead(pid, vaddr, nr_pages + self.reserve)
        share = min(nr_pages, walk.contiguous)
        if walk.ahead - share >= self.reserve:
            return share
        if walk.ahead > self.reserve:
            return min(share, walk.ahead - self.reserve)
        if self._asked > order:
            self.counts.preempted += 1
            return 1  # the later request goes right after this one; the rest stays in reserve
        coming = walk.next_state in (PageState.WANTED, PageState.IN_FLIGHT) and self._alive > 0
        held_for = time.monotonic() - asked
        if not coming or held_for >= MAX_HOLD_S:
            return share
        if self._asked_signal is None:
            self._asked_signal = asyncio.get_running_loop().create_future()
        later = self._asked_signal
        page = asyncio.ensure_future(self._until_changed((pid, walk.next_vaddr)))
        self.counts.held += 1
        try:
            await asyncio.wait(
                {page, later}, timeout=MAX_HOLD_S - held_for, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            page.cancel()
        return 0

    def note_request(self) -> None:
        """A request came in (answered here or not): held requests before it let go."""
        self._asked += 1
        signal, self._asked_signal = self._asked_signal, None
        if signal is not None and not signal.done():
            signal.set_result(None)

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
            self._give_up([unit])
            raise
        finally:
            self.counts.note_fault(started - self._started, time.monotonic() - started, vaddr=vaddr)
        self._store(unit, data)
        return self._serve_arrived(pid, vaddr, nr_pages)

    async def _fetch_demand(self, pid: int, vaddr: int, nr_pages: int) -> bytes:
        data = await self.demand.read(pid, vaddr, nr_pages)
        self.plan.served(pid, vaddr, len(data) // PAGE_SIZE)
        return data
