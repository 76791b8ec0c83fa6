"""The destination node's side of migrations: typed calls in, the hand-over core, the runtime.

:class:`Destination` decodes each call from a source agent (:func:`decode_call`), feeds it to the
node's :class:`~fogmig.platform.migration.handover.destination_core.DestinationCore` and carries
out what the core decides: journal entries, the runtime's fence (armed before the restore with
the lease's deadline, pushed out on every ticketed call, disarmed at commit, fired on a
tombstone), the runtime steps of each :class:`~arrival.Arrival`, and the replies. At the
agent's start :meth:`Destination.start` recovers from the journal: committed copies stay, every
other copy is fenced and its files removed.

It is built in layers: :mod:`~fogmig.platform.migration.destination_shell` runs the core's
actions (journal, replies, timers), :mod:`~fogmig.platform.migration.destination_steps` acts
on the runtime (the steps, the fence), and this module answers the calls and starts and stops
the whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fogmig.platform.base.errors import FenceError, FogmigError, MigrationError
from fogmig.platform.migration.arrival import Arrival
from fogmig.platform.migration.destination_steps import RECOVERY_WAIT_S, DestinationSteps
from fogmig.platform.migration.handover.compaction import Compacted
from fogmig.platform.migration.handover.destination_core import DestinationCore
from fogmig.platform.migration.handover.events import CallIn, FenceFired, Ids, RuntimeReport
from fogmig.platform.migration.handover.journal import Prepared, Restoring, incarnation
from fogmig.platform.migration.handover.messages import (
    Prepare,
    Refused,
    decode_call,
    encode_reply,
)
from fogmig.platform.runtime.fence import Fence
from fogmig.platform.runtime.workdir import remove_tree

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0


class Destination(DestinationSteps):
    """Every migration arriving at ``node``; :meth:`start` before serving calls."""

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
