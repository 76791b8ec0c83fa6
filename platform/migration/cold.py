"""Cold migration: stop and dump the whole state, transfer it, restore it (paper, 4.1).

Downtime equals the total migration time: the service is frozen from the dump until the
destination resumes it.
"""

from __future__ import annotations

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.engine import MigrationContext, timed


async def migrate(ctx: MigrationContext) -> None:
    record = ctx.record
    ctx.enter(Phase.PREPARING)
    await ctx.prepare()

    ctx.enter(Phase.DUMPING)
    dump = await ctx.source.checkpoint(ctx.workdir / "final", leave_running=False)
    record.dump_time_s = dump.duration_s

    ctx.enter(Phase.TRANSFERRING)
    sent = await ctx.send(dump.image_dir, "final", Phase.TRANSFERRING)
    record.dump_transfer_time_s = sent.seconds
    record.dump_bytes = sent.bytes_sent

    ctx.enter(Phase.RESTORING)
    ctx.destination_started = True
    record.resume_time_s = await timed(ctx.call("restore", {"mode": "full", "images": "final"}))
    await ctx.commit()
