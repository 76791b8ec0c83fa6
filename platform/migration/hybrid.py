"""Hybrid migration: pre-copy rounds, then resume at once with only the changed pages lazy.

The destination already holds the last round's complete image; after the final freeze the
source ships the execution state and the list of pages that changed since that round, and the
destination's page server takes unchanged pages from its local copy and faults only the
changed ones in from the source (paper, 4.2.3).
"""

from __future__ import annotations

import json
import time

from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.migration.delta.compute import compute_delta
from fogmig.platform.migration.engine import MigrationContext
from fogmig.platform.migration.postcopy import lazy_dump, restore_and_fault_in
from fogmig.platform.migration.precopy import precopy_rounds
from fogmig.platform.migration.record import Round

CHANGED_FILE = "fogmig-changed-pages.json"


async def migrate(ctx: MigrationContext) -> None:
    record = ctx.record
    ctx.enter(Phase.PREPARING)
    await ctx.prepare()

    ctx.enter(Phase.PRECOPY)
    last = await precopy_rounds(ctx)

    ctx.enter(Phase.DUMPING)
    lazy_dir = await lazy_dump(ctx)
    started = time.monotonic()
    delta = compute_delta(last, ctx.workdir / "final")
    changed = {d.pagemap.image_id: d.shipped_vaddrs().tolist() for d in delta.pagemaps}
    (lazy_dir / CHANGED_FILE).write_text(json.dumps(changed))
    record.dump_time_s += time.monotonic() - started
    n_changed = delta.stats.pages_shipped

    ctx.enter(Phase.TRANSFERRING)
    sent = await ctx.send(lazy_dir, "lazy", Phase.TRANSFERRING)
    record.dump_transfer_time_s = sent.seconds
    record.dump_bytes = sent.bytes_sent
    record.rounds.append(
        Round(
            index=len(record.rounds),
            final=True,
            dump_time_s=record.dump_time_s,
            freeze_time_s=0.0,
            transfer_time_s=sent.seconds,
            bytes_dumped=0,
            bytes_sent=sent.bytes_sent,
            pages_changed=n_changed,
        )
    )

    await restore_and_fault_in(ctx, {"base": last.name, "changed": CHANGED_FILE})
