"""The shell around the destination's sans-IO core: events in, the core's actions carried out.

:class:`DestinationShell` holds what the node's destination shares (the core, the arrivals,
the fences, the tasks under way) and runs the
:class:`~fogmig.platform.migration.handover.destination_core.DestinationCore`: one lock feeds
it one event at a time, and each action it returns is carried out here in order: a journal
entry is appended (and noted: a restore begun, a copy owned, a migration tombstoned), a reply
goes to the call waiting for it with the runtime's numbers the core does not know, a timer
starts or stops. What acts on the runtime (a step, the fence) is the next layer's,
:mod:`~fogmig.platform.migration.destination_steps`; the calls and the agent's start and stop
are :class:`~fogmig.platform.migration.destination.Destination`'s on top.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fogmig.platform.migration.arrival import Arrival, FetchFactory
from fogmig.platform.migration.handover.destination_core import DestinationCore
from fogmig.platform.migration.handover.events import (
    Action,
    ArmFence,
    CancelTimer,
    Event,
    RunStep,
    SendReply,
    StartTimer,
    TimerFired,
    WriteJournal,
)
from fogmig.platform.migration.handover.journal import (
    Committed,
    Restoring,
    SharedJournal,
    Tombstoned,
)
from fogmig.platform.migration.handover.messages import (
    CommitOk,
    LazyStatusOk,
    Refused,
    Reply,
    RestoreOk,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.runtime.fence import FenceHandle

log = logging.getLogger(__name__)

Notify = Callable[[str, str], Awaitable[None]]
"""(service, migration id): told when a copy here runs, is given up, or is owned."""


async def _nothing(service: str, migration_id: str) -> None:
    return None


class DestinationShell(abc.ABC):
    """The destination's state and the running of its core's actions; a step on the runtime
    and the fence are the subclass's (:meth:`_step`, :meth:`_arm`)."""

    def __init__(
        self,
        *,
        node: str,
        runtime: NodeRuntime,
        rootfs: Callable[[], Path],
        bundles: Path,
        incoming: Path,
        fetch_factory: FetchFactory,
        journal: SharedJournal,
        timing: Timing,
        running_here: Notify = _nothing,
        gave_up: Notify = _nothing,
        owned: Notify = _nothing,
        pause: Notify | None = None,
    ) -> None:
        self.node = node
        self.runtime = runtime
        self._rootfs = rootfs
        self._bundles = bundles
        self.incoming_dir = incoming
        self._fetch_factory = fetch_factory
        self.journal = journal
        self.timing = timing
        self._running_here = running_here
        self._gave_up = gave_up
        self._owned = owned
        self._pause = pause or _nothing
        """(point, migration id): a test's chance to hold the destination at a point."""
        self.core: DestinationCore | None = None
        self.arrivals: dict[str, Arrival] = {}
        self.fences: dict[str, FenceHandle] = {}
        self._lock = asyncio.Lock()
        self._replies: dict[int, asyncio.Future[Reply | Refused]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._restored: set[str] = set()
        """Migrations that journaled ``Restoring``: a copy of theirs may exist."""

    # ------------------------------------------------------------------ actions

    async def _feed(self, event: Event) -> None:
        async with self._lock:
            if self.core is None:
                return
            actions = self.core.handle(event, time.monotonic())
            await self._execute(actions)

    async def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, WriteJournal):
                await self.journal.append(action.entry)
                self._journaled(action.entry)
            elif isinstance(action, SendReply):
                if isinstance(action.reply, CommitOk):
                    await self._pause("commit_reply", action.reply.migration_id)
                fut = self._replies.get(action.call_id)
                if fut is not None and not fut.done():
                    fut.set_result(self._enrich(action.reply))
            elif isinstance(action, StartTimer):
                self._start_timer(action.name, action.delay_s)
            elif isinstance(action, CancelTimer):
                timer = self._timers.pop(action.name, None)
                if timer is not None:
                    timer.cancel()
            elif isinstance(action, RunStep):
                self._spawn(self._step(action), f"step-{action.kind}")
            elif isinstance(action, ArmFence):
                await self._arm(action)
            else:
                raise AssertionError(f"a destination core asked for {action!r}")

    def _journaled(self, entry: object) -> None:
        if isinstance(entry, Restoring):
            self._restored.add(entry.migration_id)
        elif isinstance(entry, Committed):
            log.info("migration %s: %s owns %s", entry.migration_id, self.node, entry.service)
            self._spawn(self._owned(entry.service, entry.migration_id), "owned")
        elif isinstance(entry, Tombstoned):
            log.warning(
                "migration %s: tombstoned at %s (%s) %s",
                entry.migration_id,
                self.node,
                entry.reason,
                entry.detail,
            )

    def _enrich(self, reply: Reply | Refused) -> Reply | Refused:
        """Add the runtime's numbers the core does not know to a reply."""
        arrival = self.arrivals.get(reply.migration_id)
        if arrival is None:
            return reply
        if isinstance(reply, RestoreOk):
            return reply.model_copy(
                update={
                    "seconds": arrival.restore_seconds,
                    "prelude_seconds": arrival.prelude_seconds,
                    "pid": arrival.pid,
                }
            )
        if isinstance(reply, LazyStatusOk):
            done = arrival.lazy_result
            if reply.done and done is not None:
                return reply.model_copy(
                    update={
                        "remote_bytes": done.remote_bytes,
                        "remote_pages": done.remote_pages,
                        "local_pages": done.local_pages,
                        "seconds": done.seconds,
                        "wire_bytes": done.wire_bytes,
                    }
                )
            stats = arrival.stats()
            if stats is not None:
                return reply.model_copy(
                    update={
                        "remote_bytes": stats.remote_bytes,
                        "remote_pages": stats.remote_pages,
                        "local_pages": stats.local_pages,
                    }
                )
        return reply

    def _start_timer(self, name: str, delay_s: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()

        def fire() -> None:
            if self._timers.get(name) is handle:
                del self._timers[name]
                self._spawn(self._feed(TimerFired(name)), "timer")

        handle = asyncio.get_running_loop().call_later(max(0.0, delay_s), fire)
        self._timers[name] = handle

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the runtime's

    @abc.abstractmethod
    async def _step(self, step: RunStep) -> None:
        """Carry out one step on the runtime and feed the core its ``StepDone``."""

    @abc.abstractmethod
    async def _arm(self, action: ArmFence) -> None:
        """Arm the fence of a migration, or push its deadline out."""
