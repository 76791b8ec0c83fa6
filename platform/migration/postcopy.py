"""Post-copy (lazy) migration: ship only the execution state, resume at once, fault pages in.

The source dumps the whole state to its OWN disk (that complete image is the safe copy until
the destination holds every page), ships the image set in the layout of a CRIU lazy dump (no
memory pages), and serves the pages on request over the authenticated agent channel; the
destination's lazy-pages daemon fetches them through fogmig's page server, so every fault costs
a real round trip over the link (paper, 4.2.2).

The pages that layout must still carry (those CRIU never makes lazy: the service's writes to
its file mappings, its stack) go ahead: before the freeze the source copies them from the
running service and ships the copy (recorded as the pre-dump: about 2 MB, none of the pages
CRIU makes lazy); after the freeze each travels as its difference from that copy
(``lazy/kept``), which takes the frozen window on the mobility link from about 0.75 s of
transfer to a few hundredths.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.context import MigrationContext, Move
from fogmig.platform.migration.handover.messages import (
    LazyStatusOk,
    Reply,
    Restore,
    SendFilesOk,
)
from fogmig.platform.migration.lazy.hot import hot_page_limit, write_hot
from fogmig.platform.migration.lazy.kept import encode_kept
from fogmig.platform.migration.lazy.layout import convert_to_lazy_layout
from fogmig.platform.migration.lazy.plan import write_accessed
from fogmig.platform.migration.lazy.warm import working_set, write_remote
from fogmig.platform.migration.ports import SentResult
from fogmig.platform.migration.precopy import files_call

log = logging.getLogger(__name__)


KEPT_AHEAD = "keptbase"
"""The destination's name for the live copy sent ahead of the freeze."""
CHANGED_FILE = "fogmig-changed-pages.json"
"""In a lazy layout coded against a base the destination holds: per task, the lazy pages
that come from the source (the others are the base's)."""


async def lazy_dump(ctx: MigrationContext) -> dict[int, list[int]]:
    """Freeze and dump to the local disk, derive the lazy image set to ship, offer the pages.

    Returns the pages the service wrote since the migration began (at most what the link
    takes with the state): each technique picks its working set among them after comparing
    with what the destination holds (``code_against_base``)."""
    # Observed just before the freeze (``SourcePort.observe``): the mappings touched since
    # the migration began, and the pages written meanwhile.
    accessed = await ctx.source.accessed()
    written = await ctx.source.written_pages(hot_page_limit(ctx.record.link_rate_bit_per_s / 8))
    dump = await ctx.source.checkpoint(ctx.image_dir, leave_running=False)
    started = time.monotonic()
    lazy_dir = ctx.workdir / "lazy"
    await convert_to_lazy_layout(dump.image_dir, lazy_dir)
    write_accessed(lazy_dir, accessed)
    ctx.record.dump_time_s += dump.duration_s + (time.monotonic() - started)
    ctx.source.serve_pages(ctx.migration_id, dump.image_dir)
    return written


def code_against_base(
    lazy_dir: Path,
    full_dir: Path,
    written: dict[int, list[int]],
    remote: dict[int, list[int]],
    base_dir: Path,
) -> None:
    """For a destination that holds ``base_dir``: the working set among the ``remote`` pages
    goes with the state, and the kept pages travel as their difference from the base."""
    hot = write_hot(lazy_dir, full_dir, written, among=remote, base_dir=base_dir)
    stats = encode_kept(lazy_dir, base_dir)
    log.info(
        "%s: %d working-set pages; %d kept pages, %d coded against the base: %d -> %d bytes",
        lazy_dir.parent.name,
        hot,
        stats.pages,
        stats.xor_pages,
        stats.plain_bytes,
        stats.coded_bytes,
    )


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
    """Post-copy's moves: a live copy of the small memory ahead, one stopping dump kept here,
    its lazy layout shipped with what the copy lacks."""

    live = True

    def __init__(self) -> None:
        self._ahead: SentResult | None = None
        self._sent: SentResult | None = None
        self._lazy = LazyPages()

    def restore_call(self, migration_id: str) -> Restore:
        return Restore(
            migration_id=migration_id,
            epoch=0,
            mode="lazy",
            images="lazy",
            base=KEPT_AHEAD,
            changed=CHANGED_FILE,
            fill=True,
        )

    async def live_move(self, ctx: MigrationContext) -> Move:
        """Copy the small memory from the running service and ship the copy."""
        started = time.monotonic()
        ahead = ctx.workdir / KEPT_AHEAD
        pages = await ctx.source.live_copy(ahead)
        ahead.mkdir(parents=True, exist_ok=True)  # no copy: every page as plain post-copy
        ctx.record.pre_dump_time_s = time.monotonic() - started
        log.info("%s: %d pages copied ahead of the freeze", ctx.migration_id, pages)
        self._ahead = await ctx.send(ahead, KEPT_AHEAD, Phase.PREPARING)
        return Move(call=files_call(ctx.migration_id, KEPT_AHEAD, self._ahead))

    async def freeze(self, ctx: MigrationContext) -> None:
        written = await lazy_dump(ctx)
        started = time.monotonic()
        lazy_dir, ahead = ctx.workdir / "lazy", ctx.workdir / KEPT_AHEAD
        remote = await asyncio.to_thread(write_remote, lazy_dir, ctx.image_dir, ahead, CHANGED_FILE)
        # Every page changed since the copy goes with the state, coded against the copy (it
        # differs in a few bytes); of the others seen written, what the link takes.
        limit = hot_page_limit(ctx.record.link_rate_bit_per_s / 8)
        hot = working_set(written, remote.changed, limit)
        await asyncio.to_thread(
            code_against_base, lazy_dir, ctx.image_dir, hot, remote.pages, ahead
        )
        log.info(
            "%s: %d lazy pages restored from the copy ahead, %d from here (%d changed since)",
            ctx.migration_id,
            remote.stats.local,
            remote.stats.remote,
            remote.stats.changed,
        )
        ctx.record.dump_time_s += time.monotonic() - started

    async def final_move(self, ctx: MigrationContext) -> Move:
        self._sent = await ctx.send(ctx.workdir / "lazy", "lazy", Phase.TRANSFERRING)
        return Move(call=files_call(ctx.migration_id, "lazy", self._sent))

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        if isinstance(reply, SendFilesOk) and self._ahead is not None:
            ctx.record.pre_dump_transfer_time_s = self._ahead.seconds + seconds
            ctx.record.pre_dump_bytes = self._ahead.bytes_sent
            self._ahead = None
            return
        if isinstance(reply, SendFilesOk) and self._sent is not None:
            ctx.record.dump_transfer_time_s = self._sent.seconds + seconds
            ctx.record.dump_bytes = self._sent.bytes_sent
            self._sent = None
        self._lazy.replied(ctx, reply, seconds)
