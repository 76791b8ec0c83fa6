"""Post-copy (lazy) migration: ship only the execution state, resume at once, fault pages in.

The source dumps the whole state to its OWN disk (that complete image is the safe copy until
the destination holds every page), ships the image set in the layout of a CRIU lazy dump (no
memory pages), and serves the pages on request over the authenticated agent channel; the
destination's lazy-pages daemon fetches them through fogmig's page server, so every fault costs
a real round trip over the link (paper, 4.2.2).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.engine import MigrationContext, timed
from fogmig.platform.migration.lazy.errors import LazyPagesError
from fogmig.platform.migration.lazy.layout import convert_to_lazy_layout

LAZY_POLL_S = 0.5


async def lazy_dump(ctx: MigrationContext) -> Path:
    """Freeze and dump to the local disk, then derive the lazy image set to ship."""
    dump = await ctx.source.checkpoint(ctx.workdir / "final", leave_running=False)
    started = time.monotonic()
    lazy_dir = ctx.workdir / "lazy"
    await convert_to_lazy_layout(dump.image_dir, lazy_dir)
    ctx.record.dump_time_s += dump.duration_s + (time.monotonic() - started)
    ctx.source.serve_pages(ctx.migration_id, dump.image_dir)
    return lazy_dir


async def restore_and_fault_in(ctx: MigrationContext, restore_params: dict[str, object]) -> None:
    """Restore lazily at the destination, then wait until every page has arrived."""
    record = ctx.record
    ctx.enter(Phase.RESTORING)
    ctx.destination_started = True
    record.resume_time_s = await timed(
        ctx.call("restore", {"mode": "lazy", "images": "lazy", **restore_params})
    )
    ctx.enter(Phase.LAZY_PAGES)
    lazy_started = time.monotonic()
    while True:
        # Polling doubles as the keep-alive that stops the destination from fencing itself.
        status = await ctx.call("lazy_status", timeout=ctx.fence_timeout_s / 2)
        if status.get("done"):
            break
        if ctx.on_progress is not None:
            done = int(str(status.get("remote_bytes", 0)))
            ctx.on_progress(
                Phase.LAZY_PAGES,
                done,
                record.state_bytes,
                done / max(time.monotonic() - lazy_started, 1e-6),
            )
        await asyncio.sleep(LAZY_POLL_S)
    if not status.get("ok"):
        raise LazyPagesError(f"destination reports the lazy transfer failed: {status.get('error')}")
    record.faulted_pages_transfer_time_s = float(str(status.get("seconds", 0.0)))
    record.faulted_pages_bytes = int(str(status.get("remote_bytes", 0)))
    record.faulted_pages_remote = int(str(status.get("remote_pages", 0)))
    record.faulted_pages_local = int(str(status.get("local_pages", 0)))
    await ctx.commit()


async def migrate(ctx: MigrationContext) -> None:
    record = ctx.record
    ctx.enter(Phase.PREPARING)
    await ctx.prepare()

    ctx.enter(Phase.DUMPING)
    lazy_dir = await lazy_dump(ctx)

    ctx.enter(Phase.TRANSFERRING)
    sent = await ctx.send(lazy_dir, "lazy", Phase.TRANSFERRING)
    record.dump_transfer_time_s = sent.seconds
    record.dump_bytes = sent.bytes_sent

    await restore_and_fault_in(ctx, {"base": None})
