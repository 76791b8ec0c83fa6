"""Streamed post-copy: the plan's order and bookkeeping, and the stream against fake channels."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from fogmig.platform.base.errors import TransferError
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.plan import (
    ACCESSED_FILE,
    PageState,
    StreamPlan,
    Unit,
    read_accessed,
    write_accessed,
)
from fogmig.platform.migration.lazy.sources import LayeredPages, PageTally, RemotePages
from fogmig.platform.migration.lazy.stream import (
    MAX_HOLD_S,
    StreamedPages,
    fault_pages,
    stream_channels,
)

BIG = 0x7F0000000000
SMALL = 0x10000000


def pages(start: int, n: int) -> list[int]:
    return [start + i * PAGE_SIZE for i in range(n)]


def drain(plan: StreamPlan) -> list[Unit]:
    units = []
    while (unit := plan.next_unit()) is not None:
        units.append(unit)
        plan.arrived(unit, unit.nr_pages)
    return units


# ---------------------------------------------------------------------- the plan


def test_small_regions_go_first_in_bounded_units() -> None:
    plan = StreamPlan({1: pages(BIG, 40) + pages(SMALL, 3)}, unit_pages=16)
    units = drain(plan)
    assert units[0] == Unit(1, SMALL, 3)
    assert [u.nr_pages for u in units[1:]] == [16, 16, 8]
    assert [u.vaddr for u in units[1:]] == [BIG, BIG + 16 * PAGE_SIZE, BIG + 32 * PAGE_SIZE]
    assert plan.pages_left == 0
    assert plan.next_unit() is None


def test_a_unit_never_spans_a_gap() -> None:
    plan = StreamPlan({1: pages(BIG, 4) + pages(BIG + 5 * PAGE_SIZE, 4)}, unit_pages=16)
    assert {(u.vaddr, u.nr_pages) for u in drain(plan)} == {
        (BIG, 4),
        (BIG + 5 * PAGE_SIZE, 4),
    }


def test_a_boost_pulls_the_region_after_a_fault_first() -> None:
    plan = StreamPlan({1: pages(BIG, 100) + pages(SMALL, 2)}, unit_pages=8, boost_units=2)
    plan.boost(1, BIG + 50 * PAGE_SIZE)
    first, second, third = plan.next_unit(), plan.next_unit(), plan.next_unit()
    assert first == Unit(1, BIG + 50 * PAGE_SIZE, 8)
    assert second == Unit(1, BIG + 58 * PAGE_SIZE, 8)
    assert third == Unit(1, SMALL, 2)  # the boost lasted two units; background order resumes


def test_pages_served_or_in_flight_are_never_fetched_again() -> None:
    plan = StreamPlan({1: pages(BIG, 32)}, unit_pages=8)
    plan.served(1, BIG + 2 * PAGE_SIZE, 1)  # a fault fetched it on its own
    assert plan.take(1, BIG + 20 * PAGE_SIZE)
    assert not plan.take(1, BIG + 20 * PAGE_SIZE)
    fetched = Counter(key for unit in drain(plan) for key in unit.pages())
    assert (1, BIG + 2 * PAGE_SIZE) not in fetched
    assert (1, BIG + 20 * PAGE_SIZE) not in fetched
    assert set(fetched.values()) == {1}
    assert len(fetched) == 30


def test_a_short_reply_gives_the_rest_back_and_a_failure_all_of_it() -> None:
    plan = StreamPlan({1: pages(BIG, 16)}, unit_pages=8)
    unit = plan.next_unit()
    assert unit == Unit(1, BIG, 8)
    plan.arrived(unit, 3)
    assert plan.state(1, BIG + 2 * PAGE_SIZE) is PageState.ARRIVED
    assert plan.state(1, BIG + 3 * PAGE_SIZE) is PageState.WANTED
    # The rest goes next, as a whole unit from where the reply stopped.
    assert plan.next_unit() == Unit(1, BIG + 3 * PAGE_SIZE, 8)
    failed = plan.next_unit()
    assert failed == Unit(1, BIG + 11 * PAGE_SIZE, 5)
    plan.failed(failed)
    assert plan.pages_left == 5
    assert plan.next_unit() == failed


def test_unknown_pages_and_tasks() -> None:
    plan = StreamPlan({1: pages(BIG, 2)})
    assert plan.state(2, BIG) is PageState.UNKNOWN
    assert plan.state(1, SMALL) is PageState.UNKNOWN
    plan.boost(2, BIG)  # no such task: nothing happens
    plan.served(2, BIG, 1)
    with pytest.raises(ValueError, match="at least 1"):
        StreamPlan({}, unit_pages=0)


# ---------------------------------------------------------------------- the stream


class Source:
    """The source node's memory behind fake channels that count what they fetched."""

    def __init__(self, vaddrs: list[int]) -> None:
        self.memory = {v: bytes([i % 251 + 1]) * PAGE_SIZE for i, v in enumerate(vaddrs)}
        self.fetched: Counter[int] = Counter()
        self.demand_calls: list[tuple[int, int]] = []
        self.calls: list[list[tuple[int, int]]] = []
        """The stream's calls, each a list of runs."""
        self.gate = asyncio.Event()
        self.gate.set()

    def read(self, vaddr: int, nr: int) -> bytes:
        out = []
        for i in range(nr):
            page = self.memory.get(vaddr + i * PAGE_SIZE)
            if page is None:
                break
            self.fetched[vaddr + i * PAGE_SIZE] += 1
            out.append(page)
        return b"".join(out)

    async def ahead(self, pid: int, runs: Sequence[tuple[int, int]]) -> list[bytes]:
        await self.gate.wait()
        await asyncio.sleep(0)
        self.calls.append(list(runs))
        return [self.read(vaddr, nr) for vaddr, nr in runs]

    async def demand(self, pid: int, vaddr: int, nr: int) -> bytes:
        self.demand_calls.append((vaddr, nr))
        return self.read(vaddr, nr)


async def test_a_fault_is_served_at_once_while_the_stream_is_stuck() -> None:
    wanted = pages(BIG, 64)
    src = Source(wanted)
    src.gate.clear()  # the stream's channels are slow: nothing arrives
    stream = StreamedPages(RemotePages(src.demand), [src.ahead] * 2, {1: wanted}, unit_pages=8)
    stream.start()
    fault = BIG + 40 * PAGE_SIZE
    assert await asyncio.wait_for(stream.read(1, fault, 1, fault=True), 1) == src.memory[fault]
    assert src.demand_calls == [(fault, 4)]  # the fault and the three pages after it
    src.gate.set()
    # Everything else arrives through the stream, each page once, and is served from it.
    got = b""
    addr = BIG
    while addr < BIG + 64 * PAGE_SIZE:
        if addr == fault:
            addr += PAGE_SIZE
            continue
        data = await asyncio.wait_for(stream.read(1, addr, 64), 1)
        assert data
        assert data == src.read(addr, len(data) // PAGE_SIZE)
        got += data
        addr += len(data)
        if addr == fault:
            continue
    assert src.demand_calls == [(fault, 4)]  # the fault and the three pages after it
    assert stream.tally.remote_pages == 64
    assert stream.counts.faults_on_demand == 1
    assert stream.counts.units >= 8
    assert "1 faults fetched on demand" in stream.counts.describe()
    await stream.close()


async def test_nothing_is_fetched_twice_and_every_page_reaches_the_daemon() -> None:
    wanted = pages(BIG, 200) + pages(SMALL, 5)
    src = Source(wanted)
    stream = StreamedPages(RemotePages(src.demand), [src.ahead] * 3, {7: wanted}, unit_pages=16)
    stream.start()
    served: dict[int, bytes] = {}
    queued: set[int] = set()
    """Pages a fault asked for: like CRIU's daemon, the background leaves them out."""

    async def daemon_background() -> None:
        for start in (SMALL, BIG):
            addr = start
            end = start + (5 if start == SMALL else 200) * PAGE_SIZE
            while addr < end:
                if addr in served or addr in queued:
                    addr += PAGE_SIZE
                    continue
                nr = 1
                while nr < 64 and addr + nr * PAGE_SIZE < end:
                    if addr + nr * PAGE_SIZE in queued | served.keys():
                        break
                    nr += 1
                data = await stream.read(7, addr, nr)
                for i in range(len(data) // PAGE_SIZE):
                    served[addr + i * PAGE_SIZE] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                addr += len(data)

    async def faults() -> None:
        for k in (150, 151, 30, 199):
            v = BIG + k * PAGE_SIZE
            if v not in served:
                queued.add(v)
                served[v] = await stream.read(7, v, 1, fault=True)

    await asyncio.wait_for(asyncio.gather(daemon_background(), faults()), 5)
    assert served == src.memory
    assert max(src.fetched.values()) == 1
    await stream.close()


async def test_when_the_stream_stops_requests_fall_back_to_demand() -> None:
    wanted = pages(BIG, 20)
    src = Source(wanted)

    async def broken(pid: int, runs: Sequence[tuple[int, int]]) -> list[bytes]:
        raise TransferError("link cut")

    stream = StreamedPages(RemotePages(src.demand), [broken], {1: wanted}, unit_pages=8)
    stream.start()
    data = await asyncio.wait_for(stream.read(1, BIG, 20), 1)
    assert data == src.read(BIG, 8)  # one unit on the demand path
    assert isinstance(stream.error, TransferError)
    await stream.close()


async def test_a_wrong_sized_answer_stops_the_stream_channel() -> None:
    wanted = pages(BIG, 4)
    src = Source(wanted)

    async def odd(pid: int, runs: Sequence[tuple[int, int]]) -> list[bytes]:
        return [b"x" * (PAGE_SIZE + 1)]

    stream = StreamedPages(RemotePages(src.demand), [odd], {1: wanted}, unit_pages=4)
    stream.start()
    assert await asyncio.wait_for(stream.read(1, BIG, 4), 1) == src.read(BIG, 4)
    assert stream.error is not None
    assert "bytes for 4 pages" in str(stream.error)
    await stream.close()


def test_stream_channels_cover_the_bandwidth_delay_product_and_no_more() -> None:
    unit = 16 * PAGE_SIZE
    # The paper's orchestration link (72 Mbit/s, 7 ms): 63 KB in flight fills it.
    assert stream_channels(72e6 / 8, 0.007) == 2
    # The mobility link (11.34 Mbit/s, 123 ms): 174 KB, three units and one more.
    assert stream_channels(11.34e6 / 8, 0.123) == 4
    assert stream_channels(unit * 10 / 0.1, 0.1) == 6  # bounded
    assert stream_channels(None, 0.1) == stream_channels(1e6, None) == 4


def test_the_most_touched_mappings_stream_first_then_small_before_large() -> None:
    hot_start = BIG + 100 * PAGE_SIZE
    wanted = pages(BIG, 300) + pages(SMALL, 3)
    # The service touched a quarter of the mapping [BIG+100p, BIG+200p) and nothing else.
    accessed = {1: [(hot_start, hot_start + 100 * PAGE_SIZE, 25 * PAGE_SIZE)]}
    plan = StreamPlan({1: wanted}, unit_pages=50, accessed=accessed)
    units = drain(plan)
    assert units[0] == Unit(1, hot_start, 50)
    assert units[1] == Unit(1, hot_start + 50 * PAGE_SIZE, 50)
    assert units[2] == Unit(1, SMALL, 3)  # untouched: small first
    # The runs around the hot mapping stay whole and come after it.
    assert {(u.vaddr, u.nr_pages) for u in units[3:]} == {
        (BIG, 50),
        (BIG + 50 * PAGE_SIZE, 50),
        (BIG + 200 * PAGE_SIZE, 50),
        (BIG + 250 * PAGE_SIZE, 50),
    }


def test_accessed_hints_round_trip_and_a_bad_file_is_ignored(tmp_path: Path) -> None:
    write_accessed(tmp_path, {1: [(0x1000, 0x3000, 4096)]})
    assert read_accessed(tmp_path) == {1: [(0x1000, 0x3000, 4096)]}
    (tmp_path / ACCESSED_FILE).write_text('{"1": [[1, 2]]}')
    assert read_accessed(tmp_path) == {}
    write_accessed(tmp_path / "none", {})  # nothing known: nothing written
    assert read_accessed(tmp_path / "none") == {}


async def test_preloaded_working_set_is_served_without_a_fetch() -> None:
    wanted = pages(BIG, 32)
    src = Source(wanted)
    src.gate.clear()  # nothing comes through the stream
    stream = StreamedPages(RemotePages(src.demand), [src.ahead] * 2, {1: wanted}, unit_pages=8)
    hot = {(1, BIG + 5 * PAGE_SIZE): src.memory[BIG + 5 * PAGE_SIZE]}
    # A page the restore does not want and a torn page are ignored.
    hot[(1, SMALL)] = bytes(PAGE_SIZE)
    hot[(1, BIG + 6 * PAGE_SIZE)] = b"short"
    assert stream.preload(hot) == 1
    stream.start()
    fault = BIG + 5 * PAGE_SIZE
    assert await asyncio.wait_for(stream.read(1, fault, 1, fault=True), 1) == src.memory[fault]
    assert src.demand_calls == []
    assert stream.counts.faults_on_demand == 0
    assert "1 pages came with the state" in stream.counts.describe()
    # The page is never fetched again, and the others still are.
    src.gate.set()
    other = BIG + 6 * PAGE_SIZE
    assert await asyncio.wait_for(stream.read(1, other, 1, fault=True), 1) == src.memory[other]
    await stream.close()
    assert src.fetched[fault] == 0


async def test_pages_given_back_are_served_again_without_a_fetch() -> None:
    wanted = pages(BIG, 8)
    src = Source(wanted)
    stream = StreamedPages(RemotePages(src.demand), [src.ahead], {1: wanted}, unit_pages=8)
    stream.start()
    data = await asyncio.wait_for(stream.read(1, BIG, 8), 1)
    assert len(data) == 8 * PAGE_SIZE
    # The daemon took only the first page of that reply.
    stream.give_back(1, BIG + PAGE_SIZE, data[PAGE_SIZE:])
    again = await asyncio.wait_for(stream.read(1, BIG + PAGE_SIZE, 7), 1)
    assert again == data[PAGE_SIZE:]
    assert src.demand_calls == []
    assert max(src.fetched.values()) == 1
    # A page that was never served is not taken back.
    stream.give_back(1, BIG + 99 * PAGE_SIZE, bytes(PAGE_SIZE))
    assert stream.plan.state(1, BIG + 99 * PAGE_SIZE) is PageState.UNKNOWN
    await stream.close()


def test_faults_bring_more_neighbours_the_longer_the_round_trip() -> None:
    assert fault_pages(None, None) == 4
    assert fault_pages(72.41e6 / 8, 0.00694) == 4  # orchestration link
    assert fault_pages(11.34e6 / 8, 0.12295) == 10  # mobility link
    assert fault_pages(1e9, 1.0) == 32
    assert fault_pages(1e3, 0.001) == 4


# ---------------------------------------------------------------------- the daemon's walk


def test_the_walk_frontier_is_the_first_wanted_page_after_it() -> None:
    plan = StreamPlan({1: pages(BIG, 64)}, unit_pages=8)
    assert plan.first_page() == (1, BIG)
    assert plan.frontier_unit(1, BIG) == Unit(1, BIG, 8)
    plan.served(1, BIG + 8 * PAGE_SIZE, 2)  # a fault took these
    assert plan.frontier_unit(1, BIG) == Unit(1, BIG + 10 * PAGE_SIZE, 8)
    # A short reply makes pages behind the frontier wanted again: they come first.
    unit = plan.frontier_unit(1, BIG + 40 * PAGE_SIZE)
    assert unit == Unit(1, BIG + 40 * PAGE_SIZE, 8)
    plan.arrived(Unit(1, BIG, 8), 4)
    assert plan.frontier_unit(1, BIG) == Unit(1, BIG + 4 * PAGE_SIZE, 4)
    assert plan.frontier_unit(2, BIG) is None
    assert StreamPlan({}).first_page() is None


def test_the_walk_ahead_counts_arrived_pages_across_gaps_and_served_pages() -> None:
    plan = StreamPlan({1: pages(BIG, 6) + pages(BIG + 7 * PAGE_SIZE, 4)}, unit_pages=16)
    first = plan.next_unit()
    assert first == Unit(1, BIG + 7 * PAGE_SIZE, 4)  # the shorter run goes first
    plan.arrived(first, 2)
    assert plan.next_unit() == Unit(1, BIG + 9 * PAGE_SIZE, 2)  # the rest, fetched again
    unit = plan.next_unit()
    assert unit == Unit(1, BIG, 6)
    plan.arrived(unit, 6)
    plan.served(1, BIG + 2 * PAGE_SIZE, 1)  # a fault took it
    walk = plan.walk_ahead(1, BIG, 20)
    # Two pages in one reply, then the walk goes on over the served page and the gap, and
    # stops at the pages still on their way.
    assert (walk.contiguous, walk.ahead) == (2, 7)
    assert (walk.next_state, walk.next_vaddr) == (PageState.IN_FLIGHT, BIG + 9 * PAGE_SIZE)
    assert plan.walk_ahead(1, BIG, 3).ahead == 3
    end = plan.walk_ahead(1, BIG + 3 * PAGE_SIZE, 20)
    assert (end.contiguous, end.ahead, end.next_state) == (3, 5, PageState.IN_FLIGHT)
    assert plan.walk_ahead(9, BIG, 10).next_state is PageState.UNKNOWN
    last = StreamPlan({1: pages(BIG, 2)})
    unit = last.next_unit()
    assert unit is not None
    last.arrived(unit, 2)
    assert last.walk_ahead(1, BIG, 10).next_state is PageState.UNKNOWN


class Metered(Source):
    """A source whose stream delivers one unit per :meth:`allow`."""

    def __init__(self, vaddrs: list[int]) -> None:
        super().__init__(vaddrs)
        self.allowed = asyncio.Semaphore(0)

    def expect(self, vaddr: int, nr: int) -> bytes:
        """What ``nr`` pages from ``vaddr`` hold (without counting a fetch)."""
        return b"".join(self.memory[vaddr + i * PAGE_SIZE] for i in range(nr))

    def allow(self, units: int = 1) -> None:
        for _ in range(units):
            self.allowed.release()

    async def ahead(self, pid: int, runs: Sequence[tuple[int, int]]) -> list[bytes]:
        await self.allowed.acquire()
        return [self.read(vaddr, nr) for vaddr, nr in runs]


def metered(nr_pages: int, **kw: int) -> tuple[Metered, StreamedPages]:
    """A started stream of ``nr_pages`` wanted pages over one metered channel."""
    wanted = pages(BIG, nr_pages)
    src = Metered(wanted)
    stream = StreamedPages(RemotePages(src.demand), [src.ahead], {1: wanted}, **kw)
    stream.start()
    return src, stream


async def test_a_background_request_keeps_a_reserve_that_a_fault_behind_it_can_pass() -> None:
    src, stream = metered(64, unit_pages=16, reserve=4, walk_units=1)
    src.allow()
    await asyncio.sleep(0.01)
    # The walk's channel brought the first unit: the request gets all but the reserve.
    data = await asyncio.wait_for(stream.read(1, BIG, 16), 1)
    assert data == src.expect(BIG, 12)
    # The next one finds only the reserve and is held back (more is on its way) ...
    held = asyncio.create_task(stream.read(1, BIG + 12 * PAGE_SIZE, 16))
    await asyncio.sleep(0.02)
    assert not held.done()
    # ... until a fault queues behind it: it takes one page and goes, the fault follows.
    fault = asyncio.create_task(stream.read(1, BIG + 40 * PAGE_SIZE, 1, fault=True))
    assert await asyncio.wait_for(held, 1) == src.memory[BIG + 12 * PAGE_SIZE]
    assert await asyncio.wait_for(fault, 1) == src.memory[BIG + 40 * PAGE_SIZE]
    assert stream.counts.preempted == 1
    assert stream.counts.held >= 1
    assert "held back (1 let go by a later request)" in stream.counts.describe()
    # With more arrived, the walk goes on from there, and nothing came twice.
    src.allow(8)
    rest = await asyncio.wait_for(stream.read(1, BIG + 13 * PAGE_SIZE, 3), 1)
    assert rest == src.expect(BIG + 13 * PAGE_SIZE, 3)
    assert max(src.fetched.values()) == 1
    await stream.close()


async def test_a_held_request_goes_when_nothing_more_will_come() -> None:
    src, stream = metered(6, unit_pages=16)
    src.allow()
    await asyncio.sleep(0.01)
    # Six pages arrived and none follows: a reserve would wait for nothing.
    assert await asyncio.wait_for(stream.read(1, BIG, 16), 0.1) == src.expect(BIG, 6)
    await stream.close()


async def test_a_held_request_goes_after_the_longest_hold() -> None:
    src, stream = metered(64, unit_pages=4, reserve=8, walk_units=1)
    src.allow()  # four pages arrive, then the stream stalls
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(stream.read(1, BIG, 64), 2) == src.expect(BIG, 4)
    assert loop.time() - started >= MAX_HOLD_S * 0.9
    await stream.close()


async def test_a_request_that_came_while_it_waited_for_its_page_ends_the_hold_at_once() -> None:
    src, stream = metered(64, unit_pages=4, reserve=8, walk_units=1)
    # The walk asks before anything arrived: it waits for the stream ...
    walk = asyncio.create_task(stream.read(1, BIG, 16))
    await asyncio.sleep(0.01)
    # ... a fault comes in behind it and is answered on its own channel ...
    fault = BIG + 50 * PAGE_SIZE
    assert await asyncio.wait_for(stream.read(1, fault, 1, fault=True), 1) == src.memory[fault]
    # ... and when four pages arrive (no more than the reserve), the walk takes one and goes:
    # the fault's reply is queued behind it.
    src.allow()
    assert await asyncio.wait_for(walk, MAX_HOLD_S / 2) == src.memory[BIG]
    assert stream.counts.preempted == 1
    await stream.close()


def test_a_batch_gathers_scattered_runs_into_one_call() -> None:
    holes = [BIG + 2 * i * PAGE_SIZE for i in range(40)]  # every other page
    plan = StreamPlan({1: holes, 2: pages(SMALL, 3)}, unit_pages=16)
    batch = plan.next_batch(max_runs=32)
    assert [u.nr_pages for u in batch] == [1] * 16
    assert [u.vaddr for u in batch] == holes[:16]
    assert len(plan.next_batch(max_runs=5)) == 5
    # Following the daemon's walk: from where it asks next, whatever the plan's order.
    walk = plan.next_batch(walk=(1, holes[30]), max_runs=4)
    assert [u.vaddr for u in walk] == holes[30:34]
    # One call reads one task: the other task's run waits for the next call.
    rest = plan.next_batch(max_runs=32)
    assert {u.pid for u in rest} == {1}
    assert plan.next_batch(max_runs=32) == [Unit(2, SMALL, 3)]
    assert plan.pages_left == 0


async def test_the_stream_fetches_scattered_pages_a_batch_per_call() -> None:
    holes = [BIG + 2 * i * PAGE_SIZE for i in range(48)]
    src = Source(holes)
    stream = StreamedPages(RemotePages(src.demand), [src.ahead], {1: holes}, unit_pages=16)
    stream.start()
    for vaddr in holes:
        assert await asyncio.wait_for(stream.read(1, vaddr, 1), 1) == src.memory[vaddr]
    # The one channel follows the daemon's walk: two units a call.
    assert [len(call) for call in src.calls] == [32, 16]
    assert max(src.fetched.values()) == 1
    await stream.close()


class Base:
    """A hybrid's base round: pages at hand, nothing ever held back."""

    def __init__(self, memory: dict[int, bytes]) -> None:
        self.memory = memory
        self.tally = PageTally()

    async def read(self, pid_id: int, vaddr: int, nr_pages: int, *, fault: bool = False) -> bytes:
        return b"".join(self.memory[vaddr + i * PAGE_SIZE] for i in range(nr_pages))

    def give_back(self, pid_id: int, vaddr: int, data: bytes) -> None:
        pass

    def note_request(self) -> None:
        pass


async def test_a_request_answered_from_the_base_lets_a_held_remote_one_go() -> None:
    src, stream = metered(64, unit_pages=16, reserve=8, walk_units=1)
    local_page = BIG + 100 * PAGE_SIZE
    base = Base({local_page: bytes([7]) * PAGE_SIZE})
    layered = LayeredPages(base, stream, {1: pages(BIG, 64)})
    src.allow()
    await asyncio.sleep(0.01)
    assert await asyncio.wait_for(layered.read(1, BIG, 16), 1) == src.expect(BIG, 8)
    held = asyncio.create_task(layered.read(1, BIG + 8 * PAGE_SIZE, 16))
    await asyncio.sleep(0.02)
    assert not held.done()
    # A fault on a page of the base: the stream never sees it, but its reply queues behind.
    assert await layered.read(1, local_page, 1, fault=True) == base.memory[local_page]
    assert await asyncio.wait_for(held, 0.1) == src.expect(BIG + 8 * PAGE_SIZE, 1)
    await stream.close()
