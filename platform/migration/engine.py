"""Drives one migration on the source node: phases, timing, progress, failure and rollback.

The techniques fill in the record phase by phase through a :class:`MigrationContext`; the driver
:func:`run_migration` owns the state machine: any exception before the point of no return rolls
the service back onto the source (and tells the destination to drop its copy), any exception
after it leaves the destination in charge and only records the failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogmig.platform.base.errors import FogmigError, MigrationError
from fogmig.platform.base.vocabulary import Outcome, Phase
from fogmig.platform.migration.ports import PeerPort, ProgressFn, SentResult, SourcePort
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.migration.states import MigrationStateMachine
from fogmig.policies.conditions import PrecopyStopRules, StopReason

log = logging.getLogger(__name__)


def stop_after(rules: PrecopyStopRules, changed: list[int]) -> StopReason | None:
    """Apply the pre-copy stop rules to the bytes each round shipped (round 0: everything).

    The bytes changed during the last round stand in for what the next round would ship: the
    service dirties memory at a steady rate.
    """
    if len(changed) < 2:
        return StopReason.MAX_ROUNDS if rules.max_rounds <= 1 else None
    return rules.stop_reason(
        rounds_done=len(changed),
        last_round_bytes=changed[-2],
        next_round_bytes=changed[-1],
        precopy_bytes_so_far=sum(changed),
        state_bytes=changed[0],
    )


ProgressEvent = Callable[[Phase, int, int, float], None]
"""(phase, bytes_done, bytes_total, rate_bytes_per_s)."""


@dataclass(slots=True)
class MigrationContext:
    """Everything a technique needs: the ports, the record, its directories, progress."""

    record: MigrationRecord
    source: SourcePort
    peer: PeerPort
    workdir: Path  # source-side directory of this migration
    rules: PrecopyStopRules = field(default_factory=PrecopyStopRules)
    on_progress: ProgressEvent | None = None
    # The destination kills its copy when it hears nothing from the source for this long
    # before the commit; the source, unable to confirm an abort, waits this long before it
    # restores its own copy, so two live copies never coexist.
    fence_timeout_s: float = 20.0
    machine: MigrationStateMachine = field(init=False)
    service_spec: dict[str, object] = field(default_factory=dict)
    last_peer_contact: float = field(init=False, default=0.0)
    destination_started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.machine = MigrationStateMachine(self.record.technique)

    @property
    def migration_id(self) -> str:
        return self.record.migration_id

    def enter(self, phase: Phase) -> None:
        self.machine.advance(phase)
        self.record.mark(phase, time.time())
        log.info("migration %s: %s", self.migration_id, phase.value)
        if self.on_progress is not None:
            self.on_progress(phase, 0, 0, 0.0)

    async def call(
        self, op: str, params: Mapping[str, object] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Call the destination about this migration, noting that the peer was reachable."""
        result = await self.peer.call(
            op, {"migration_id": self.migration_id, **(params or {})}, timeout=timeout
        )
        self.last_peer_contact = time.monotonic()
        return result

    async def prepare(self) -> None:
        """Tell the destination what is coming; it refuses if it already runs the service."""
        await self.call("prepare", {"technique": self.record.technique, "spec": self.service_spec})

    async def send(self, local_dir: Path, subdir: str, phase: Phase) -> SentResult:
        sent = await self.peer.send_dir(
            self.migration_id, local_dir, subdir, progress=self.progress(phase)
        )
        self.last_peer_contact = time.monotonic()
        return sent

    async def commit(self) -> None:
        """Pass the point of no return: the destination acknowledges that it owns the service.

        Until this returns, the destination fences itself if it stops hearing from us.
        """
        await self.call("commit", timeout=self.fence_timeout_s / 2)
        self.enter(Phase.COMMITTED)

    def progress(self, phase: Phase) -> ProgressFn:
        started = time.monotonic()

        def report(done: int, total: int) -> None:
            if self.on_progress is not None:
                elapsed = max(time.monotonic() - started, 1e-6)
                self.on_progress(phase, done, total, done / elapsed)

        return report


async def timed(coro: Awaitable[object]) -> float:
    started = time.monotonic()
    await coro
    return time.monotonic() - started


TechniqueRun = Callable[[MigrationContext], Awaitable[None]]
"""One technique's moves (``cold.migrate``, ``precopy.migrate`` ...), run under the engine."""


async def run_migration(ctx: MigrationContext, technique: TechniqueRun) -> MigrationRecord:
    """Run ``technique`` under the state machine and return the finished record.

    Raises nothing for a migration failure: the record's ``outcome`` says what happened
    (``rolled_back`` with the service on the source, or ``failed_after_commit``).
    """
    record = ctx.record
    record.started_at = time.time()
    record.mark(Phase.PENDING, record.started_at)
    try:
        await technique(ctx)
        if ctx.machine.phase is Phase.COMMITTED:
            ctx.enter(Phase.CLEANING_UP)
            await _cleanup_after_commit(ctx)
            ctx.enter(Phase.DONE)
        record.outcome = Outcome.COMPLETED
    except (FogmigError, OSError, TimeoutError, asyncio.CancelledError) as exc:
        cancelled = isinstance(exc, asyncio.CancelledError)
        record.failed_phase = ctx.machine.phase.value
        record.error = _describe(exc)
        log.warning("migration %s failed in %s: %s", ctx.migration_id, record.failed_phase, exc)
        if ctx.machine.fail() is Phase.ROLLING_BACK:
            await _roll_back(ctx)
        else:
            record.outcome = Outcome.FAILED_AFTER_COMMIT
        if cancelled:
            record.finished_at = time.time()
            raise
    finally:
        record.finished_at = time.time()
    return record


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"


async def _roll_back(ctx: MigrationContext) -> None:
    """Before the point of no return: destination drops its copy, service stays on source."""
    record = ctx.record
    record.mark(Phase.ROLLING_BACK, time.time())
    try:
        # The destination kills whatever it started and removes its files.
        await ctx.call("abort", timeout=10.0)
    except (FogmigError, OSError, TimeoutError) as exc:
        log.warning("migration %s: destination abort failed: %s", ctx.migration_id, exc)
        if ctx.destination_started:
            # Unconfirmed: the destination may run a copy. It fences itself once it has not
            # heard from us for fence_timeout_s; restore only after that.
            waited = time.monotonic() - ctx.last_peer_contact
            await asyncio.sleep(max(0.0, ctx.fence_timeout_s + 2.0 - waited))
    try:
        if ctx.machine.needs_source_restore() and not await ctx.source.is_running():
            image = ctx.workdir / "final"
            await ctx.source.restore_here(image)
        ctx.source.stop_serving_pages(ctx.migration_id)
        ctx.machine.rolled_back()
        record.outcome = Outcome.ROLLED_BACK
        record.mark(Phase.ROLLED_BACK, time.time())
    except (FogmigError, OSError, TimeoutError) as exc:
        ctx.machine.fail()
        record.outcome = Outcome.FAILED_AFTER_COMMIT
        record.error = f"{record.error}; rollback failed: {_describe(exc)}"
        raise MigrationError(
            f"rollback failed: {exc}",
            phase=Phase.ROLLING_BACK.value,
            migration_id=ctx.migration_id,
            hint=f"the source's image is kept in {ctx.workdir / 'final'}",
        ) from exc


async def _cleanup_after_commit(ctx: MigrationContext) -> None:
    """The destination owns the service: forget the source copy. Failures are only logged."""
    ctx.source.stop_serving_pages(ctx.migration_id)
    try:
        await ctx.source.forget()
    except (FogmigError, OSError) as exc:
        log.warning("migration %s: source cleanup failed: %s", ctx.migration_id, exc)
