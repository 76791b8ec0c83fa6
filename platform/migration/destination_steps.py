"""The destination's steps on the node's runtime, and the fence that guards every copy.

:class:`DestinationSteps` carries out what the core asks of the runtime. The fence: armed
before the restore with the lease's deadline (its watchdog confirmed by the restore), pushed
out on every ticketed call, and watched, so that the core hears when it fires. The steps of
each :class:`~fogmig.platform.migration.arrival.Arrival`: ``apply`` streamed files or a page
delta, ``restore`` (only under an armed fence; the copy counts as running once the watchdog
watches it), ``kill`` (the fence fires and its watchdog kills), ``disarm`` at commit, and
``delete_files``. Every step ends in a ``StepDone`` fed back to the core, a failed one too,
even a bug's: the core settles it, so no copy is left unfenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fogmig.platform.base.errors import ContainerNotFoundError, FenceError, FogmigError
from fogmig.platform.migration.arrival import Arrival
from fogmig.platform.migration.destination_shell import DestinationShell
from fogmig.platform.migration.handover.events import (
    ArmFence,
    FenceFired,
    LazyFinished,
    RunStep,
    StepDone,
)
from fogmig.platform.migration.handover.journal import Begin, Finished
from fogmig.platform.migration.handover.messages import ApplyDelta, Restore, SendFiles
from fogmig.platform.runtime.container import runc_running
from fogmig.platform.runtime.fence import Fence
from fogmig.platform.runtime.fence_state import FenceState
from fogmig.platform.runtime.workdir import remove_tree

log = logging.getLogger(__name__)

FENCE_POLL_S = 0.05
RECOVERY_WAIT_S = 60.0
KILL_RETRY_S = 1.0


class DestinationSteps(DestinationShell):
    """The fence and the runtime steps of the migrations arriving at the node."""

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
