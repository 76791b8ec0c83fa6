"""Pre-copy migration: iterative rounds while the service runs, then a small final dump.

Without soft-dirty tracking (this kernel, arm64 fog nodes) every round is a leave-running
checkpoint; the first round ships every page, later rounds and the final dump ship only the
pages whose content changed since the previous round, and the destination rebuilds the
complete image set before it restores (design: docs/architecture.md, "Pre-copy"; the kernel
facts behind it: docs/platform.md, "No soft-dirty tracking: pre-copy by page delta").
The destination names the image set of the last round :data:`~context.LAST`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fogmig.platform.base.vocabulary import PAGE_SIZE, Phase
from fogmig.platform.migration.context import LAST, MigrationContext, Move, stop_after
from fogmig.platform.migration.delta.save import write_delta
from fogmig.platform.migration.handover.messages import (
    ApplyDelta,
    ApplyDeltaOk,
    Reply,
    Restore,
    SendFiles,
    SendFilesOk,
)
from fogmig.platform.migration.ports import DumpResult, SentResult
from fogmig.platform.migration.record import Round


def files_call(migration_id: str, name: str, sent: SentResult) -> SendFiles:
    """The call that makes the destination check a directory it received."""
    return SendFiles(migration_id=migration_id, name=name, files=sent.files, bytes=sent.file_bytes)


@dataclass(slots=True)
class _Shipped:
    """A round whose data left, waiting for the destination to take it."""

    dump: DumpResult
    dump_time_s: float
    sent: SentResult
    pages_total: int
    pages_changed: int
    delta_dir: Path | None


class Rounds:
    """The leave-running rounds of pre-copy and hybrid, one :class:`Move` each.

    After each round's call is answered the destination holds a complete image set equal to
    that round's; the last one is named :data:`LAST` there and kept in :attr:`last` here.
    """

    def __init__(self) -> None:
        self.changed: list[int] = []
        self.previous: DumpResult | None = None
        self.previous_name = ""
        self.last: Path | None = None
        """The source's image directory of the last round the destination holds."""
        self._shipped: _Shipped | None = None

    async def move(self, ctx: MigrationContext) -> Move:
        index = len(self.changed)
        dump = await ctx.source.checkpoint(ctx.workdir / f"r{index}", leave_running=True)
        round_dump_time = dump.duration_s
        delta_dir: Path | None = None
        if self.previous is None:
            more = stop_after(ctx.rules, [0]) is None
            name = f"r{index}" if more else LAST
            sent = await ctx.send(dump.image_dir, name, Phase.PRECOPY)
            self.changed.append(sent.bytes_sent)
            pages_total = pages_changed = dump.image_bytes // PAGE_SIZE
            call: SendFiles | ApplyDelta = files_call(ctx.migration_id, name, sent)
        else:
            started = time.monotonic()
            delta = write_delta(self.previous.image_dir, dump.image_dir, ctx.workdir / f"d{index}")
            round_dump_time += time.monotonic() - started
            sent = await ctx.send(delta.directory, f"d{index}", Phase.PRECOPY)
            self.changed.append(sent.bytes_sent)
            reason = stop_after(ctx.rules, self.changed)
            more = reason is None
            name = f"r{index}" if more else LAST
            pages_total, pages_changed = delta.pages_total, delta.pages_changed
            delta_dir = delta.directory
            call = ApplyDelta(
                migration_id=ctx.migration_id, base=self.previous_name, delta=f"d{index}", out=name
            )
        if not more:
            reason = stop_after(ctx.rules, self.changed)
            ctx.record.precopy_stop_reason = reason.value if reason is not None else None
        self._shipped = _Shipped(dump, round_dump_time, sent, pages_total, pages_changed, delta_dir)
        self.previous_name = name
        return Move(call=call, more=more)

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        """The destination took the round: it counts, and the previous round's files go."""
        shipped, self._shipped = self._shipped, None
        if shipped is None or not isinstance(reply, SendFilesOk | ApplyDeltaOk):
            return
        record = ctx.record
        transfer_time = shipped.sent.seconds + seconds
        record.rounds.append(
            Round(
                index=len(record.rounds),
                dump_time_s=shipped.dump_time_s,
                freeze_time_s=shipped.dump.freeze_s,
                transfer_time_s=transfer_time,
                bytes_dumped=shipped.dump.image_bytes,
                bytes_sent=shipped.sent.bytes_sent,
                pages_total=shipped.pages_total,
                pages_changed=shipped.pages_changed,
            )
        )
        record.pre_dump_time_s += shipped.dump_time_s
        record.pre_dump_transfer_time_s += transfer_time
        record.pre_dump_bytes += shipped.sent.bytes_sent
        # Image directories hold no mounts (CRIU's work dirs are separate).
        if self.previous is not None:
            shutil.rmtree(self.previous.image_dir, ignore_errors=True)
        if shipped.delta_dir is not None:
            shutil.rmtree(shipped.delta_dir, ignore_errors=True)
        self.previous = shipped.dump
        self.last = shipped.dump.image_dir


class Precopy:
    """Pre-copy's moves: rounds, then the final delta applied onto the last round."""

    live = True

    def __init__(self) -> None:
        self.rounds = Rounds()
        self._sent: SentResult | None = None

    def restore_call(self, migration_id: str) -> Restore:
        return Restore(migration_id=migration_id, epoch=0, mode="full", images="final")

    async def live_move(self, ctx: MigrationContext) -> Move:
        return await self.rounds.move(ctx)

    async def freeze(self, ctx: MigrationContext) -> None:
        """Freeze and dump the service; compute what changed since the last round (downtime)."""
        assert self.rounds.last is not None
        record = ctx.record
        dump = await ctx.source.checkpoint(ctx.image_dir, leave_running=False)
        started = time.monotonic()
        delta = write_delta(self.rounds.last, dump.image_dir, ctx.workdir / "dfinal")
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

    async def final_move(self, ctx: MigrationContext) -> Move:
        self._sent = await ctx.send(ctx.workdir / "dfinal", "dfinal", Phase.TRANSFERRING)
        call = ApplyDelta(migration_id=ctx.migration_id, base=LAST, delta="dfinal", out="final")
        return Move(call=call)

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        if ctx.machine.phase is Phase.PRECOPY:
            self.rounds.replied(ctx, reply, seconds)
        elif isinstance(reply, ApplyDeltaOk) and self._sent is not None:
            record = ctx.record
            record.dump_transfer_time_s = self._sent.seconds + seconds
            record.dump_bytes = self._sent.bytes_sent
            record.rounds[-1] = record.rounds[-1].model_copy(
                update={"transfer_time_s": record.dump_transfer_time_s}
            )
            self._sent = None
