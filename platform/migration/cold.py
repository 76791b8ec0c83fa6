"""Cold migration: stop and dump the whole state, transfer it, restore it (paper, 4.1).

Downtime equals the total migration time: the service is frozen from the dump until the
destination resumes it.
"""

from __future__ import annotations

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.context import MigrationContext, Move
from fogmig.platform.migration.handover.messages import Reply, Restore, SendFilesOk
from fogmig.platform.migration.ports import SentResult
from fogmig.platform.migration.precopy import files_call


class Cold:
    """Cold migration's moves: one stopping dump, shipped whole."""

    live = False

    def __init__(self) -> None:
        self._sent: SentResult | None = None

    def restore_call(self, migration_id: str) -> Restore:
        return Restore(migration_id=migration_id, epoch=0, mode="full", images="final")

    async def live_move(self, ctx: MigrationContext) -> Move:
        raise AssertionError("cold migration has no live moves")

    async def freeze(self, ctx: MigrationContext) -> None:
        dump = await ctx.source.checkpoint(ctx.image_dir, leave_running=False)
        ctx.record.dump_time_s = dump.duration_s

    async def final_move(self, ctx: MigrationContext) -> Move:
        self._sent = await ctx.send(ctx.image_dir, "final", Phase.TRANSFERRING)
        return Move(call=files_call(ctx.migration_id, "final", self._sent))

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        if isinstance(reply, SendFilesOk) and self._sent is not None:
            ctx.record.dump_transfer_time_s = self._sent.seconds + seconds
            ctx.record.dump_bytes = self._sent.bytes_sent
            self._sent = None
