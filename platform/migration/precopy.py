"""Pre-copy migration: iterative rounds while the service runs, then a small final dump.

Without soft-dirty tracking (this kernel, arm64 fog nodes) every round is a leave-running
checkpoint; the first round ships every page, later rounds and the final dump ship only the
pages whose content changed since the previous round, and the destination rebuilds the
complete image set before it restores (design: docs/architecture.md, "Pre-copy"; the kernel
facts behind it: docs/platform.md, "No soft-dirty tracking: pre-copy by page delta").
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from fogmig.platform.base.vocabulary import PAGE_SIZE, Phase
from fogmig.platform.migration.delta.save import WrittenDelta, write_delta
from fogmig.platform.migration.engine import MigrationContext, stop_after, timed
from fogmig.platform.migration.ports import DumpResult
from fogmig.platform.migration.record import Round


async def precopy_rounds(ctx: MigrationContext) -> Path:
    """Run the leave-running rounds; return the source's image dir of the last round.

    After each round the destination holds a complete image set equal to that round's.
    """
    record = ctx.record
    changed: list[int] = []
    previous: DumpResult | None = None
    while True:
        index = len(changed)
        dump = await ctx.source.checkpoint(ctx.workdir / f"r{index}", leave_running=True)
        round_dump_time = dump.duration_s
        if previous is None:
            sent = await ctx.send(dump.image_dir, f"r{index}", Phase.PRECOPY)
            transfer_time = sent.seconds
            bytes_sent = sent.bytes_sent
            pages_total = pages_changed = dump.image_bytes // PAGE_SIZE
        else:
            started = time.monotonic()
            delta = write_delta(previous.image_dir, dump.image_dir, ctx.workdir / f"d{index}")
            round_dump_time += time.monotonic() - started
            sent = await ctx.send(delta.directory, f"d{index}", Phase.PRECOPY)
            apply_time = await timed(
                ctx.call(
                    "apply_delta",
                    {"base": f"r{index - 1}", "delta": f"d{index}", "out": f"r{index}"},
                )
            )
            transfer_time = sent.seconds + apply_time
            bytes_sent = sent.bytes_sent
            pages_total, pages_changed = delta.pages_total, delta.pages_changed
            # Image directories hold no mounts (CRIU's work dirs are separate).
            shutil.rmtree(previous.image_dir)
            shutil.rmtree(delta.directory)
        record.rounds.append(
            Round(
                index=index,
                dump_time_s=round_dump_time,
                freeze_time_s=dump.freeze_s,
                transfer_time_s=transfer_time,
                bytes_dumped=dump.image_bytes,
                bytes_sent=bytes_sent,
                pages_total=pages_total,
                pages_changed=pages_changed,
            )
        )
        record.pre_dump_time_s += round_dump_time
        record.pre_dump_transfer_time_s += transfer_time
        record.pre_dump_bytes += bytes_sent
        changed.append(bytes_sent)
        previous = dump
        reason = stop_after(ctx.rules, changed)
        if reason is not None:
            record.precopy_stop_reason = reason.value
            return dump.image_dir


async def final_delta(ctx: MigrationContext, last_round: Path) -> WrittenDelta:
    """Freeze and dump the service; compute what changed since the last round (downtime)."""
    record = ctx.record
    dump = await ctx.source.checkpoint(ctx.workdir / "final", leave_running=False)
    started = time.monotonic()
    delta = write_delta(last_round, dump.image_dir, ctx.workdir / "dfinal")
    record.dump_time_s = dump.duration_s + (time.monotonic() - started)
    record.rounds.append(
        Round(
            index=len(record.rounds),
            final=True,
            dump_time_s=record.dump_time_s,
            freeze_time_s=dump.freeze_s,
            transfer_time_s=0.0,
            bytes_dumped=dump.image_bytes,
            bytes_sent=delta.bytes,
            pages_total=delta.pages_total,
            pages_changed=delta.pages_changed,
        )
    )
    return delta


async def migrate(ctx: MigrationContext) -> None:
    record = ctx.record
    ctx.enter(Phase.PREPARING)
    await ctx.prepare()

    ctx.enter(Phase.PRECOPY)
    last = await precopy_rounds(ctx)
    last_name = last.name

    ctx.enter(Phase.DUMPING)
    delta = await final_delta(ctx, last)

    ctx.enter(Phase.TRANSFERRING)
    sent = await ctx.send(delta.directory, "dfinal", Phase.TRANSFERRING)
    apply_time = await timed(
        ctx.call("apply_delta", {"base": last_name, "delta": "dfinal", "out": "final"})
    )
    record.dump_transfer_time_s = sent.seconds + apply_time
    record.dump_bytes = sent.bytes_sent
    final_round = record.rounds[-1]
    record.rounds[-1] = final_round.model_copy(
        update={"transfer_time_s": record.dump_transfer_time_s}
    )

    ctx.enter(Phase.RESTORING)
    ctx.destination_started = True
    record.resume_time_s = await timed(ctx.call("restore", {"mode": "full", "images": "final"}))
    await ctx.commit()
