"""What a technique works with: the migration's context, its data moves, and the stop rules.

A technique (``cold``, ``precopy``, ``postcopy``, ``hybrid``) is a :class:`Moves`: the driver
(``engine``) asks it for each data move the hand-over core schedules, for the freeze, and for
the restore call, and hands it back every reply, so that it fills the record phase by phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.handover.messages import Reply, Restore, TicketedRequest
from fogmig.platform.migration.ports import PeerPort, ProgressFn, SentResult, SourcePort
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.migration.states import MigrationStateMachine
from fogmig.policies.conditions import PrecopyStopRules

log = logging.getLogger(__name__)

LAST = "last"
"""The destination's name for the image set of the last pre-copy round."""


ProgressEvent = Callable[[Phase, int, int, float], None]
"""(phase, bytes_done, bytes_total, rate_bytes_per_s)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Move:
    """One data move done: the call that makes the destination take it, and whether another
    move follows before the next freeze or restore."""

    call: TicketedRequest
    more: bool = False
    restore_base: str | None = None
    """The image set the restore builds on, when it is not the one the plan named (a hybrid
    that stopped after its first round restores onto that round, not onto :data:`LAST`)."""


@dataclass(slots=True)
class MigrationContext:
    """Everything a technique needs: the ports, the record, its directory, progress."""

    record: MigrationRecord
    source: SourcePort
    peer: PeerPort
    workdir: Path
    """The source's directory of this migration (``final/`` holds the image of the freeze)."""
    rules: PrecopyStopRules = field(default_factory=PrecopyStopRules)
    on_progress: ProgressEvent | None = None
    machine: MigrationStateMachine = field(init=False)

    def __post_init__(self) -> None:
        self.machine = MigrationStateMachine(self.record.technique)

    @property
    def migration_id(self) -> str:
        return self.record.migration_id

    @property
    def image_dir(self) -> Path:
        """The complete image of the freeze, from which a rollback restores the service."""
        return self.workdir / "final"

    def enter(self, phase: Phase) -> None:
        """Stamp ``phase`` in the record (once; the state machine keeps the order)."""
        if self.machine.phase is phase:
            return
        self.machine.advance(phase)
        self.stamp(phase)

    def stamp(self, phase: Phase) -> None:
        self.record.mark(phase, time.time())
        log.info("migration %s: %s", self.migration_id, phase.value)
        if self.on_progress is not None:
            self.on_progress(phase, 0, 0, 0.0)

    async def send(self, local_dir: Path, subdir: str, phase: Phase) -> SentResult:
        sent = await self.peer.send_dir(
            self.migration_id, local_dir, subdir, progress=self.progress(phase)
        )
        record = self.record
        record.sent_file_bytes += sent.file_bytes
        record.sent_wire_bytes += sent.bytes_sent
        if sent.file_bytes > record.bulk_file_bytes:
            record.bulk_file_bytes = sent.file_bytes
            record.bulk_wire_bytes = sent.bytes_sent
            record.bulk_seconds = sent.seconds
        return sent

    def progress(self, phase: Phase) -> ProgressFn:
        started = time.monotonic()

        def report(done: int, total: int) -> None:
            if self.on_progress is not None:
                elapsed = max(time.monotonic() - started, 1e-6)
                self.on_progress(phase, done, total, done / elapsed)

        return report


class Moves(Protocol):
    """One technique's part of a migration, driven step by step by the engine."""

    live: bool
    """Whether data moves run before the freeze while the service keeps running."""

    def restore_call(self, migration_id: str) -> Restore:
        """The restore call (its epoch is the driver's business)."""
        ...

    async def live_move(self, ctx: MigrationContext) -> Move:
        """One move while the service runs (a pre-copy round)."""
        ...

    async def freeze(self, ctx: MigrationContext) -> None:
        """Freeze and dump the service into ``ctx.image_dir`` (it stops here)."""
        ...

    async def final_move(self, ctx: MigrationContext) -> Move:
        """A move after the freeze (the dump, its delta or its lazy layout)."""
        ...

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        """A positive reply to one of this migration's calls arrived after ``seconds``."""
        ...
