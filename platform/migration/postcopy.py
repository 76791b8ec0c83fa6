"""Post-copy (lazy) migration: ship only the execution state, resume at once, fault pages in.

The source dumps the whole state to its OWN disk (that complete image is the safe copy until
the destination holds every page), ships the image set in the layout of a CRIU lazy dump (no
memory pages), and serves the pages on request over the authenticated agent channel; the
destination's lazy-pages daemon fetches them through fogmig's page server, so every fault costs
a real round trip over the link (paper, 4.2.2).
"""

from __future__ import annotations

import asyncio
import logging
import time

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.context import MigrationContext, Move
from fogmig.platform.migration.handover.messages import (
    LazyStatusOk,
    Reply,
    Restore,
    SendFilesOk,
)
from fogmig.platform.migration.lazy.hot import hot_page_limit, write_hot
from fogmig.platform.migration.lazy.layout import convert_to_lazy_layout
from fogmig.platform.migration.lazy.plan import write_accessed
from fogmig.platform.migration.ports import SentResult
from fogmig.platform.migration.precopy import files_call

log = logging.getLogger(__name__)


async def lazy_dump(ctx: MigrationContext, *, working_set: bool = True) -> dict[int, list[int]]:
    """Freeze and dump to the local disk, derive the lazy image set to ship, offer the pages.

    ``working_set``: ship the pages written since the migration began with the execution
    state (hybrid picks its own among them, after comparing with its last round); returns
    those pages."""
    # Observed just before the freeze (``SourcePort.observe``): the mappings touched since
    # the migration began, and the pages written meanwhile (the working set that goes with
    # the execution state).
    accessed = await ctx.source.accessed()
    written = await ctx.source.written_pages(hot_page_limit(ctx.record.link_rate_bit_per_s / 8))
    dump = await ctx.source.checkpoint(ctx.image_dir, leave_running=False)
    started = time.monotonic()
    lazy_dir = ctx.workdir / "lazy"
    await convert_to_lazy_layout(dump.image_dir, lazy_dir)
    write_accessed(lazy_dir, accessed)
    if working_set:
        hot = await asyncio.to_thread(write_hot, lazy_dir, dump.image_dir, written)
        log.info("%s: %d pages of the working set go with the state", ctx.migration_id, hot)
    ctx.record.dump_time_s += dump.duration_s + (time.monotonic() - started)
    ctx.source.serve_pages(ctx.migration_id, dump.image_dir)
    return written


class LazyPages:
    """What post-copy and hybrid share after the restore: the lazy phase's numbers."""

    def __init__(self) -> None:
        self._lazy_started = 0.0

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        if not isinstance(reply, LazyStatusOk):
            return
        record = ctx.record
        if not self._lazy_started:
            self._lazy_started = time.monotonic()
        if reply.done:
            record.faulted_pages_transfer_time_s = reply.seconds
            # On the link's terms, like the other byte counts (the pages went compressed
            # where that paid); an older destination reports only the pages.
            record.faulted_pages_bytes = reply.wire_bytes or reply.remote_bytes
            record.faulted_pages_remote = reply.remote_pages
            record.faulted_pages_local = reply.local_pages
        elif ctx.on_progress is not None:
            elapsed = max(time.monotonic() - self._lazy_started, 1e-6)
            ctx.on_progress(
                Phase.LAZY_PAGES,
                reply.remote_bytes,
                record.state_bytes,
                reply.remote_bytes / elapsed,
            )


class Postcopy:
    """Post-copy's moves: one stopping dump kept here, its lazy layout shipped."""

    live = False

    def __init__(self) -> None:
        self._sent: SentResult | None = None
        self._lazy = LazyPages()

    def restore_call(self, migration_id: str) -> Restore:
        return Restore(migration_id=migration_id, epoch=0, mode="lazy", images="lazy")

    async def live_move(self, ctx: MigrationContext) -> Move:
        raise AssertionError("post-copy has no live moves")

    async def freeze(self, ctx: MigrationContext) -> None:
        await lazy_dump(ctx)

    async def final_move(self, ctx: MigrationContext) -> Move:
        self._sent = await ctx.send(ctx.workdir / "lazy", "lazy", Phase.TRANSFERRING)
        return Move(call=files_call(ctx.migration_id, "lazy", self._sent))

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        if isinstance(reply, SendFilesOk) and self._sent is not None:
            ctx.record.dump_transfer_time_s = self._sent.seconds + seconds
            ctx.record.dump_bytes = self._sent.bytes_sent
            self._sent = None
        self._lazy.replied(ctx, reply, seconds)
