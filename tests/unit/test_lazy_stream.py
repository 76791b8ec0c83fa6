"""Streamed post-copy: the plan's order and bookkeeping, and the stream against fake channels."""

from __future__ import annotations

import asyncio
from collections import Counter
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
from fogmig.platform.migration.lazy.sources import RemotePages
from fogmig.platform.migration.lazy.stream import StreamedPages, fault_pages, stream_channels

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

    async def ahead(self, pid: int, vaddr: int, nr: int) -> bytes:
        await self.gate.wait()
        await asyncio.sleep(0)
        return self.read(vaddr, nr)

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

    async def broken(pid: int, vaddr: int, nr: int) -> bytes:
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

    async def odd(pid: int, vaddr: int, nr: int) -> bytes:
        return b"x" * (PAGE_SIZE + 1)

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
