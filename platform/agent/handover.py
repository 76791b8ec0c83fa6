"""The agent's part in hand-overs: its journal, the terminal events, hooks, recovery, stopping.

One journal per node (``<node dir>/handover.jsonl``) holds both sides of every migration. Each
accepted migration ends with one ``MigrationDone`` (keyed by its migration id; a restart between
publishing and journaling it publishes it again). At start the agent continues every migration
its journal left unfinished; when it stops, it gives its outgoing migrations a few seconds to
end and leaves the rest to the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fogmig.platform.agent.hooks import HandoverHooks
from fogmig.platform.agent.status import StatusReporting
from fogmig.platform.base import paths
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.bus.schemas import MigrationDone, bounded_record
from fogmig.platform.bus.topics import topics
from fogmig.platform.migration.engine import SourceDriver
from fogmig.platform.migration.handover.events import TerminalEvent
from fogmig.platform.migration.handover.journal import Begin, Journal, SharedJournal
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.record import MigrationRecord, save_record
from fogmig.platform.migration.source import SourceNode, finish, recover_migrations

log = logging.getLogger(__name__)

HOOK_TIMEOUT_S = 5.0
"""A hook that takes longer is logged and left behind: it never holds a migration up."""
STOP_GRACE_S = 6.0
"""How long a stopping agent lets its outgoing migrations end before it leaves them to the
journal (below the 10 s an agent gets between SIGTERM and SIGKILL from ``agents down``)."""
DELIVERY_TIMEOUT_S = 20.0


def journal_path(node: str) -> Path:
    """The node's journal: both sides of every migration it took part in."""
    return paths.node_dir(node) / "handover.jsonl"


def handover_timing(fence_timeout_s: float) -> Timing:
    """The protocol's timers for an agent's ``fence_timeout_s`` (the same on every node)."""
    return Timing(
        fence_timeout_s=fence_timeout_s,
        call_timeout_s=min(10.0, fence_timeout_s / 2),
        lazy_poll_s=min(0.5, fence_timeout_s / 4),
    )


TEST_SEAMS = "FOGMIG_TEST_SEAMS"
"""Set to 1 to let a fault test hold the destination at a point (see :func:`test_pause`)."""


def test_pause(node: str) -> Callable[[str, str], Awaitable[None]] | None:
    """The destination's pause points as a test drives them, or None outside the tests.

    With ``FOGMIG_TEST_SEAMS=1`` in the agent's environment, a file
    ``<run dir>/nodes/<node>/pause/<point>`` holding seconds holds the next migration at that
    point (``restore``, ``restore_reply``, ``commit_reply``) for that long; the file is used
    up. The fault tests use it to cut a link or kill an agent at an exact point.
    """
    if os.environ.get(TEST_SEAMS) != "1":
        return None
    directory = paths.run_dir() / "nodes" / node / "pause"

    async def pause(point: str, migration_id: str) -> None:
        path = directory / point
        try:
            seconds = float(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return
        log.warning("test seam: %s of %s held for %g s", point, migration_id, seconds)
        await asyncio.sleep(seconds)

    return pause


class HookCalls:
    """Calls the hand-over hooks: in order per service, bounded in time, never failing."""

    def __init__(self, hooks: HandoverHooks) -> None:
        self.hooks = hooks
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _enqueue(
        self, service: str, name: str, call: Callable[[], Awaitable[None]]
    ) -> asyncio.Task[None]:
        """Run ``call`` after every hook of ``service`` called before it."""
        task = asyncio.create_task(
            self._after(self._tails.get(service), service, name, call), name=f"hook-{name}"
        )
        self._tails[service] = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _after(
        self,
        previous: asyncio.Task[None] | None,
        service: str,
        name: str,
        call: Callable[[], Awaitable[None]],
    ) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        try:
            async with asyncio.timeout(HOOK_TIMEOUT_S):
                await call()
        except TimeoutError:
            log.error("hook %s of %s took over %g s", name, service, HOOK_TIMEOUT_S)
        except Exception:  # a hook's failure never fails the migration
            log.exception("hook %s of %s failed", name, service)

    async def call(self, service: str, name: str, call: Callable[[], Awaitable[None]]) -> None:
        """Call it and wait for it (bounded); never raises."""
        await asyncio.shield(self._enqueue(service, name, call))

    def later(self, service: str, name: str, call: Callable[[], Awaitable[None]]) -> None:
        """Call it in the background."""
        self._enqueue(service, name, call)

    # The callables the migration drivers take.

    def freezing(self, service: str, destination: str, mid: str) -> Callable[[], Awaitable[None]]:
        return lambda: self.call(
            service, "freezing", lambda: self.hooks.freezing(service, destination, mid)
        )

    def resumed_here(self, service: str, mid: str) -> Callable[[], Awaitable[None]]:
        return lambda: self.call(
            service, "resumed_here", lambda: self.hooks.resumed_here(service, mid)
        )

    async def running_here(self, service: str, mid: str) -> None:
        self.later(service, "running_here", lambda: self.hooks.running_here(service, mid))

    async def gave_up(self, service: str, mid: str) -> None:
        self.later(service, "gave_up", lambda: self.hooks.gave_up(service, mid))


class HandoverWiring(StatusReporting):
    """The journal, the outgoing migrations' shared setup, terminal events and recovery."""

    journal: SharedJournal
    hook_calls: HookCalls
    timing: Timing
    source_node: SourceNode
    drivers: dict[str, SourceDriver]
    """The outgoing migrations under way, by service."""
    stopping: bool
    """The agent is stopping: it begins no migration any more."""

    def _setup_handover(self, hooks: HandoverHooks) -> None:
        self.journal = SharedJournal(journal=Journal(path=journal_path(self.node)))
        self.drivers = {}
        self.stopping = False
        self.hook_calls = HookCalls(hooks)
        self.timing = handover_timing(self.config.fence_timeout_s)
        node_dir = paths.node_dir(self.node)
        self.source_node = SourceNode(
            runtime=self.runtime,
            security=self.channel,
            peers=self.config.peers,
            transfer_port=self.config.transfer_port,
            workdir_root=node_dir / "outgoing",
            bundles=node_dir / "bundles",
            pages=self.pages,
            journal=self.journal,
            timing=self.timing,
            deliver=self._deliver,
        )

    def epoch_for(self, service: str) -> int:
        """The epoch this node owns ``service`` at: newer than any its journal knows, and
        never older than the wall clock in milliseconds, so that a service deployed anew (its
        history elsewhere unknown here) still proposes a newer epoch than an earlier owner."""
        return max(self.journal.epoch_of(service), int(time.time() * 1000))

    async def _owned_here(self, service: str, mid: str) -> None:
        """The destination owns the service at commit: announce it, then the hook."""
        try:
            await self._owned(service)
        except FogmigError as exc:
            log.warning("agent %s: presence of %s not published: %s", self.node, service, exc)
        hooks = self.hook_calls.hooks
        await self.hook_calls.call(service, "owned", lambda: hooks.owned(service, mid))

    async def _deliver(self, event: TerminalEvent, record: MigrationRecord) -> bool:
        """Announce where the service runs now, save the record, publish ``MigrationDone``."""
        begin = next(
            (
                e
                for e in self.journal.entries
                if isinstance(e, Begin) and e.migration_id == event.migration_id
            ),
            None,
        )
        command_id = begin.command_id if begin and begin.command_id else event.migration_id
        outcome = Outcome(event.outcome)
        log.info(
            "agent %s: migration %s of %s: %s %s",
            self.node,
            event.migration_id,
            event.service,
            outcome.value,
            event.reason,
        )
        if not (paths.records_dir() / f"{record.migration_id}.json").exists():
            with contextlib.suppress(OSError):
                save_record(record, paths.records_dir())
        done = MigrationDone(
            node=self.node,
            command_id=command_id,
            migration_id=event.migration_id,
            service=event.service,
            outcome=outcome,
            record=bounded_record(record),
            error=None if outcome is Outcome.COMPLETED else (event.reason or None),
        )
        bus = self.bus
        if bus is None:
            return False
        try:
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                if outcome is Outcome.ROLLED_BACK:
                    await self._owned(event.service)
                else:
                    gone = self.follow.tombstone(event.service)
                    await bus.publish(topics.service(self.node, event.service), gone, retain=True)
                    self._published.discard(event.service)
                await bus.publish(topics.events(self.node), done)
        except (FogmigError, TimeoutError) as exc:
            log.error(
                "agent %s: the end of migration %s is not published (the next start "
                "publishes it): %s",
                self.node,
                event.migration_id,
                exc,
            )
            return False
        return True

    async def _recover_outgoing(self) -> None:
        """Continue every outgoing migration the journal left unfinished."""
        drivers = await recover_migrations(
            self.source_node, self.journal.entries, resumed=self.hook_calls.resumed_here
        )
        for driver in drivers:
            self._start_driver(driver)

    def _start_driver(self, driver: SourceDriver) -> None:
        service = driver.core.plan.service
        self.drivers[service] = driver
        self.migrating[service] = asyncio.create_task(
            self._drive(driver), name=f"migrate-{service}"
        )

    async def _drive(self, driver: SourceDriver) -> None:
        service = driver.core.plan.service
        try:
            record = await finish(driver)
            log.info(
                "agent %s: migration %s of %s to %s: %s",
                self.node,
                record.migration_id,
                service,
                record.destination,
                record.outcome.value,
            )
        finally:
            self.migrating.pop(service, None)
            self.drivers.pop(service, None)

    async def _stop_migrations(self) -> None:
        """Let outgoing migrations end for a few seconds, then leave them to the journal."""
        self.stopping = True
        tasks = list(self.migrating.values())
        if not tasks:
            return
        for driver in list(self.drivers.values()):
            driver.stop()
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, FogmigError):
                await task
        if pending:
            log.warning(
                "agent %s: %d migration(s) left to the journal for the next start",
                self.node,
                len(pending),
            )
