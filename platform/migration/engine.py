"""Drives one outgoing migration: the hand-over core decides, this module carries it out.

:class:`SourceDriver` feeds a :class:`~fogmig.platform.migration.handover.source_core.SourceCore`
with replies, timers and the ends of runtime steps, and executes its actions: journal entries
(on disk before the next action), typed calls to the destination, the technique's data moves,
the freeze, the resume and the deletion of the copy here, and the one terminal event. It stamps
the record's phases as it goes; the technique (a :class:`~context.Moves`) fills in the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.vocabulary import Outcome, Phase
from fogmig.platform.migration.context import MigrationContext, Moves
from fogmig.platform.migration.handover.events import (
    Action,
    CallFailed,
    CancelTimer,
    Event,
    Publish,
    ReplyIn,
    RunStep,
    SendCall,
    StartTimer,
    StepDone,
    TerminalEvent,
    TimerFired,
    WriteJournal,
)
from fogmig.platform.migration.handover.journal import (
    AnyEntry,
    Begin,
    Finished,
    HandedOver,
    Published,
    Resuming,
)
from fogmig.platform.migration.handover.messages import (
    ApplyDeltaOk,
    Refused,
    Reply,
    Request,
    Restore,
    RestoreOk,
    SendFiles,
    SendFilesOk,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.source_core import SourceCore, SourcePhase
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.migration.states import IllegalTransition

log = logging.getLogger(__name__)

STOP_FAILS = frozenset({"prepare", "send_files", "apply_delta", "restore", "lazy_status"})
"""Calls a stopping agent gives up at once; ``commit`` and ``abort`` settle and go on."""

DRAIN_S = 3.0
Hook = Callable[[], Awaitable[None]]
Deliver = Callable[[TerminalEvent, MigrationRecord], Awaitable[bool]]
"""Publishes the terminal event; False when it could not (the next start publishes again)."""


class JournalWriter(Protocol):
    async def append(self, entry: AnyEntry) -> None: ...


async def _nothing() -> None:
    return None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class _Replied:
    call_id: int
    reply: Reply | Refused
    seconds: float


@dataclass(frozen=True, slots=True)
class _Timer:
    name: str
    token: int


class SourceDriver:
    """Runs one outgoing migration; :meth:`begin` then :meth:`run` (or :meth:`resume`)."""

    def __init__(
        self,
        *,
        core: SourceCore,
        ctx: MigrationContext,
        moves: Moves | None,
        journal: JournalWriter,
        deliver: Deliver,
        timing: Timing,
        freezing: Hook = _nothing,
        resumed: Hook = _nothing,
    ) -> None:
        self.core = core
        self.ctx = ctx
        self.moves = moves
        """The technique; None for a migration recovered from the journal (it moves no data)."""
        self.journal = journal
        self.deliver = deliver
        self.timing = timing
        self._freezing = freezing
        self._resumed = resumed
        self.terminal: TerminalEvent | None = None
        self.stopping = False
        self._queue: asyncio.Queue[Event | _Replied | _Timer] = asyncio.Queue()
        self._timers: dict[str, tuple[int, asyncio.TimerHandle]] = {}
        self._tokens = 0
        self._calls: dict[int, tuple[Request, asyncio.Task[None]]] = {}
        self._steps: dict[int, tuple[RunStep, asyncio.Task[None]]] = {}
        self._held: list[Action] = []
        self._undelivered = False
        self._failed_in: Phase | None = None

    @property
    def migration_id(self) -> str:
        return self.core.plan.migration_id

    @property
    def record(self) -> MigrationRecord:
        return self.ctx.record

    # ------------------------------------------------------------------ entry points

    async def begin(self) -> None:
        """Journal the migration (``Begin``); from then on it is accepted and will end once.

        Raises a JournalError if the entry cannot be written: the command is then refused.
        """
        record = self.record
        record.started_at = time.time()
        record.mark(Phase.PENDING, record.started_at)
        actions = self.core.start(time.monotonic())
        first = actions[0]
        assert isinstance(first, WriteJournal)
        assert isinstance(first.entry, Begin)
        await self.journal.append(first.entry)
        self._held = actions[1:]

    def recovered(self, actions: list[Action]) -> None:
        """Start from the actions of :meth:`SourceCore.recover` instead of :meth:`begin`."""
        self._held = actions

    async def run(self) -> TerminalEvent | None:
        """Run until the migration has ended; returns its terminal event.

        Cancelling it leaves the migration to the journal: the next start of the agent
        finishes it or rolls it back.
        """
        try:
            held, self._held = self._held, []
            await self._execute(held)
            while self.core.phase is not SourcePhase.DONE:
                item = await self._queue.get()
                await self._take(item)
            await self._drain()
            return self.terminal
        finally:
            self._shut()

    def stop(self) -> None:
        """The agent is stopping: give up what is under way before the hand-over is in doubt.

        Data moves and calls that only move the migration forward fail at once, so the core
        rolls back at once where it can (no restore sent); a freeze, resume or deletion under
        way finishes, and settling calls (``commit``, ``abort``) go on.
        """
        if self.stopping:
            return
        self.stopping = True
        log.warning("migration %s: the agent is stopping", self.migration_id)
        for call_id, (request, task) in list(self._calls.items()):
            if request.op in STOP_FAILS:
                task.cancel()
                self._queue.put_nowait(CallFailed(call_id, "the agent is stopping"))
        for step_id, (step, task) in list(self._steps.items()):
            if step.kind == "move":
                task.cancel()
                self._queue.put_nowait(StepDone(step_id, False, "the agent is stopping"))

    # ------------------------------------------------------------------ events

    async def _take(self, item: Event | _Replied | _Timer) -> None:
        if isinstance(item, _Timer):
            current = self._timers.get(item.name)
            if current is None or current[0] != item.token:
                return  # cancelled or restarted since
            del self._timers[item.name]
            await self._feed(TimerFired(item.name))
        elif isinstance(item, _Replied):
            sent = self._calls.pop(item.call_id, None)
            reply, seconds = item.reply, item.seconds
            if isinstance(reply, RestoreOk):
                prelude = sent[0].prelude if sent and isinstance(sent[0], Restore) else None
                if prelude is not None and self.moves is not None:
                    # The final data call went with the restore: account it as its own reply.
                    taken = (SendFilesOk if isinstance(prelude, SendFiles) else ApplyDeltaOk)(
                        migration_id=reply.migration_id, ticket=reply.ticket
                    )
                    self.moves.replied(self.ctx, taken, reply.prelude_seconds)
                    seconds = max(0.0, seconds - reply.prelude_seconds)
                self.record.resume_time_s = seconds
            if not isinstance(reply, Refused) and self.moves is not None:
                self.moves.replied(self.ctx, reply, seconds)
            await self._feed(ReplyIn(item.call_id, item.reply))
        else:
            if isinstance(item, CallFailed):
                self._calls.pop(item.call_id, None)
            if isinstance(item, StepDone) and self._steps.pop(item.step_id, None) is None:
                return  # already reported (cancelled by stop)
            await self._feed(item)

    async def _feed(self, event: Event) -> None:
        actions = self.core.handle(event, time.monotonic())
        if self.core.phase is SourcePhase.LAZY:
            self._phase(Phase.LAZY_PAGES)
        if self._failed_in is None and self.core.phase in (
            SourcePhase.SETTLING,
            SourcePhase.RESUMING,
        ):
            self._failed_in = self.ctx.machine.phase
            log.warning(
                "migration %s: failed in %s: %s",
                self.migration_id,
                self._failed_in.value,
                self.core.reason,
            )
        await self._execute(actions)

    # ------------------------------------------------------------------ actions

    async def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, WriteJournal):
                await self._write(action.entry)
            elif isinstance(action, SendCall):
                self._send(action)
            elif isinstance(action, StartTimer):
                self._start_timer(action.name, action.delay_s)
            elif isinstance(action, CancelTimer):
                found = self._timers.pop(action.name, None)
                if found is not None:
                    found[1].cancel()
            elif isinstance(action, RunStep):
                self._run(action)
            elif isinstance(action, Publish):
                self.terminal = action.event
                if not self.record.outcome.terminal:
                    # Recovered with the outcome already journaled: the record says it again.
                    self.record.outcome = Outcome(action.event.outcome)
                    self.record.error = action.event.reason or None
                    self.record.finished_at = time.time()
                self._undelivered = not await self.deliver(action.event, self.record)
            else:
                raise AssertionError(f"a source core asked for {action!r}")

    async def _write(self, entry: AnyEntry) -> None:
        if isinstance(entry, Published) and self._undelivered:
            return  # not delivered: the next start of the agent publishes it again
        if isinstance(entry, HandedOver):
            self._phase(Phase.COMMITTED)
        elif isinstance(entry, Resuming):
            self._rolling_back()
        elif isinstance(entry, Finished):
            self._finished(entry)
        await self.journal.append(entry)

    def _send(self, action: SendCall) -> None:
        request = action.request
        if request.op == "prepare":
            self._phase(Phase.PREPARING)
        elif request.op == "restore":
            self._phase(Phase.RESTORING)
        if self.stopping and request.op in STOP_FAILS:
            self._queue.put_nowait(CallFailed(action.call_id, "the agent is stopping"))
            return
        task = asyncio.create_task(self._call(action.call_id, request), name=f"call-{request.op}")
        self._calls[action.call_id] = (request, task)

    async def _call(self, call_id: int, request: Request) -> None:
        started = time.monotonic()
        try:
            reply = await self.ctx.peer.call(request, timeout=self.timing.call_timeout_s)
        except (FogmigError, OSError, TimeoutError) as exc:
            self._queue.put_nowait(CallFailed(call_id, describe(exc)))
        except Exception as exc:  # a bug must not strand the migration: the core settles it
            log.exception("migration %s: call %s failed", self.migration_id, request.op)
            self._queue.put_nowait(CallFailed(call_id, describe(exc)))
        else:
            self._queue.put_nowait(_Replied(call_id, reply, time.monotonic() - started))

    def _start_timer(self, name: str, delay_s: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old[1].cancel()
        self._tokens += 1
        token = _Timer(name, self._tokens)
        handle = asyncio.get_running_loop().call_later(
            max(0.0, delay_s), self._queue.put_nowait, token
        )
        self._timers[name] = (token.token, handle)

    def _run(self, step: RunStep) -> None:
        if step.kind == "move":
            if self.core.phase is not SourcePhase.LIVE:
                self._phase(Phase.TRANSFERRING)
            elif self.record.technique.precopy_rounds:
                self._phase(Phase.PRECOPY)
            # (Post-copy's copy of its kept pages goes ahead while it is still preparing.)
        elif step.kind == "delete_copy":
            self._phase(Phase.CLEANING_UP)
        if self.stopping and step.kind == "move":
            self._queue.put_nowait(StepDone(step.step_id, False, "the agent is stopping"))
            self._steps[step.step_id] = (step, asyncio.create_task(_nothing()))
            return
        task = asyncio.create_task(self._step(step), name=f"step-{step.kind}")
        self._steps[step.step_id] = (step, task)

    async def _step(self, step: RunStep) -> None:
        try:
            done = await self._perform(step)
        except (FogmigError, OSError, TimeoutError) as exc:
            log.warning("migration %s: %s failed: %s", self.migration_id, step.kind, exc)
            done = StepDone(step.step_id, False, describe(exc))
        except Exception as exc:  # a bug must not strand the service: the core settles it
            log.exception("migration %s: %s failed", self.migration_id, step.kind)
            done = StepDone(step.step_id, False, describe(exc))
        self._queue.put_nowait(done)

    async def _perform(self, step: RunStep) -> StepDone:
        ctx = self.ctx
        if step.kind == "move":
            if self.moves is None:
                return StepDone(step.step_id, False, "no technique after a restart")
            live = self.core.phase is SourcePhase.LIVE
            move = await (self.moves.live_move(ctx) if live else self.moves.final_move(ctx))
            return StepDone(
                step.step_id, True, call=move.call, more=move.more, base=move.restore_base
            )
        if step.kind == "freeze":
            if self.moves is None:
                return StepDone(step.step_id, False, "no technique after a restart")
            # Observed before the devices' traffic is held: not part of the downtime.
            await ctx.source.observe()
            await self._freezing()
            self._phase(Phase.DUMPING)
            await self.moves.freeze(ctx)
            return StepDone(step.step_id, True)
        if step.kind == "resume":
            what = await ctx.source.resume(ctx.image_dir)
            ctx.source.stop_serving_pages(self.migration_id)
            log.warning("migration %s: the service is %s on the source", self.migration_id, what)
            await self._resumed()
            return StepDone(step.step_id, True)
        if step.kind == "delete_copy":
            ctx.source.stop_serving_pages(self.migration_id)
            await ctx.source.forget()
            return StepDone(step.step_id, True)
        return StepDone(step.step_id, False, f"no such step here: {step.kind}")

    # ------------------------------------------------------------------ the record

    def _phase(self, phase: Phase) -> None:
        try:
            self.ctx.enter(phase)
        except IllegalTransition:
            if self.moves is not None:
                raise
            # Recovered after a restart: the phases before it are unknown, stamp what happens.
            self.ctx.stamp(phase)

    def _rolling_back(self) -> None:
        machine = self.ctx.machine
        if machine.phase is not Phase.ROLLING_BACK and not machine.done:
            self._failed_in = self._failed_in or machine.phase
            machine.fail()
            self.ctx.stamp(machine.phase)

    def _finished(self, entry: Finished) -> None:
        record = self.record
        record.outcome = Outcome(entry.outcome)
        machine = self.ctx.machine
        if entry.outcome == Outcome.COMPLETED:
            self._phase(Phase.DONE)
            if entry.reason:
                log.warning("migration %s: completed, but %s", self.migration_id, entry.reason)
        else:
            record.error = entry.reason or record.error
            record.failed_phase = (self._failed_in or machine.phase).value
            if entry.outcome == Outcome.ROLLED_BACK and machine.phase is Phase.ROLLING_BACK:
                machine.rolled_back()
            elif not machine.done:
                machine.fail()
            self.ctx.stamp(machine.phase)
        record.finished_at = time.time()

    async def _drain(self) -> None:
        """Give the best-effort ``abort`` of a rollback a moment to reach the destination, so
        that it drops its files now rather than after its stale timeout."""
        aborts = [task for request, task in self._calls.values() if request.op == "abort"]
        if aborts:
            await asyncio.wait(aborts, timeout=min(DRAIN_S, self.timing.call_timeout_s))

    def _shut(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for _, task in self._calls.values():
            task.cancel()
        for _, task in self._steps.values():
            task.cancel()
        self._calls.clear()
        self._steps.clear()

    async def close(self) -> None:
        """Close the channel to the destination (after :meth:`run` ended)."""
        with contextlib.suppress(FogmigError, OSError):
            await self.ctx.peer.close()
