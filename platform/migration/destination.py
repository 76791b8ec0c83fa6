"""The destination node's side of migrations: typed calls in, the hand-over core, the runtime.

:class:`Destination` decodes each call from a source agent (:func:`decode_call`), feeds it to the
node's :class:`~fogmig.platform.migration.handover.destination_core.DestinationCore` and carries
out what the core decides: journal entries, the runtime's fence (armed before the restore with
the lease's deadline, pushed out on every ticketed call, disarmed at commit, fired on a
tombstone), the runtime steps of each :class:`~arrival.Arrival`, and the replies. At the
agent's start :meth:`Destination.start` recovers from the journal: committed copies stay, every
other copy is fenced and its files removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fogmig.platform.base.errors import (
    ContainerNotFoundError,
    FenceError,
    FogmigError,
    MigrationError,
)
from fogmig.platform.migration.arrival import Arrival, FetchFactory
from fogmig.platform.migration.handover.compaction import Compacted
from fogmig.platform.migration.handover.destination_core import DestinationCore
from fogmig.platform.migration.handover.events import (
    Action,
    ArmFence,
    CallIn,
    CancelTimer,
    Event,
    FenceFired,
    Ids,
    LazyFinished,
    RunStep,
    RuntimeReport,
    SendReply,
    StartTimer,
    StepDone,
    TimerFired,
    WriteJournal,
)
from fogmig.platform.migration.handover.journal import (
    Begin,
    Committed,
    Finished,
    Prepared,
    Restoring,
    SharedJournal,
    Tombstoned,
    incarnation,
)
from fogmig.platform.migration.handover.messages import (
    ApplyDelta,
    CommitOk,
    LazyStatusOk,
    Prepare,
    Refused,
    Reply,
    Restore,
    RestoreOk,
    SendFiles,
    decode_call,
    encode_reply,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.runtime.container import NodeRuntime, runc_running
from fogmig.platform.runtime.fence import Fence, FenceHandle
from fogmig.platform.runtime.fence_state import FenceState
from fogmig.platform.runtime.workdir import remove_tree

log = logging.getLogger(__name__)

Notify = Callable[[str, str], Awaitable[None]]
"""(service, migration id): told when a copy here runs, is given up, or is owned."""
FENCE_POLL_S = 0.05
RECOVERY_WAIT_S = 60.0
STOP_WAIT_S = 5.0
KILL_RETRY_S = 1.0


async def _nothing(service: str, migration_id: str) -> None:
    return None


class Destination:
    """Every migration arriving at ``node``; :meth:`start` before serving calls."""

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

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Recover from the journal: keep committed copies, fence and clean up the rest."""
        entries = self.journal.entries
        for handle in await asyncio.to_thread(Fence.recover, self.node):
            self.fences[handle.migration_id] = handle
        services = {e.service for e in entries if isinstance(e, Prepared)}
        reports = {s: await self._report(s) for s in services}
        self._restored = {e.migration_id for e in entries if isinstance(e, Restoring)}
        base = incarnation(entries) * 1_000_000
        core, actions = DestinationCore.recover(
            node=self.node,
            entries=entries,
            runtime=reports,
            timing=self.timing,
            ids=Ids(next_call=base, next_step=base),
        )
        async with self._lock:
            self.core = core
            await self._execute(actions)
        await self._quiesce(RECOVERY_WAIT_S)
        for mid, rec in core.records.items():
            if rec.state == "committed" and (self.incoming_dir / mid).exists():
                # Owned; the agent died before it removed the files the copy came from.
                with contextlib.suppress(FogmigError, OSError):
                    await asyncio.to_thread(remove_tree, self.incoming_dir / mid)
        for mid in set(self.fences) - set(core.records):
            log.warning("fence of %s on %s belongs to no journaled migration", mid, self.node)

    async def _quiesce(self, timeout: float) -> None:
        """Wait until the steps under way, and those they lead to, have ended (bounded)."""
        deadline = time.monotonic() + timeout
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)

    async def _report(self, service: str) -> RuntimeReport:
        try:
            status = (await self.runtime.state(service)).status
        except FogmigError:
            return RuntimeReport(container="absent")
        if status == "running":
            return RuntimeReport(container="running")
        return RuntimeReport(container="paused" if status == "paused" else "absent")

    async def close(self) -> None:
        """The agent stops: every copy not yet owned is fenced now, the rest waits for the
        next start (the journal has it)."""
        core = self.core
        if core is not None:
            live = [
                rec.migration_id
                for rec in core.records.values()
                if rec.state in ("restoring", "running") and not rec.disarming
            ]
            for mid in live:
                fence = self.fences.get(mid)
                if fence is not None:
                    with contextlib.suppress(FenceError):
                        await asyncio.to_thread(fence.fire)
                await self._feed(FenceFired(mid))
            await self._quiesce(STOP_WAIT_S)
        self.core = None
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for fut in self._replies.values():
            if not fut.done():
                fut.cancel()
        for arrival in self.arrivals.values():
            with contextlib.suppress(FogmigError, OSError):
                await arrival.release()

    async def compact_journal(self, *, keep_closed: int) -> Compacted | None:
        """Drop all but the newest ``keep_closed`` closed migrations from the node's journal,
        and forget the incoming ones it dropped (None while the agent is not serving)."""
        async with self._lock:
            core = self.core
            if core is None:
                return None
            pinned = core.in_use() | set(self.arrivals) | set(self.fences)
            done = await self.journal.compact(keep_closed=keep_closed, pinned=pinned)
            core.forget(done.dropped, done.floor)
            self._restored -= done.dropped
            return done

    def arriving(self, service: str) -> bool:
        """Whether a copy of ``service`` is arriving here and not owned yet."""
        core = self.core
        return any(
            a.service == service
            and (core is None or getattr(core.records.get(mid), "state", "") != "committed")
            for mid, a in self.arrivals.items()
        )

    # ------------------------------------------------------------------ calls

    async def handle(self, op: str, params: dict[str, Any], peer: str) -> dict[str, Any]:
        """Answer one call of the source agent ``peer`` (the transfer channel's handler)."""
        request = decode_call(op, params)
        core = self.core
        if core is None:
            raise MigrationError(
                f"{self.node} is not serving migrations now",
                phase=op,
                migration_id=request.migration_id,
                hint="the agent is starting or stopping; the source tries again",
            )
        mid = request.migration_id
        if isinstance(request, Prepare) and mid not in core.records:
            refusal = await self._check_prepare(request)
            if refusal is not None:
                return encode_reply(op, refusal)
            self.arrivals[mid] = Arrival(
                migration_id=mid,
                service=request.service,
                source=peer,
                args=list(request.args),
                directory=self.incoming_dir / mid,
                bundle=self._bundles / request.service,
            )
        reply_to = asyncio.get_running_loop().create_future()
        call_id = core.ids.call()
        self._replies[call_id] = reply_to
        try:
            # A caller that vanishes cancels this handler; the core's actions for its call
            # (a journal entry, the fence, a step) are carried out all the same.
            await asyncio.shield(self._feed(CallIn(call_id, request, peer)))
            if isinstance(request, Prepare):
                arrival = self.arrivals.get(mid)
                if mid not in core.records:
                    self.arrivals.pop(mid, None)  # refused: nothing of it stays here
                elif arrival is not None and request.technique.lazy:
                    arrival.open_channels(self._fetch_factory)
            reply = await reply_to
        finally:
            self._replies.pop(call_id, None)
        return encode_reply(op, reply)

    async def _check_prepare(self, request: Prepare) -> Refused | None:
        # Two copies on one node would silently share the CoAP port (SO_REUSEPORT).
        state = await self._report(request.service)
        if state.container != "absent":
            return Refused(
                migration_id=request.migration_id,
                state="busy",
                detail=f"{request.service} already runs on {self.node}",
            )
        return None

    async def _feed(self, event: Event) -> None:
        async with self._lock:
            if self.core is None:
                return
            actions = self.core.handle(event, time.monotonic())
            await self._execute(actions)

    # ------------------------------------------------------------------ actions

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

    # ------------------------------------------------------------------ the fence

    async def _arm(self, action: ArmFence) -> None:
        mid = action.migration_id
        handle = self.fences.get(mid)
        try:
            if handle is None:
                assert self.core is not None
                service = self.core.records[mid].service
                self.fences[mid] = await asyncio.to_thread(
                    lambda: Fence.arm(
                        node=self.node,
                        container_id=service,
                        runc_root=self.runtime.runc_root,
                        migration_id=mid,
                        deadline=action.deadline,
                        netns=self.runtime.netns,
                        runc=self.runtime.runc,
                        confirm=False,  # the restore confirms it: _restore
                    )
                )
                self._spawn(self._watch(mid), f"fence-{mid}")
            else:
                await asyncio.to_thread(handle.extend, action.deadline)
        except FenceError as exc:
            # Not armed (or fired already): the restore step refuses to run, or the watch
            # reports the firing; either way the core tombstones the migration.
            log.warning("migration %s: fence: %s", mid, exc)

    async def _watch(self, mid: str) -> None:
        """Tell the core when the fence of ``mid`` fires (the watchdog kills on its own)."""
        while True:
            handle = self.fences.get(mid)
            if handle is None:
                return
            try:
                state = handle.state()
            except FenceError:
                return
            if state is FenceState.FIRED:
                await self._feed(FenceFired(mid))
                return
            if state is FenceState.DISARMED:
                return
            await asyncio.sleep(FENCE_POLL_S)

    # ------------------------------------------------------------------ steps

    async def _step(self, step: RunStep) -> None:
        try:
            done = await self._perform(step)
        except (FogmigError, OSError, TimeoutError) as exc:
            log.warning("migration %s: %s failed: %s", step.migration_id, step.kind, exc)
            done = StepDone(step.step_id, False, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug must not leave a copy unfenced: the core settles it
            log.exception("migration %s: %s failed", step.migration_id, step.kind)
            done = StepDone(step.step_id, False, f"{type(exc).__name__}: {exc}")
        if step.kind == "kill" and not done.ok:
            await asyncio.sleep(KILL_RETRY_S)  # the core asks again: not in a tight loop
        await self._feed(done)

    async def _perform(self, step: RunStep) -> StepDone:
        mid, call = step.migration_id, step.call
        arrival = self.arrivals.get(mid)
        if step.kind == "apply":
            if arrival is None:
                return StepDone(step.step_id, False, f"{self.node} has no files of {mid}")
            if isinstance(call, SendFiles | ApplyDelta):
                await self._apply(arrival, call)
            return StepDone(step.step_id, True)
        if step.kind == "restore":
            assert isinstance(call, Restore)
            return await self._restore(step, call, arrival)
        if step.kind == "kill":
            await self._kill(mid, arrival)
            return StepDone(step.step_id, True)
        if step.kind == "disarm":
            return await self._disarm(step, arrival)
        if step.kind == "delete_files":
            await self._delete(mid, arrival)
            return StepDone(step.step_id, True)
        return StepDone(step.step_id, False, f"no such step here: {step.kind}")

    @staticmethod
    async def _apply(arrival: Arrival, call: SendFiles | ApplyDelta) -> None:
        if isinstance(call, SendFiles):
            await arrival.take_files(call)
        else:
            await arrival.apply_delta(call)

    async def _restore(self, step: RunStep, call: Restore, arrival: Arrival | None) -> StepDone:
        mid = step.migration_id
        handle = self.fences.get(mid)
        if arrival is None or handle is None or handle.state() is not FenceState.ARMED:
            return StepDone(step.step_id, False, "no armed fence: the copy may not run")
        with contextlib.suppress(ContainerNotFoundError):
            if (await self.runtime.state(arrival.service)).running:
                return StepDone(step.step_id, False, f"{arrival.service} runs on {self.node}")
            await self.runtime.delete(arrival.service, force=True)  # a stopped leftover
        await self._pause("restore", mid)
        # The watchdog starts (60-70 ms) while the restore gets ready and runs; the copy is
        # not reported running before it watches.
        watching = asyncio.ensure_future(asyncio.to_thread(handle.confirm_watchdog))
        watching.add_done_callback(_retrieve)
        if call.prelude is not None:
            started = time.monotonic()
            await self._apply(arrival, call.prelude)
            arrival.prelude_seconds = time.monotonic() - started
        arrival.make_bundle(rootfs=self._rootfs(), node=self.node)
        task = asyncio.ensure_future(
            arrival.restore(call, runtime=self.runtime, fetch_factory=self._fetch_factory)
        )
        arrival.restore_task = task
        try:
            await task
        except BaseException:
            with contextlib.suppress(FogmigError, OSError):
                await arrival.release()
            raise
        try:
            await watching
        except FenceError as exc:
            # Never left running unwatched: the source, frozen, still owns the service.
            log.error("migration %s: %s", mid, exc)
            with contextlib.suppress(ContainerNotFoundError):
                await self.runtime.delete(arrival.service, force=True)
            return StepDone(step.step_id, False, f"the fence has no watchdog: {exc}")
        if handle.state() is not FenceState.ARMED:
            return StepDone(step.step_id, False, "the fence fired during the restore")
        log.info("migration %s: %s runs on %s", mid, arrival.service, self.node)
        self._spawn(self._running_here(arrival.service, mid), "running-here")
        if call.mode == "lazy":
            self._spawn(self._pages(arrival), f"pages-{mid}")
        await self._pause("restore_reply", mid)
        return StepDone(step.step_id, True)

    async def _pages(self, arrival: Arrival) -> None:
        try:
            result = await arrival.wait_pages()
            ok, detail = result.ok, result.detail
        except (FogmigError, OSError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        await self._feed(LazyFinished(arrival.migration_id, ok, detail))

    async def _kill(self, mid: str, arrival: Arrival | None) -> None:
        """Give the copy up for good: the fence fires and its watchdog kills the container."""
        service = arrival.service if arrival is not None else self._service_of(mid)
        handle = self.fences.get(mid)
        if handle is not None:
            try:
                state = handle.state()
            except FenceError:
                state = None  # released: its copy was killed before
            if state is FenceState.ARMED:
                with contextlib.suppress(FenceError):
                    await asyncio.to_thread(handle.fire)
                state = FenceState.FIRED
            if state is FenceState.FIRED:
                await asyncio.to_thread(handle.wait_killed)
            elif state is FenceState.DISARMED:
                # Disarmed, then the agent died before it journaled the commit: the copy
                # runs unguarded and is not owned. It is this migration's (the only one of
                # the service that may touch its container), so it dies here.
                with contextlib.suppress(ContainerNotFoundError):
                    await self.runtime.delete(service, force=True)
        if arrival is not None:
            await arrival.release()
        if mid in self._restored:
            self._spawn(self._gave_up(service, mid), "gave-up")

    async def _disarm(self, step: RunStep, arrival: Arrival | None) -> StepDone:
        mid = step.migration_id
        handle = self.fences.get(mid)
        if handle is None or arrival is None:
            return StepDone(step.step_id, False, "no fence to disarm")
        state = await self.runtime.state(arrival.service)
        if not state.running:
            return StepDone(step.step_id, False, f"the copy is {state.status}")
        try:
            await asyncio.to_thread(handle.disarm)
        except FenceError as exc:
            return StepDone(step.step_id, False, str(exc))
        self.fences.pop(mid, None)
        return StepDone(step.step_id, True)

    async def _delete(self, mid: str, arrival: Arrival | None) -> None:
        """Remove what the migration left: files, its fence once no restore can run, and
        the bundle it made unless this node owns the copy."""
        assert self.core is not None
        rec = self.core.records.get(mid)
        owned = rec is not None and rec.state == "committed"
        if arrival is not None and arrival.restore_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(arrival.restore_task)
        handle = self.fences.pop(mid, None)
        if handle is not None:
            service = arrival.service if arrival is not None else self._service_of(mid)
            waited = 0.0
            while arrival is None and runc_running(self.runtime.runc_root, service, "restore"):
                if waited > RECOVERY_WAIT_S:
                    log.error("migration %s: a restore of %s still runs", mid, service)
                    break
                await asyncio.sleep(0.1)  # a restore a crashed agent started may finish
                waited += 0.1
            with contextlib.suppress(FenceError):
                await asyncio.to_thread(handle.release)
        if arrival is not None:
            await arrival.remove(runtime=self.runtime, keep_bundle=owned)
            self.arrivals.pop(mid, None)
            return
        with contextlib.suppress(FogmigError, OSError):
            await asyncio.to_thread(remove_tree, self.incoming_dir / mid)
        service = self._service_of(mid)
        if owned or mid not in self._restored or self._leaving(service):
            return
        # Recovered: the bundle this migration made serves no container any more.
        if not await self.runtime.exists(service):
            with contextlib.suppress(FogmigError, OSError):
                await asyncio.to_thread(remove_tree, self._bundles / service)

    def _leaving(self, service: str) -> bool:
        """Whether an outgoing migration of ``service`` is unfinished here (its bundle is the
        one a rollback restores into)."""
        begun = {
            e.migration_id
            for e in self.journal.entries
            if isinstance(e, Begin) and e.service == service
        }
        ended = {e.migration_id for e in self.journal.entries if isinstance(e, Finished)}
        return bool(begun - ended)

    def _service_of(self, mid: str) -> str:
        assert self.core is not None
        rec = self.core.records.get(mid)
        return rec.service if rec is not None else "-"


def _retrieve(done: asyncio.Future[Any]) -> None:
    # A confirmation nobody awaits any more (the restore failed first) must not warn later.
    if not done.cancelled():
        done.exception()
