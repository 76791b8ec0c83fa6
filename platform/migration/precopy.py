"""Pre-copy migration: iterative rounds while the service runs, then a small final dump.

Without soft-dirty tracking (this kernel, arm64 fog nodes) every round is a leave-running
checkpoint; the first round ships every page, later rounds and the final dump ship only the
pages whose content changed since the previous round, and the destination rebuilds the
complete image set before it restores (design: docs/architecture.md, "Pre-copy"; the kernel
facts behind it: docs/platform.md, "No soft-dirty tracking: pre-copy by page delta").
The stop rule (``policies.stoprule``) takes another round only when it pays.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fogmig.platform.base.vocabulary import PAGE_SIZE, Phase
from fogmig.platform.migration.context import LAST, MigrationContext, Move
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
from fogmig.platform.runtime.pagemap import is_pages_file
from fogmig.policies.conditions import StopReason
from fogmig.policies.stoprule import Forecast, RoundOutlook, next_round

log = logging.getLogger(__name__)


def _meta_bytes(image_dir: Path) -> int:
    """What a dump holds besides its pages: every delta round ships it again."""
    return sum(
        p.stat().st_size
        for p in image_dir.iterdir()
        if p.is_file() and not is_pages_file(p.name) and p.suffix != ".log"
    )


def _rate(sent: SentResult) -> float:
    return sent.bytes_sent / sent.seconds if sent.seconds > 0 else 0.0


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


LAZY_FAULT_RTT_SHARE = 0.1
"""What a page left to the lazy phase costs besides its bytes, in round trips. Faulted one by
one it was about half a round trip (469 pages in 25 s at a 123 ms round trip, 258 pages in
1.0 s at 6.9 ms); streamed (``migration/lazy/stream``) the pages come at the link's rate and
only those the service touches before the stream brings them cost a round trip each."""


class Rounds:
    """The leave-running rounds of pre-copy and hybrid, one :class:`Move` each.

    After each leave-running round the stop rule (``policies.stoprule``) judges from what the
    rounds measured whether another one pays. After each round's call is answered the
    destination holds a complete image set equal to that round's; the last one is kept in
    :attr:`last` here and named :data:`LAST` there, unless the rounds stopped after the first
    (streamed before it could be judged, as ``r0``: pre-copy's final delta and hybrid's
    restore name their base).
    """

    def __init__(self, *, lazy_final: bool = False) -> None:
        self.changed: list[int] = []
        self.previous: DumpResult | None = None
        self.previous_name = ""
        self.last: Path | None = None
        """The source's image directory of the last round the destination holds."""
        self.lazy_final = lazy_final
        """Pages left for after the freeze are faulted lazily (hybrid), not shipped (pre-copy)."""
        self.forecasts: list[Forecast] = []
        self._shipped: _Shipped | None = None
        self._dump_started: list[float] = []
        self._reply_s: float | None = None
        self._link_bytes_per_s = 0.0
        self._page_wire_bytes = float(PAGE_SIZE)
        self._meta_wire_bytes = 0.0
        self._overhead_s = 0.0
        self._min_reply_s = 0.0

    async def move(self, ctx: MigrationContext) -> Move:
        index = len(self.changed)
        self._dump_started.append(time.monotonic())
        dump = await ctx.source.checkpoint(ctx.workdir / f"r{index}", leave_running=True)
        round_dump_time = dump.duration_s
        delta_dir: Path | None = None
        if self.previous is None:
            # Sent before it can be judged: named for another round unless it is the only one
            # (pre-copy's final delta and hybrid's restore name their base).
            name = LAST if ctx.rules.max_rounds <= 1 else f"r{index}"
            sent = await ctx.send(dump.image_dir, name, Phase.PRECOPY)
            pages_total = pages_changed = dump.image_bytes // PAGE_SIZE
            self._link_bytes_per_s = sent.bytes_sent / max(sent.seconds, 1e-6)
            # No delta measured yet: a changed page costs what a page of this round did, and
            # comparing two dumps costs about what taking one did.
            self._page_wire_bytes = PAGE_SIZE * sent.bytes_sent / max(sent.file_bytes, 1)
            self._meta_wire_bytes = _meta_bytes(dump.image_dir) * (
                sent.bytes_sent / max(sent.file_bytes, 1)
            )
            self._overhead_s = 2 * dump.duration_s
            call: SendFiles | ApplyDelta = files_call(ctx.migration_id, name, sent)
        else:
            started = time.monotonic()
            delta = write_delta(self.previous.image_dir, dump.image_dir, ctx.workdir / f"d{index}")
            round_dump_time += time.monotonic() - started
            sent = await ctx.send(delta.directory, f"d{index}", Phase.PRECOPY)
            pages_total, pages_changed = delta.pages_total, delta.pages_changed
            page_bytes = delta.manifest.page_bytes_stored
            if pages_changed:
                self._page_wire_bytes = page_bytes / pages_changed
            self._meta_wire_bytes = max(sent.bytes_sent - page_bytes, 0)
            self._overhead_s = round_dump_time
            delta_dir = delta.directory
        self.changed.append(sent.bytes_sent)
        reason = self._judge(ctx, pages_changed)
        more = reason is None
        if self.previous is not None:
            name = f"r{index}" if more else LAST
            call = ApplyDelta(
                migration_id=ctx.migration_id, base=self.previous_name, delta=f"d{index}", out=name
            )
        if not more:
            ctx.record.precopy_stop_reason = reason.value if reason is not None else None
        self._shipped = _Shipped(dump, round_dump_time, sent, pages_total, pages_changed, delta_dir)
        self.previous_name = name
        return Move(call=call, more=more)

    def _judge(self, ctx: MigrationContext, pages_changed: int) -> StopReason | None:
        """The stop rule on what the rounds measured (round 0: the service's declared rate)."""
        if len(self.changed) >= ctx.rules.max_rounds:
            return StopReason.MAX_ROUNDS
        record = ctx.record
        # The quickest reply took about a round trip: the measure when the link was not probed.
        rtt = record.link_rtt_s or self._min_reply_s
        reply_s = self._reply_s if self._reply_s is not None else rtt
        if len(self._dump_started) >= 2:
            interval = self._dump_started[-1] - self._dump_started[-2]
            rate = pages_changed / max(interval, 1e-3)
        elif record.dirty_rate_bytes_per_s > 0:
            rate = record.dirty_rate_bytes_per_s / PAGE_SIZE
        else:
            # Nothing known of the service's dirtying: one delta round measures it.
            return None
        link = self._link_bytes_per_s or record.link_rate_bit_per_s / 8 or 1.0
        final_page_s = (
            PAGE_SIZE / link + LAZY_FAULT_RTT_SHARE * rtt
            if self.lazy_final
            else self._page_wire_bytes / link
        )
        outlook = RoundOutlook(
            rounds_done=len(self.changed),
            dirty_pages_per_s=rate,
            since_dump_s=time.monotonic() - self._dump_started[-1] + reply_s,
            round_overhead_s=self._overhead_s + reply_s,
            page_wire_bytes=self._page_wire_bytes,
            meta_wire_bytes=self._meta_wire_bytes,
            final_page_s=final_page_s,
            link_bytes_per_s=link,
            precopy_bytes_so_far=sum(self.changed),
            state_bytes=self.changed[0],
        )
        reason, f = next_round(ctx.rules, outlook)
        self.forecasts.append(f)
        log.info(
            "migration %s: round %d: %.0f pages/s; %.0f pages if it stops, %.0f after another "
            "round of %.2f s saving %.2f s: %s",
            ctx.migration_id,
            len(self.changed) - 1,
            rate,
            f.pages_if_stop,
            f.pages_if_more,
            f.round_s,
            f.saved_s,
            reason.value if reason is not None else "another round",
        )
        return reason

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        """The destination took the round: it counts, and the previous round's files go."""
        shipped, self._shipped = self._shipped, None
        if shipped is None or not isinstance(reply, SendFilesOk | ApplyDeltaOk):
            return
        record = ctx.record
        self._reply_s = seconds
        self._min_reply_s = min(self._min_reply_s or seconds, seconds)
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
                file_bytes=shipped.sent.file_bytes,
                rate_bytes_per_s=_rate(shipped.sent),
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
        # No SHA-256 of the whole final image in the frozen window (0.1 s per 100 MB on each
        # side): the base it applies to was proven by the rounds' digests, and the channel
        # checks every byte that crosses the link.
        delta = write_delta(self.rounds.last, dump.image_dir, ctx.workdir / "dfinal", digest=False)
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
        base = self.rounds.previous_name
        # Restored as a child of the last round: nothing is copied in the frozen window.
        call = ApplyDelta(
            migration_id=ctx.migration_id, base=base, delta="dfinal", out="final", link=True
        )
        return Move(call=call)

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        if ctx.machine.phase is Phase.PRECOPY:
            self.rounds.replied(ctx, reply, seconds)
        elif isinstance(reply, ApplyDeltaOk) and self._sent is not None:
            record = ctx.record
            record.dump_transfer_time_s = self._sent.seconds + seconds
            record.dump_bytes = self._sent.bytes_sent
            record.rounds[-1] = record.rounds[-1].model_copy(
                update={
                    "transfer_time_s": record.dump_transfer_time_s,
                    "bytes_sent": self._sent.bytes_sent,
                    "file_bytes": self._sent.file_bytes,
                    "rate_bytes_per_s": _rate(self._sent),
                }
            )
            self._sent = None
