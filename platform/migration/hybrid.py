"""Hybrid migration: pre-copy rounds, then resume at once with only the changed pages lazy.

The destination already holds the last round's complete image; after the final freeze the
source ships the execution state and the list of pages that changed since that round, and the
destination's page server takes unchanged pages from its local copy and faults only the
changed ones in from the source (paper, 4.2.3).
"""

from __future__ import annotations

import asyncio
import json
import time

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.context import LAST, MigrationContext, Move
from fogmig.platform.migration.delta.compute import compute_delta
from fogmig.platform.migration.handover.messages import Reply, Restore, SendFilesOk
from fogmig.platform.migration.ports import SentResult
from fogmig.platform.migration.postcopy import (
    CHANGED_FILE,
    LazyPages,
    code_against_base,
    lazy_dump,
)
from fogmig.platform.migration.precopy import Rounds, files_call
from fogmig.platform.migration.record import Round


class Hybrid:
    """Hybrid's moves: pre-copy rounds, a stopping dump kept here, the changed pages lazy."""

    live = True

    def __init__(self) -> None:
        self.rounds = Rounds(lazy_final=True)
        self._changed_pages = 0
        self._sent: SentResult | None = None
        self._lazy = LazyPages()

    def restore_call(self, migration_id: str) -> Restore:
        return Restore(
            migration_id=migration_id,
            epoch=0,
            mode="lazy",
            images="lazy",
            base=LAST,
            changed=CHANGED_FILE,
        )

    async def live_move(self, ctx: MigrationContext) -> Move:
        return await self.rounds.move(ctx)

    async def freeze(self, ctx: MigrationContext) -> None:
        assert self.rounds.last is not None
        written = await lazy_dump(ctx)
        started = time.monotonic()
        delta = compute_delta(self.rounds.last, ctx.image_dir)
        changed = {d.pagemap.image_id: d.shipped_vaddrs().tolist() for d in delta.pagemaps}
        (ctx.workdir / "lazy" / CHANGED_FILE).write_text(json.dumps(changed))
        # Of the changed pages, those the service worked on go with the execution state; the
        # kept pages go as a delta against the last round the destination holds.
        among = {int(task): vaddrs for task, vaddrs in changed.items() if task.isdigit()}
        await asyncio.to_thread(
            code_against_base,
            ctx.workdir / "lazy",
            ctx.image_dir,
            written,
            among,
            self.rounds.last,
        )
        ctx.record.dump_time_s += time.monotonic() - started
        self._changed_pages = delta.stats.pages_shipped

    async def final_move(self, ctx: MigrationContext) -> Move:
        self._sent = await ctx.send(ctx.workdir / "lazy", "lazy", Phase.TRANSFERRING)
        # The restore builds on the last round the destination took, whatever its name (a
        # first round that sufficed keeps the name it was sent under).
        return Move(
            call=files_call(ctx.migration_id, "lazy", self._sent),
            restore_base=self.rounds.previous_name,
        )

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        if ctx.machine.phase is Phase.PRECOPY:
            self.rounds.replied(ctx, reply, seconds)
            return
        if isinstance(reply, SendFilesOk) and self._sent is not None:
            record = ctx.record
            sent, self._sent = self._sent, None
            record.dump_transfer_time_s = sent.seconds + seconds
            record.dump_bytes = sent.bytes_sent
            record.rounds.append(
                Round(
                    index=len(record.rounds),
                    final=True,
                    dump_time_s=record.dump_time_s,
                    freeze_time_s=0.0,
                    transfer_time_s=record.dump_transfer_time_s,
                    bytes_dumped=0,
                    bytes_sent=sent.bytes_sent,
                    pages_changed=self._changed_pages,
                    file_bytes=sent.file_bytes,
                    rate_bytes_per_s=sent.bytes_sent / sent.seconds if sent.seconds > 0 else 0.0,
                )
            )
        self._lazy.replied(ctx, reply, seconds)
