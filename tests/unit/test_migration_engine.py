"""The migration driver over scripted ports: phases, metrics that add up, the hand-over.

The fake source writes real CRIU-format page images of a fake memory, so pre-copy's page delta
and the destination's rebuild are the real code; the fake destination runs the real
:class:`DestinationCore` with an in-memory runtime and fence. Only runc/CRIU and the network
are scripted: the tests cut calls, lose replies after the destination acted, fire the fence
during a restore, raise unexpected exceptions and stop the agent.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fogmig.platform.base.errors import TransferError
from fogmig.platform.base.vocabulary import PAGE_SIZE, Outcome, Phase, Technique
from fogmig.platform.migration.context import MigrationContext, Move
from fogmig.platform.migration.delta.apply import apply_delta
from fogmig.platform.migration.engine import SourceDriver
from fogmig.platform.migration.handover import journal as j
from fogmig.platform.migration.handover.destination_core import DestinationCore
from fogmig.platform.migration.handover.events import (
    Action,
    ArmFence,
    CallIn,
    Event,
    Ids,
    LazyFinished,
    RunStep,
    RuntimeReport,
    SendReply,
    StepDone,
    TerminalEvent,
    WriteJournal,
)
from fogmig.platform.migration.handover.messages import (
    ApplyDelta,
    Refused,
    Reply,
    Request,
    Restore,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.source_core import Plan, SourceCore
from fogmig.platform.migration.ports import CopyState, DumpResult, ProgressFn, SentResult
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.migration.source import TECHNIQUES
from fogmig.platform.runtime.pagemap import Pagemap, entries_from_pages, write_pagemap
from fogmig.policies.conditions import PrecopyStopRules

BASE = 0x7F0000000000
PAGES = 64
TIMING = Timing(
    fence_timeout_s=2.0, margin_s=0.1, call_timeout_s=0.5, retry_s=0.05, lazy_poll_s=0.05
)


class FakeSource:
    """A service whose memory is PAGES random pages; ``dirty`` pages change per checkpoint."""

    def __init__(self, dirty_per_round: int) -> None:
        self.rng = np.random.default_rng(1)
        self.memory = self.rng.integers(0, 256, (PAGES, PAGE_SIZE), dtype=np.uint8)
        self.dirty = dirty_per_round
        self.running = True
        self.restored_from: Path | None = None
        self.forgotten = False
        self.serving: set[str] = set()
        self.observed = False

    async def checkpoint(self, image_dir: Path, *, leave_running: bool) -> DumpResult:
        # The engine notes what the running service touched before it stops it.
        assert leave_running or self.observed, "frozen before it was observed"
        # The service ran since the last checkpoint: it dirtied some pages.
        for i in self.rng.choice(PAGES, size=self.dirty, replace=False):
            self.memory[i] = self.rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        image_dir.mkdir(parents=True)
        vaddrs = BASE + np.arange(PAGES, dtype=np.int64) * PAGE_SIZE
        entries = entries_from_pages(vaddrs, np.full(PAGES, 6, dtype=np.int64))
        write_pagemap(image_dir, Pagemap("1", 1, tuple(entries)))
        (image_dir / "pages-1.img").write_bytes(self.memory.tobytes())
        (image_dir / "core-1.img").write_bytes(b"core")
        (image_dir / "inventory.img").write_bytes(b"inventory")
        self.running = leave_running
        return DumpResult(image_dir, 0.01, 0.005, PAGES * PAGE_SIZE)

    async def copy_state(self) -> CopyState:
        return "running" if self.running else "absent"

    async def resume(self, image_dir: Path) -> str:
        if self.running:
            return "still running"
        assert (image_dir / "inventory.img").exists()
        self.restored_from = image_dir
        self.running = True
        return "restored"

    async def forget(self) -> None:
        self.forgotten = True

    async def accessed(self) -> dict[int, list[tuple[int, int, int]]]:
        return {}

    async def written_pages(self, limit: int) -> dict[int, list[int]]:
        return {}

    async def live_copy(self, out_dir: Path) -> int:
        return 0

    async def observe(self) -> None:
        self.observed = True

    def serve_pages(self, migration_id: str, image_dir: Path) -> None:
        self.serving.add(migration_id)

    def stop_serving_pages(self, migration_id: str) -> None:
        self.serving.discard(migration_id)


class FakeDestination:
    """The destination agent: the real core, an in-memory runtime and fence, a fake link.

    ``cut`` makes a call fail before it arrives; ``lose`` lets it arrive and act, then loses
    the reply (once); ``fence_fires_on_restore`` fires the fence while the copy restores.
    """

    def __init__(
        self,
        root: Path,
        *,
        cut: str | None = None,
        lose: str | None = None,
        lazy_ok: bool = True,
        fence_fires_on_restore: bool = False,
    ) -> None:
        self.root = root
        self.cut = cut
        self.lose = lose
        self.lazy_ok = lazy_ok
        self.fence_fires_on_restore = fence_fires_on_restore
        self.core = DestinationCore(node="b", timing=TIMING, ids=Ids())
        self.calls: list[str] = []
        self.journal: list[j.AnyEntry] = []
        self.restored: Path | None = None
        self.restored_base: str | None = None
        self.running = False
        self.fence: str = "none"
        self.cut_once = False
        self.commit_called = asyncio.Event()
        self._ids = itertools.count(1)
        self._replies: dict[int, Reply | Refused] = {}

    async def call(self, request: Request, *, timeout: float) -> Reply | Refused:
        self.calls.append(request.op)
        if request.op == "commit":
            self.commit_called.set()
        if request.op == self.cut:
            if self.cut_once:
                self.cut = None
            raise TransferError(f"link cut before {request.op}")
        call_id = next(self._ids)
        self._feed(CallIn(call_id, request, "a"))
        reply = self._replies.pop(call_id, None)
        if reply is None:
            raise TransferError(f"{request.op}: no reply")
        if request.op == self.lose:
            self.lose = None
            raise TransferError(f"the reply to {request.op} was lost")
        return reply

    def _feed(self, event: Event) -> None:
        pending: list[Action] = list(self.core.handle(event, time.monotonic()))
        while pending:
            action = pending.pop(0)
            if isinstance(action, WriteJournal):
                self.journal.append(action.entry)
            elif isinstance(action, SendReply):
                self._replies[action.call_id] = action.reply
            elif isinstance(action, ArmFence):
                if self.fence == "none":
                    self.fence = "armed"
            elif isinstance(action, RunStep):
                for follow in self._step(action):
                    pending += self.core.handle(follow, time.monotonic())

    def _step(self, step: RunStep) -> list[Event]:
        ok, detail = True, ""
        call = step.call
        events: list[Event] = []
        if step.kind == "apply" and isinstance(call, ApplyDelta):
            apply_delta(self.root / call.base, self.root / call.delta, self.root / call.out)
        elif step.kind == "restore":
            assert isinstance(call, Restore)
            assert self.fence == "armed", "restore without an armed fence"
            if isinstance(call.prelude, ApplyDelta):
                p = call.prelude
                apply_delta(self.root / p.base, self.root / p.delta, self.root / p.out)
            if self.fence_fires_on_restore:
                self.fence = "fired"
                ok, detail = False, "the fence fired during the restore"
            else:
                self.restored = self.root / call.images
                if call.base is not None:
                    assert (self.root / call.base).is_dir(), f"no image set {call.base} here"
                    self.restored_base = call.base
                self.running = True
                if call.mode == "lazy":
                    detail_ = "" if self.lazy_ok else "page source failed"
                    events.append(LazyFinished(step.migration_id, self.lazy_ok, detail_))
        elif step.kind == "kill":
            self.fence = "fired"
            self.running = False
        elif step.kind == "disarm":
            ok = self.fence == "armed" and self.running
            if ok:
                self.fence = "disarmed"
        return [StepDone(step.step_id, ok, detail), *events]

    async def send_dir(
        self, migration_id: str, local_dir: Path, subdir: str, progress: ProgressFn | None = None
    ) -> SentResult:
        if self.cut == "send_dir":
            raise TransferError("link cut while sending")
        shutil.copytree(local_dir, self.root / subdir)
        files = [p for p in local_dir.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        return SentResult(size, 0.1, files=len(files), file_bytes=size)

    async def close(self) -> None:
        pass

    @property
    def committed(self) -> bool:
        return any(isinstance(e, j.Committed) for e in self.journal)


class MemoryJournal:
    def __init__(self) -> None:
        self.entries: list[j.AnyEntry] = []

    async def append(self, entry: j.AnyEntry) -> None:
        self.entries.append(entry)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.entries]


class Delivered:
    def __init__(self) -> None:
        self.events: list[TerminalEvent] = []

    async def __call__(self, event: TerminalEvent, record: MigrationRecord) -> bool:
        self.events.append(event)
        return True


def _driver(
    tmp_path: Path,
    technique: str,
    source: FakeSource,
    peer: FakeDestination,
    *,
    moves: object | None = None,
    dirty_rate: float = 0.0,
) -> tuple[SourceDriver, MemoryJournal, Delivered]:
    tech = Technique(technique)
    record = MigrationRecord(
        migration_id="m1",
        service="s",
        source="a",
        destination="b",
        technique=tech,
        dirty_rate_bytes_per_s=dirty_rate,
    )
    ctx = MigrationContext(
        record=record,
        source=source,
        peer=peer,
        workdir=tmp_path / "src",
        rules=PrecopyStopRules(max_rounds=3, min_changed_bytes=0),
    )
    chosen = moves if moves is not None else TECHNIQUES[tech]()
    plan = Plan(
        migration_id="m1",
        service="s",
        source="a",
        destination="b",
        technique=tech,
        epoch=1,
        live_moves=chosen.live,  # type: ignore[attr-defined]
        restore=chosen.restore_call("m1"),  # type: ignore[attr-defined]
        command_id="c1",
    )
    journal, delivered = MemoryJournal(), Delivered()
    driver = SourceDriver(
        core=SourceCore(plan=plan, timing=TIMING, ids=Ids()),
        ctx=ctx,
        moves=chosen,  # type: ignore[arg-type]
        journal=journal,
        deliver=delivered,
        timing=TIMING,
    )
    return driver, journal, delivered


async def _run(
    tmp_path: Path, technique: str, source: FakeSource, peer: FakeDestination, **kw: object
) -> tuple[MigrationRecord, MemoryJournal, Delivered]:
    driver, journal, delivered = _driver(tmp_path, technique, source, peer, **kw)  # type: ignore[arg-type]
    await driver.begin()
    async with asyncio.timeout(20):
        await driver.run()
    return driver.record, journal, delivered


def _one_end(journal: MemoryJournal, delivered: Delivered, outcome: Outcome) -> None:
    """Exactly one terminal outcome, journaled and published."""
    finished = [e for e in journal.entries if isinstance(e, j.Finished)]
    assert [e.outcome for e in finished] == [outcome]
    assert [e.outcome for e in delivered.events] == [outcome]
    assert journal.kinds()[0] == "begin"
    assert journal.kinds()[-1] == "published"


@pytest.mark.parametrize("technique", [t.value for t in Technique])
async def test_each_technique_completes_and_its_metrics_add_up(
    tmp_path: Path, technique: str
) -> None:
    source, peer = FakeSource(dirty_per_round=2), FakeDestination(tmp_path / "dst")
    record, journal, delivered = await _run(tmp_path, technique, source, peer)
    assert record.outcome is Outcome.COMPLETED, record.error
    _one_end(journal, delivered, Outcome.COMPLETED)
    assert source.forgotten
    assert not source.running
    assert peer.running
    assert peer.committed
    assert peer.calls[0] == "prepare"
    assert "commit" in peer.calls
    assert [p.phase for p in record.phases][-3:] == [
        Phase.COMMITTED,
        Phase.CLEANING_UP,
        Phase.DONE,
    ]
    assert record.downtime_s == pytest.approx(
        record.dump_time_s + record.dump_transfer_time_s + record.resume_time_s
    )
    assert record.dump_transfer_time_s > 0
    assert record.resume_time_s > 0
    parts = (
        record.pre_dump_time_s
        + record.pre_dump_transfer_time_s
        + record.dump_time_s
        + record.dump_transfer_time_s
        + record.resume_time_s
        + record.faulted_pages_transfer_time_s
    )
    assert record.total_time_s == pytest.approx(parts)
    # Every directory streamed counts in the channel's totals.
    assert record.sent_wire_bytes > 0
    assert record.sent_file_bytes >= record.bulk_file_bytes > 0
    if technique in ("precopy", "hybrid"):
        assert record.pre_dump_bytes >= PAGES * PAGE_SIZE
        assert sum(r.bytes_sent for r in record.rounds if not r.final) == record.pre_dump_bytes
        assert record.precopy_stop_reason is not None
        assert Phase.PRECOPY in [p.phase for p in record.phases]
    else:
        assert record.pre_dump_bytes == 0
    if technique in ("postcopy", "hybrid"):
        assert "lazy_status" in peer.calls
        assert Phase.LAZY_PAGES in [p.phase for p in record.phases]
    else:
        assert record.faulted_pages_bytes == 0


async def test_precopy_ships_only_changed_pages_and_rebuilds_the_final_image(
    tmp_path: Path,
) -> None:
    source, peer = FakeSource(dirty_per_round=3), FakeDestination(tmp_path / "dst")
    record, _, _ = await _run(tmp_path, "precopy", source, peer)
    assert record.outcome is Outcome.COMPLETED
    # The final dump carries the few changed pages, not the state.
    assert record.dump_bytes < 10 * PAGE_SIZE + 16384
    assert peer.restored is not None
    rebuilt = (peer.restored / "pages-1.img").read_bytes()
    assert rebuilt == source.memory.tobytes()


@pytest.mark.parametrize("technique", ["precopy", "hybrid"])
async def test_a_first_round_that_suffices_is_the_base_of_the_final_dump(
    tmp_path: Path, technique: str
) -> None:
    """A service known to dirty almost nothing: both stop after their full round; pre-copy's
    final delta and hybrid's restore name that round as their base."""
    source, peer = FakeSource(dirty_per_round=1), FakeDestination(tmp_path / "dst")
    record, _, _ = await _run(tmp_path, technique, source, peer, dirty_rate=10.0)
    assert record.outcome is Outcome.COMPLETED, record.error
    live = [r for r in record.rounds if not r.final]
    assert len(live) == 1
    assert record.precopy_stop_reason is not None
    if technique == "precopy":
        assert peer.restored is not None
        assert (peer.restored / "pages-1.img").read_bytes() == source.memory.tobytes()
    else:
        # The lazy restore builds on the one round the destination took, under its own name.
        assert peer.restored_base == "r0"


async def test_final_dump_grows_with_the_dirty_rate(tmp_path: Path) -> None:
    low, _, _ = await _run(
        tmp_path / "lo", "precopy", FakeSource(1), FakeDestination(tmp_path / "lo-d")
    )
    high, _, _ = await _run(
        tmp_path / "hi", "precopy", FakeSource(30), FakeDestination(tmp_path / "hi-d")
    )
    assert high.dump_bytes > low.dump_bytes + 20 * PAGE_SIZE


@pytest.mark.parametrize("cut", ["prepare", "send_dir", "apply_delta", "restore"])
async def test_a_cut_before_the_commit_arrives_rolls_back_to_the_source(
    tmp_path: Path, cut: str
) -> None:
    source, peer = FakeSource(2), FakeDestination(tmp_path / "dst", cut=cut)
    record, journal, delivered = await _run(tmp_path, "precopy", source, peer)
    assert record.outcome is Outcome.ROLLED_BACK, record
    _one_end(journal, delivered, Outcome.ROLLED_BACK)
    assert record.failed_phase is not None
    assert record.error
    assert source.running
    assert not source.forgotten
    assert not peer.running  # never two copies: the destination's is dead or never ran
    assert not peer.committed
    assert (source.restored_from is not None) == (cut == "restore")
    # The restore never arrived: the source resumed on the destination's durable answer
    # (aborted), not after waiting out the fence.
    assert any(isinstance(e, j.Tombstoned) for e in peer.journal)


async def test_a_commit_lost_on_the_way_is_asked_again(tmp_path: Path) -> None:
    source, peer = FakeSource(0), FakeDestination(tmp_path / "dst", cut="commit")
    peer.cut_once = True
    record, journal, delivered = await _run(tmp_path, "cold", source, peer)
    assert record.outcome is Outcome.COMPLETED
    assert peer.calls.count("commit") == 2
    assert peer.running
    assert not source.running
    _one_end(journal, delivered, Outcome.COMPLETED)


@pytest.mark.parametrize("lost", ["commit", "restore", "prepare"])
async def test_a_lost_reply_never_leaves_two_copies(tmp_path: Path, lost: str) -> None:
    """The destination acted but its answer was lost: the source settles with it."""
    source, peer = FakeSource(0), FakeDestination(tmp_path / "dst", lose=lost)
    record, journal, delivered = await _run(tmp_path, "cold", source, peer)
    assert source.running != peer.running
    if lost == "commit":
        # Committed there: the repeated commit is answered with the owner.
        assert record.outcome is Outcome.COMPLETED, record
        assert peer.running
        assert source.forgotten
        assert peer.calls.count("commit") == 2
    else:
        assert record.outcome is Outcome.ROLLED_BACK, record
        assert source.running
    _one_end(journal, delivered, record.outcome)


async def test_a_restore_outlasting_the_fence_rolls_back(tmp_path: Path) -> None:
    source = FakeSource(0)
    peer = FakeDestination(tmp_path / "dst", fence_fires_on_restore=True)
    record, journal, delivered = await _run(tmp_path, "cold", source, peer)
    assert record.outcome is Outcome.ROLLED_BACK
    assert "fenced" in (record.error or "")
    assert source.running
    assert not peer.running
    _one_end(journal, delivered, Outcome.ROLLED_BACK)


async def test_postcopy_lazy_failure_rolls_back(tmp_path: Path) -> None:
    source, peer = FakeSource(0), FakeDestination(tmp_path / "dst", lazy_ok=False)
    record, journal, delivered = await _run(tmp_path, "postcopy", source, peer)
    assert record.outcome is Outcome.ROLLED_BACK
    assert record.failed_phase == "lazy_pages"
    assert source.running
    assert not peer.running
    assert not source.serving
    _one_end(journal, delivered, Outcome.ROLLED_BACK)


class Broken:
    """A technique with a bug: its final move raises something no one expected."""

    def __init__(self) -> None:
        self.inner = TECHNIQUES[Technique.COLD]()
        self.live = False

    def restore_call(self, migration_id: str) -> Restore:
        return self.inner.restore_call(migration_id)

    async def live_move(self, ctx: MigrationContext) -> Move:
        raise AssertionError

    async def freeze(self, ctx: MigrationContext) -> None:
        await self.inner.freeze(ctx)

    async def final_move(self, ctx: MigrationContext) -> Move:
        raise KeyError("a bug")

    def replied(self, ctx: MigrationContext, reply: Reply, seconds: float) -> None:
        self.inner.replied(ctx, reply, seconds)


async def test_an_unexpected_exception_still_rolls_back_and_ends_once(tmp_path: Path) -> None:
    source, peer = FakeSource(0), FakeDestination(tmp_path / "dst")
    record, journal, delivered = await _run(tmp_path, "cold", source, peer, moves=Broken())
    assert record.outcome is Outcome.ROLLED_BACK
    assert "KeyError" in (record.error or "")
    assert source.restored_from == tmp_path / "src" / "final"
    _one_end(journal, delivered, Outcome.ROLLED_BACK)


async def test_a_refused_prepare_ends_at_once(tmp_path: Path) -> None:
    source, peer = FakeSource(0), FakeDestination(tmp_path / "dst")
    peer.core.owners["s"] = 99  # the destination owns it at a newer epoch: stale
    started = time.monotonic()
    record, journal, delivered = await _run(tmp_path, "cold", source, peer)
    assert time.monotonic() - started < 1.0
    assert record.outcome is Outcome.ROLLED_BACK
    assert "refused" in (record.error or "")
    assert source.running
    assert source.restored_from is None
    _one_end(journal, delivered, Outcome.ROLLED_BACK)


async def test_a_stopping_agent_rolls_back_a_migration_that_restored_nothing(
    tmp_path: Path,
) -> None:
    class Slow(FakeDestination):
        async def send_dir(
            self,
            migration_id: str,
            local_dir: Path,
            subdir: str,
            progress: ProgressFn | None = None,
        ) -> SentResult:
            await asyncio.sleep(30)
            raise AssertionError

    source, peer = FakeSource(0), Slow(tmp_path / "dst")
    driver, journal, delivered = _driver(tmp_path, "cold", source, peer)
    await driver.begin()
    task = asyncio.create_task(driver.run())
    await asyncio.sleep(0.2)
    assert not source.running  # frozen, sending
    driver.stop()
    async with asyncio.timeout(5):
        await task
    assert driver.record.outcome is Outcome.ROLLED_BACK
    assert source.running
    _one_end(journal, delivered, Outcome.ROLLED_BACK)


@pytest.mark.parametrize(
    ("written", "outcome", "resumed"),
    [
        (["freezing"], Outcome.ROLLED_BACK, True),
        (["freezing", "restore_sent"], Outcome.ROLLED_BACK, True),
        (["freezing", "restore_sent", "commit_sent"], Outcome.COMPLETED, False),
    ],
)
async def test_a_restarted_source_finishes_from_its_journal(
    tmp_path: Path, written: list[str], outcome: Outcome, resumed: bool
) -> None:
    """The agent died after these entries; the destination kept what it had done."""
    source = FakeSource(0)
    source.observed = True  # the first life of the agent froze it
    await source.checkpoint(tmp_path / "src" / "final", leave_running=False)
    peer = FakeDestination(tmp_path / "dst")
    if "commit_sent" in written:
        # The destination got as far as the commit before the source died.
        driver, _, _ = _driver(tmp_path / "first", "cold", FakeSource(0), peer)
        await driver.begin()
        peer.lose = "commit"
        async with asyncio.timeout(5):
            task = asyncio.create_task(driver.run())
            await peer.commit_called.wait()
            task.cancel()
        assert peer.committed
    entries: list[j.MigrationEntry] = [
        j.Begin(migration_id="m1", service="s", epoch=1, destination="b", technique="cold")
    ]
    kinds = {"freezing": j.Freezing, "restore_sent": j.RestoreSent, "commit_sent": j.CommitSent}
    entries += [kinds[w](migration_id="m1") for w in written]
    core, actions = SourceCore.recover(
        entries=entries,
        runtime=RuntimeReport(container="absent", image=True),
        source="a",
        timing=TIMING,
        ids=Ids(next_call=1000, next_step=1000),
        now=time.monotonic(),
    )
    record = MigrationRecord(
        migration_id="m1", service="s", source="a", destination="b", technique=Technique.COLD
    )
    ctx = MigrationContext(record=record, source=source, peer=peer, workdir=tmp_path / "src")
    journal, delivered = MemoryJournal(), Delivered()
    driver = SourceDriver(
        core=core, ctx=ctx, moves=None, journal=journal, deliver=delivered, timing=TIMING
    )
    driver.recovered(actions)
    async with asyncio.timeout(10):
        await driver.run()
    assert record.outcome is outcome
    assert [e.outcome for e in delivered.events] == [outcome]
    assert (source.restored_from is not None) == resumed
    assert source.running != peer.running
