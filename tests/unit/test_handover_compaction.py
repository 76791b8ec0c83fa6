"""Compaction of the migration journal: what it keeps, the epoch floor, the destination core
forgetting what it dropped, the atomic rewrite of the file, and a journal bounded over time."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.migration.handover import journal as j
from fogmig.platform.migration.handover.compaction import closed_migrations, compact
from fogmig.platform.migration.handover.destination_core import DestinationCore
from fogmig.platform.migration.handover.events import (
    Action,
    CallIn,
    Ids,
    RunStep,
    RuntimeReport,
    SendReply,
    StepDone,
    WriteJournal,
)
from fogmig.platform.migration.handover.messages import (
    Abort,
    Commit,
    CommitOk,
    Prepare,
    PrepareOk,
    Refused,
    Reply,
    Request,
    Restore,
    RestoreOk,
    Ticket,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.recovery import recover_destination, recover_source


def _outgoing(mid: str, service: str, epoch: int, *, published: bool = True) -> list[j.AnyEntry]:
    entries: list[j.AnyEntry] = [
        j.Begin(
            migration_id=mid, service=service, epoch=epoch, destination="gw2", technique="cold"
        ),
        j.Freezing(migration_id=mid),
        j.RestoreSent(migration_id=mid),
        j.CommitSent(migration_id=mid),
        j.HandedOver(migration_id=mid, epoch=epoch + 1),
        j.Finished(migration_id=mid, outcome=Outcome.COMPLETED),
    ]
    return [*entries, j.Published(migration_id=mid)] if published else entries


def _incoming(mid: str, service: str, epoch: int, end: str = "committed") -> list[j.AnyEntry]:
    entries: list[j.AnyEntry] = [
        j.Prepared(migration_id=mid, service=service, epoch=epoch, source="gw1", technique="cold"),
        j.Restoring(migration_id=mid),
    ]
    if end == "committed":
        entries.append(j.Committed(migration_id=mid, service=service, epoch=epoch))
    elif end == "tombstoned":
        entries.append(j.Tombstoned(migration_id=mid, reason="fenced"))
    return entries


def _journal() -> list[j.AnyEntry]:
    return [
        j.Boot(incarnation=1),
        *_outgoing("out-old", "s", 10),
        *_incoming("in-old", "s", 20),
        j.Tombstoned(migration_id="aborted-early", reason="aborted"),
        j.Boot(incarnation=2),
        *_outgoing("out-open", "t", 30, published=False),
        *_incoming("in-open", "u", 40, end="restoring"),
        *_incoming("in-new", "v", 50, end="tombstoned"),
        *_outgoing("out-new", "w", 60),
    ]


def _mine(entries: list[j.AnyEntry], mid: str) -> list[j.MigrationEntry]:
    return j.by_migration(entries).get(mid, [])


def test_open_migrations_stay_whole_and_compaction_is_idempotent() -> None:
    entries = _journal()
    assert closed_migrations(entries) == ["out-old", "in-old", "aborted-early", "in-new", "out-new"]
    done = compact(entries, keep_closed=2)
    assert done.dropped == {"out-old", "in-old", "aborted-early"}
    for mid in ("out-open", "in-open", "in-new", "out-new"):
        assert _mine(done.entries, mid) == _mine(entries, mid)
    assert [e for e in done.entries if isinstance(e, j.Boot)] == [j.Boot(incarnation=2)]
    assert done.entries[0] == j.Floor(epochs={"s": 20})
    again = compact(done.entries, keep_closed=2)
    assert again.entries == done.entries
    assert again.dropped == frozenset()
    # Keeping none drops every closed migration, never an open one.
    none = compact(entries, keep_closed=0)
    assert set(j.by_migration(none.entries)) == {"out-open", "in-open"}


def test_pinned_migrations_and_later_ones_of_their_service_stay() -> None:
    entries = [
        *_incoming("a", "s", 1, end="tombstoned"),
        *_incoming("b", "s", 2),
        *_incoming("c", "s", 3, end="tombstoned"),
        *_incoming("x", "t", 4),
    ]
    done = compact(entries, keep_closed=0, pinned={"b"})
    # "c" is closed and old enough, but dropping it would make "b" the latest of "s" again.
    assert done.dropped == {"a", "x"}
    assert set(j.by_migration(done.entries)) == {"b", "c"}
    assert done.floor == {"s": 1, "t": 4}


def test_the_floor_merges_earlier_floors() -> None:
    first = compact([*_incoming("a", "s", 5), *_outgoing("b", "t", 7)], keep_closed=0)
    assert first.floor == {"s": 5, "t": 8}
    later = [*first.entries, *_incoming("c", "s", 3, end="tombstoned"), *_incoming("d", "u", 9)]
    second = compact(later, keep_closed=0)
    assert second.floor == {"s": 5, "t": 8, "u": 9}
    assert [e for e in second.entries if isinstance(e, j.Floor)] == [j.Floor(epochs=second.floor)]
    with pytest.raises(ValueError, match="negative"):
        compact(later, keep_closed=-1)


def _random_journal(rng: random.Random, n: int) -> list[j.AnyEntry]:
    entries: list[j.AnyEntry] = []
    for i in range(n):
        service = rng.choice("abcd")
        epoch = rng.randrange(1, 1000)
        kind = rng.random()
        if kind < 0.1:
            entries.append(j.Boot(incarnation=i + 1))
        elif kind < 0.5:
            entries += _outgoing(f"o{i}", service, epoch, published=rng.random() < 0.8)
        else:
            end = rng.choice(("committed", "tombstoned", "restoring"))
            entries += _incoming(f"i{i}", service, epoch, end=end)
    return entries


@pytest.mark.parametrize("seed", range(20))
def test_epochs_incarnation_and_recovery_are_unchanged(seed: int) -> None:
    rng = random.Random(seed)
    entries = _random_journal(rng, 60)
    done = compact(entries, keep_closed=rng.randrange(0, 10))
    before, after = j.named_epochs(entries), j.named_epochs(done.entries)
    assert before == after
    assert j.incarnation(done.entries) == j.incarnation(entries)
    runtime = {s: RuntimeReport(container=rng.choice(("running", "absent"))) for s in "abcd"}
    plans = [p for p in recover_destination(entries, runtime) if p.migration_id not in done.dropped]
    assert recover_destination(done.entries, runtime) == plans
    old, new = j.by_migration(entries), j.by_migration(done.entries)
    for mid, mine in new.items():
        if mid.startswith("o"):
            report = RuntimeReport(container="running")
            assert recover_source(mine, report) == recover_source(old[mid], report)


# --- the destination core forgets what the journal dropped ---------------------------------------


class Dest:
    """A destination core whose steps all succeed at once and whose journal is a list."""

    def __init__(self, core: DestinationCore, journal: list[j.AnyEntry]) -> None:
        self.core = core
        self.journal = journal
        self.now = 0.0
        self.ticket: Ticket | None = None

    def run(self, actions: list[Action]) -> list[Reply | Refused]:
        replies: list[Reply | Refused] = []
        while actions:
            action, *actions = actions
            if isinstance(action, WriteJournal):
                self.journal.append(action.entry)
            elif isinstance(action, SendReply):
                replies.append(action.reply)
                self.ticket = getattr(action.reply, "ticket", self.ticket)
            elif isinstance(action, RunStep):
                actions += self.core.handle(StepDone(action.step_id, True), self.now)
        return replies

    def call(self, request: Request) -> Reply | Refused:
        self.now += 0.1
        event = CallIn(self.core.ids.call(), request, "gw1")
        [reply] = self.run(self.core.handle(event, self.now))
        return reply

    def migrate(self, mid: str, service: str, epoch: int, *, commit: bool) -> None:
        prepare = Prepare(
            migration_id=mid, service=service, epoch=epoch, source="gw1", technique="cold", args=[]
        )
        assert isinstance(self.call(prepare), PrepareOk), mid
        if not commit:
            assert self.call(Abort(migration_id=mid, epoch=epoch)).kind == "ok"
            return
        restore = Restore(
            migration_id=mid, epoch=epoch, mode="full", images="final", ticket=self.ticket
        )
        assert isinstance(self.call(restore), RestoreOk)
        assert isinstance(self.call(Commit(migration_id=mid, epoch=epoch)), CommitOk)


def _dest() -> Dest:
    journal: list[j.AnyEntry] = []
    core, actions = DestinationCore.recover(
        node="gw2", entries=[], runtime={}, timing=Timing(), ids=Ids()
    )
    dest = Dest(core, journal)
    dest.run(actions)
    return dest


def test_a_forgotten_migration_is_never_prepared_again_and_a_newer_one_is() -> None:
    dest = _dest()
    dest.migrate("m1", "svc", 5, commit=True)
    dest.migrate("m2", "svc", 7, commit=False)
    assert dest.core.in_use() == set()
    done = compact(dest.journal, keep_closed=0, pinned=dest.core.in_use())
    assert done.dropped == {"m1", "m2"}
    dest.core.forget(done.dropped, done.floor)
    assert dest.core.records == {}
    for core in (
        dest.core,
        DestinationCore.recover(
            node="gw2", entries=done.entries, runtime={}, timing=Timing(), ids=Ids()
        )[0],
    ):
        again = Dest(core, [])
        replay = Prepare(
            migration_id="m2", service="svc", epoch=7, source="gw1", technique="cold", args=[]
        )
        refused = again.call(replay)
        assert isinstance(refused, Refused)
        assert refused.detail == "a stale epoch"
        again.migrate("m3", "svc", 8, commit=True)
        assert again.core.owners["svc"] == 8


def test_a_migration_whose_steps_are_under_way_is_in_use() -> None:
    entries = _incoming("m1", "svc", 5, end="restoring")
    core, actions = DestinationCore.recover(
        node="gw2",
        entries=entries,
        runtime={"svc": RuntimeReport(container="running")},
        timing=Timing(),
        ids=Ids(),
    )
    # Fenced at restart, its kill not yet done: the journal must keep it.
    assert any(isinstance(a, RunStep) and a.kind == "kill" for a in actions)
    assert core.in_use() == {"m1"}


def test_the_core_and_the_journal_stay_bounded_over_a_thousand_migrations() -> None:
    dest = _dest()
    sizes = []
    for i in range(1000):
        dest.migrate(f"m{i}", f"s{i % 5}", 100 + i, commit=i % 3 != 0)
        if len(closed_migrations(dest.journal)) > 16:
            done = compact(dest.journal, keep_closed=8, pinned=dest.core.in_use())
            dest.journal[:] = done.entries
            dest.core.forget(done.dropped, done.floor)
        sizes.append((len(dest.journal), len(dest.core.records)))
    assert max(n for n, _ in sizes) <= 17 * 3 + 2
    assert max(r for _, r in sizes) <= 17
    assert j.named_epochs(dest.journal) == {f"s{k}": 1095 + k for k in range(5)}


# --- the file ----------------------------------------------------------------------------------


def _shared(path: Path) -> j.SharedJournal:
    return j.SharedJournal(journal=j.Journal(path=path))


async def _filled(path: Path) -> j.SharedJournal:
    journal = _shared(path)
    for entry in _journal():
        await journal.append(entry)
    return journal


async def test_the_rewrite_replaces_the_file_and_appends_follow_it(tmp_path: Path) -> None:
    path = tmp_path / "handover.jsonl"
    journal = await _filled(path)
    done = await journal.compact(keep_closed=1)
    assert journal.entries == done.entries
    assert j.Journal(path=path).read() == done.entries
    extra = j.Freezing(migration_id="out-open")
    await journal.append(extra)
    journal.close()
    assert _shared(path).entries == [*done.entries, extra]
    assert not (tmp_path / "handover.jsonl.compact").exists()
    # Nothing more to drop: the file is not written again.
    before = path.stat().st_mtime_ns, path.stat().st_ino
    again = _shared(path)
    assert (await again.compact(keep_closed=1)).dropped == frozenset()
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before


async def test_a_crash_before_the_rename_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "handover.jsonl"
    journal = await _filled(path)
    old = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(j.JournalError):
        await journal.compact(keep_closed=0)
    assert path.read_bytes() == old
    assert journal.entries == _journal()
    assert not (tmp_path / "handover.jsonl.compact").exists()
    # A crash that left a half-written temporary file behind changes nothing either.
    (tmp_path / "handover.jsonl.compact").write_text('{"kind": "fl')
    assert _shared(path).entries == _journal()
    monkeypatch.undo()
    await journal.append(j.Freezing(migration_id="out-open"))
    done = await journal.compact(keep_closed=0)
    journal.close()
    assert _shared(path).entries == done.entries


async def test_a_crash_after_the_rename_leaves_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "handover.jsonl"
    journal = await _filled(path)
    expected = compact(_journal(), keep_closed=0).entries

    def crash(directory: Path) -> None:
        raise OSError("simulated crash after the rename")

    monkeypatch.setattr(j, "_fsync_dir", crash)
    with pytest.raises(j.JournalError):
        await journal.compact(keep_closed=0)
    monkeypatch.undo()
    assert _shared(path).entries == expected
    # The next append goes to the new file, never to the old one renamed away.
    extra = j.Freezing(migration_id="out-open")
    await journal.append(extra)
    journal.close()
    assert _shared(path).entries == [*expected, extra]
