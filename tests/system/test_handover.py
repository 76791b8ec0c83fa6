"""The hand-over under faults, with real agents, runc, CRIU, the fence and emulated links.

Each test migrates its own sensor service from gw1 to gw2 while something goes wrong: the data
link is cut during the restore, an agent is killed (SIGKILL) or stopped (SIGTERM) mid-way and
restarted, the reply to the commit is lost, the destination is unreachable or refuses. Then:

- the service ran on at most one node at every sampled instant (``runc state`` on both nodes,
  every 50 ms) and runs on exactly one at the end;
- it holds exactly the readings a device posted before the migration (counter and running
  hash, through ``GET /state``) and takes new ones where it runs;
- exactly one ``MigrationDone`` was published for the migration, with the outcome the test
  expects;
- nothing is left behind: no fence, no migration directory, no stopped container, no bundle
  on the node that does not run the service.

The agents run with ``FOGMIG_TEST_SEAMS=1``, so a test can hold the destination at a point
(``restore``, ``restore_reply``, ``commit_reply``) by writing the seconds into
``<run dir>/nodes/gw2/pause/<point>``; other test modules' agents never see such a file.

The default run takes the cheapest technique for each fault. ``FOGMIG_CHAOS_FULL=1`` adds the
full matrix: every technique, with the source or the destination agent SIGKILLed right after
each journal entry of the migration (source: ``begin``, ``freezing``, ``restore_sent``,
``commit_sent``, ``handed_over``; destination: ``prepared``, ``restoring``, ``committed``)
and restarted; it adds about four minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from fogmig.platform.agent.handover import TEST_SEAMS, journal_path
from fogmig.platform.agent.launcher import agents_dir, agents_up
from fogmig.platform.agent.remote import request_migration
from fogmig.platform.base import paths
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.bus.client import CommandTimeoutError
from fogmig.platform.bus.schemas import MigrationDone
from fogmig.platform.bus.topics import topics
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.runtime.fence import Fence
from fogmig.platform.testbed import pids
from fogmig.platform.testbed.devices import device_buses
from fogmig.platform.testbed.links import cut_link, restore_link
from fogmig.platform.testbed.state import TestbedState
from fogmig.services.client import DeviceLedger, SensorClient
from fogmig.services.deploy import ServiceSpec, deploy, find_service, undeploy

pytestmark = [pytest.mark.system, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

# The agents this module's testbed starts inherit it (so do other modules' agents: harmless,
# the seams act only on a file a test writes).
os.environ[TEST_SEAMS] = "1"

FULL = os.environ.get("FOGMIG_CHAOS_FULL") == "1"
PORT = 5683
SRC, DST = "gw1", "gw2"
FENCE_S = 20.0  # the agents' default fence_timeout_s
PAUSES = paths.run_dir() / "nodes" / DST / "pause"


@pytest.fixture(scope="module")
def testbed(orchestration_testbed: TestbedState) -> TestbedState:
    return orchestration_testbed


# --- the service and its device -------------------------------------------------------------


@dataclass
class Service:
    name: str
    state: TestbedState
    ledger: DeviceLedger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = DeviceLedger(f"dev-{self.name}")

    def ip(self, node: str) -> str:
        return next(n.mgmt_ip for n in self.state.nodes if n.name == node)

    async def post(self, node: str, count: int) -> None:
        async with SensorClient(port=PORT, timeout=2.0) as client:
            for _ in range(count):
                result = await client.post_reading(self.ip(node), self.ledger.next_reading())
                assert self.ledger.record(result), result

    async def verify(self, node: str) -> None:
        """Exactly the readings posted so far, then a few more where it runs now."""
        async with SensorClient(port=PORT, timeout=3.0) as client:
            check = self.ledger.verify(await client.get_state(self.ip(node)), exclusive=True)
        assert check.matches, check
        await self.post(node, 3)


@contextlib.asynccontextmanager
async def service(testbed: TestbedState, name: str, state_mb: int) -> AsyncIterator[Service]:
    await deploy(ServiceSpec(name=name, state_mb=state_mb, dirty_kbps=50.0, port=PORT), node=SRC)
    svc = Service(name, testbed)
    mark_journals()
    try:
        await svc.post(SRC, 20)
        yield svc
    finally:
        # A pause the test set but a killed agent never reached must not hold the next one.
        shutil.rmtree(PAUSES, ignore_errors=True)
        with contextlib.suppress(Exception):
            await undeploy(name)


async def running_on(name: str) -> list[str]:
    return sorted(p.node for p in await find_service(name) if p.container.running)


async def until_runs(name: str, node: str, running: bool, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if (node in await running_on(name)) == running:
                return
            await asyncio.sleep(0.01)


class OneCopy:
    """Samples where the service runs, every 50 ms, and remembers any instant with two."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.both: list[float] = []
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            if len(await running_on(self.name)) > 1:
                self.both.append(time.monotonic())
            self.samples += 1
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> OneCopy:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert not self.both, f"{self.name} ran on two nodes at {len(self.both)} samples"
        assert self.samples > 0


class Ends:
    """Counts the MigrationDone events of a service on the source's event topic."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[MigrationDone] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._arrived = asyncio.Event()

    async def _run(self) -> None:
        # As a device of its own: the migration runs meanwhile as the operator, and the broker
        # keeps one connection per principal.
        async with (
            device_buses({"hoends": self.name}) as buses,
            buses["hoends"].subscribe(topics.events(SRC)) as events,
        ):
            self._ready.set()
            async for _, msg in events:
                if isinstance(msg, MigrationDone) and msg.service == self.name:
                    self.events.append(msg)
                    self._arrived.set()

    async def __aenter__(self) -> Ends:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(1.0)  # a repeated event would come now
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def first(self, timeout: float) -> MigrationDone:
        async with asyncio.timeout(timeout):
            while not self.events:
                await self._arrived.wait()
                self._arrived.clear()
        return self.events[0]

    def one(self) -> MigrationDone:
        assert len(self.events) == 1, [(e.migration_id, e.outcome) for e in self.events]
        return self.events[0]


# --- journals, agents, seams ----------------------------------------------------------------


def journal(node: str) -> list[dict[str, Any]]:
    try:
        text = journal_path(node).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Where each node's journal ended when the running test began: journals outlive testbeds, and
# an earlier run's migration of a service of the same name must not count.
MARKS: dict[str, int] = {}


def mark_journals() -> None:
    for node in (SRC, DST):
        MARKS[node] = len(journal(node))


def migration_of(name: str) -> str | None:
    """The id of the latest migration of ``name`` the source began in this test."""
    begun = [
        e
        for e in journal(SRC)[MARKS.get(SRC, 0) :]
        if e.get("kind") == "begin" and e.get("service") == name
    ]
    return begun[-1]["migration_id"] if begun else None


async def wait_entry(node: str, name: str, kind: str, timeout: float = 60.0) -> str:
    """Wait until ``node``'s journal holds entry ``kind`` of the migration of ``name``."""
    async with asyncio.timeout(timeout):
        while True:
            mid = migration_of(name)
            if mid is not None and any(
                e.get("kind") == kind and e.get("migration_id") == mid
                for e in journal(node)[MARKS.get(node, 0) :]
            ):
                return mid
            await asyncio.sleep(0.005)


def pause(point: str, seconds: float) -> None:
    PAUSES.mkdir(parents=True, exist_ok=True)
    (PAUSES / point).write_text(f"{seconds}")


def agent_pid(node: str) -> int:
    return int((agents_dir() / f"{node}.pid").read_text())


async def kill_agent(node: str, sig: signal.Signals) -> None:
    pid = agent_pid(node)
    os.kill(pid, sig)
    assert await pids.wait_gone(pid, 15.0), f"the agent of {node} did not exit"


async def migrate(name: str, technique: str, **kw: Any) -> MigrationRecord:
    return await request_migration(name, DST, Technique(technique), timeout=180.0, **kw)


async def settled(name: str, where: str, timeout: float = 60.0) -> None:
    """Wait until the service runs on ``where`` only and nothing of the migration is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await assert_clean(name, where)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def assert_clean(name: str, where: str) -> None:
    assert await running_on(name) == [where]
    placements = await find_service(name)
    assert [p.node for p in placements] == [where], "a stopped container was left"
    for node in (SRC, DST):
        assert Fence.records(node) == [], f"a fence is left on {node}"
        for sub in ("incoming", "outgoing"):
            left = [p.name for p in (paths.node_dir(node) / sub).glob(f"{name}-*")]
            assert left == [], f"{node}/{sub}: {left}"
        bundle = paths.node_dir(node) / "bundles" / name
        assert bundle.exists() == (node == where), f"bundle on {node}"


# --- the faults ------------------------------------------------------------------------------


async def test_link_cut_during_the_restore_rolls_back_to_one_copy(testbed: TestbedState) -> None:
    """The restore runs while the link is cut: the source waits for the fence, then resumes."""
    async with service(testbed, "hocut", 4) as svc, OneCopy(svc.name), Ends(svc.name) as ends:
        pause("restore", 1.0)
        task = asyncio.create_task(migrate(svc.name, "cold"))
        await wait_entry(DST, svc.name, "restoring")
        await cut_link(SRC, DST)
        try:
            record = await asyncio.wait_for(task, FENCE_S + 30)
        finally:
            await restore_link(SRC, DST)
        assert record.outcome is Outcome.ROLLED_BACK, record
        await settled(svc.name, SRC)
        await svc.verify(SRC)
    assert ends.one().outcome is Outcome.ROLLED_BACK
    print(f"rolled back after {record.wall_time_s:.1f} s: {record.error}")


async def test_source_killed_after_the_freeze_recovers_from_its_journal(
    testbed: TestbedState,
) -> None:
    async with service(testbed, "hokill", 24) as svc, OneCopy(svc.name), Ends(svc.name) as ends:
        task = asyncio.create_task(migrate(svc.name, "cold"))
        await wait_entry(SRC, svc.name, "freezing")
        await until_runs(svc.name, SRC, False)  # frozen: the dump is written or shipped
        await kill_agent(SRC, signal.SIGKILL)
        await asyncio.sleep(1.0)
        await agents_up()
        record = await asyncio.wait_for(task, 60)
        assert record.outcome is Outcome.ROLLED_BACK, record
        await settled(svc.name, SRC)
        await svc.verify(SRC)
    assert ends.one().outcome is Outcome.ROLLED_BACK


async def test_destination_killed_before_the_commit_is_fenced(testbed: TestbedState) -> None:
    """The copy runs at the destination when its agent dies; the restart tombstones it."""
    async with service(testbed, "hodst", 4) as svc, OneCopy(svc.name), Ends(svc.name) as ends:
        pause("restore_reply", 5.0)
        task = asyncio.create_task(migrate(svc.name, "cold"))
        await wait_entry(DST, svc.name, "restoring")
        await until_runs(svc.name, DST, True)
        await kill_agent(DST, signal.SIGKILL)
        assert await running_on(svc.name) == [DST]  # the copy outlives its agent ...
        await asyncio.sleep(2.0)
        await agents_up()  # ... until the restarted agent fences it
        record = await asyncio.wait_for(task, 60)
        assert record.outcome is Outcome.ROLLED_BACK, record
        await settled(svc.name, SRC)
        await svc.verify(SRC)
    assert ends.one().outcome is Outcome.ROLLED_BACK
    # Settled by the destination's answer after its restart, not by waiting out the fence.
    assert record.wall_time_s < FENCE_S, record.wall_time_s


async def test_source_stopped_mid_migration_ends_it_once(testbed: TestbedState) -> None:
    async with service(testbed, "hoterm", 24) as svc, OneCopy(svc.name), Ends(svc.name) as ends:
        task = asyncio.create_task(migrate(svc.name, "cold"))
        await wait_entry(SRC, svc.name, "freezing")
        await until_runs(svc.name, SRC, False)
        started = time.monotonic()
        await kill_agent(SRC, signal.SIGTERM)
        stopped_in = time.monotonic() - started
        record = await asyncio.wait_for(task, 30)
        await agents_up()
        assert record.outcome is Outcome.ROLLED_BACK, record
        await settled(svc.name, SRC)
        await svc.verify(SRC)
    assert ends.one().outcome is Outcome.ROLLED_BACK
    print(f"the source agent stopped in {stopped_in:.2f} s")


async def test_lost_commit_reply_completes_with_one_copy(testbed: TestbedState) -> None:
    """The destination committed; its answer is lost on the cut link; the source asks again."""
    async with service(testbed, "holost", 4) as svc, OneCopy(svc.name), Ends(svc.name) as ends:
        pause("commit_reply", 2.0)
        task = asyncio.create_task(migrate(svc.name, "cold"))
        await wait_entry(DST, svc.name, "committed")
        await cut_link(SRC, DST)
        await asyncio.sleep(12.0)  # the source's commit call times out, the reply is gone
        await restore_link(SRC, DST)
        record = await asyncio.wait_for(task, 60)
        assert record.outcome is Outcome.COMPLETED, record
        await settled(svc.name, DST)
        await svc.verify(DST)
    assert ends.one().outcome is Outcome.COMPLETED


async def test_unreachable_or_refusing_destination_ends_within_seconds(
    testbed: TestbedState,
) -> None:
    async with service(testbed, "hogone", 4) as svc, Ends(svc.name) as ends:
        # Refused: no agent listens at the destination.
        await kill_agent(DST, signal.SIGTERM)
        try:
            started = time.monotonic()
            record = await migrate(svc.name, "cold")
            refused_in = time.monotonic() - started
        finally:
            await agents_up()
        assert record.outcome is Outcome.ROLLED_BACK, record
        assert refused_in < 5.0
        # Unreachable: the data link is down.
        await cut_link(SRC, DST)
        try:
            started = time.monotonic()
            record = await migrate(svc.name, "cold")
            unreachable_in = time.monotonic() - started
        finally:
            await restore_link(SRC, DST)
        assert record.outcome is Outcome.ROLLED_BACK, record
        assert unreachable_in < 15.0
        await settled(svc.name, SRC)
        await svc.verify(SRC)
    assert [e.outcome for e in ends.events] == [Outcome.ROLLED_BACK] * 2
    print(f"refused: {refused_in:.2f} s, unreachable: {unreachable_in:.2f} s")


# --- the full matrix (FOGMIG_CHAOS_FULL=1) ---------------------------------------------------

POINTS = [
    (SRC, "begin"),
    (SRC, "freezing"),
    (SRC, "restore_sent"),
    (SRC, "commit_sent"),
    (SRC, "handed_over"),
    (DST, "prepared"),
    (DST, "restoring"),
    (DST, "committed"),
]


@pytest.mark.skipif(not FULL, reason="the full fault matrix runs with FOGMIG_CHAOS_FULL=1")
@pytest.mark.parametrize("technique", [t.value for t in Technique])
@pytest.mark.parametrize(("node", "kind"), POINTS)
async def test_an_agent_killed_at_any_point_loses_nothing(
    testbed: TestbedState, technique: str, node: str, kind: str
) -> None:
    name = f"hx{technique[:3]}{kind[:4].replace('_', '')}{node[-1]}"
    async with service(testbed, name, 8) as svc, OneCopy(name), Ends(name) as ends:
        task = asyncio.create_task(migrate(name, technique, max_rounds=2))
        await wait_entry(node, name, kind)
        await kill_agent(node, signal.SIGKILL)
        await asyncio.sleep(1.0)
        await agents_up()
        # Killed before it acknowledged the command, the source still ends the migration it
        # journaled: the event, not the command line's answer, is what counts.
        done = await ends.first(FENCE_S * 3)
        with contextlib.suppress(CommandTimeoutError):
            await task
        assert done.outcome in (Outcome.COMPLETED, Outcome.ROLLED_BACK), done
        where = DST if done.outcome is Outcome.COMPLETED else SRC
        await settled(name, where)
        await svc.verify(where)
    assert ends.one().outcome is done.outcome
    print(f"{technique}, {node} killed after {kind}: {done.outcome.value}")
