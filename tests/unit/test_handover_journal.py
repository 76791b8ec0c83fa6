"""The migration journal on disk: fsynced appends, torn last lines, replay; and recovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fogmig.platform.migration.handover import journal as j
from fogmig.platform.migration.handover.events import RuntimeReport
from fogmig.platform.migration.handover.recovery import (
    DestinationAction,
    SourceAction,
    recover_destination,
    recover_source,
)

MID = "svc-1"
BEGIN = j.Begin(migration_id=MID, service="svc", epoch=1, destination="gw2", technique="cold")


def test_append_fsyncs_and_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    journal = j.Journal(path=tmp_path / "state" / "journal.jsonl")
    entries: list[j.AnyEntry] = [BEGIN, j.Freezing(migration_id=MID), j.Boot(incarnation=2)]
    for entry in entries:
        journal.append(entry)
    journal.close()
    assert len(synced) >= len(entries)  # every entry, plus the new directory
    assert j.Journal(path=journal.path).read() == entries
    assert j.by_migration(entries) == {MID: entries[:2]}
    assert j.incarnation(entries) == 3


def test_a_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    whole = j.dump_lines([BEGIN])
    path.write_text(whole + '{"kind": "freez')
    journal = j.Journal(path=path)
    assert journal.read() == [BEGIN]
    assert path.read_text() == whole
    journal.append(j.Freezing(migration_id=MID))
    assert journal.read() == [BEGIN, j.Freezing(migration_id=MID)]


def test_a_whole_but_unterminated_last_line_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text(j.dump_lines([BEGIN]).rstrip("\n"))
    journal = j.Journal(path=path)
    assert journal.read() == [BEGIN]
    journal.append(j.Freezing(migration_id=MID))
    assert len(j.Journal(path=path).read()) == 2


def test_damage_before_the_end_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text('{"kind": "nonsense"}\n' + j.dump_lines([BEGIN]))
    with pytest.raises(j.JournalError, match="line 1"):
        j.Journal(path=path).read()


RUNNING = RuntimeReport(container="running")
FROZEN = RuntimeReport(container="absent", image=True)
GONE = RuntimeReport(container="absent")


def _src(*kinds: j.MigrationEntry) -> list[j.MigrationEntry]:
    return [BEGIN, *kinds]


FREEZING = j.Freezing(migration_id=MID)
RESTORE = j.RestoreSent(migration_id=MID)
COMMIT = j.CommitSent(migration_id=MID)
HANDED = j.HandedOver(migration_id=MID, epoch=2)
RESUMING = j.Resuming(migration_id=MID, epoch=1, reason="aborted")
DONE = j.Finished(migration_id=MID, outcome="rolled_back", reason="x")


@pytest.mark.parametrize(
    ("entries", "runtime", "action", "fence"),
    [
        (_src(), RUNNING, SourceAction.RESUME, False),
        (_src(), GONE, SourceAction.LOST, False),
        (_src(FREEZING), RUNNING, SourceAction.RESUME, False),
        (_src(FREEZING), FROZEN, SourceAction.RESUME, False),
        (_src(FREEZING), GONE, SourceAction.LOST, False),
        (_src(FREEZING, RESTORE), FROZEN, SourceAction.SETTLE, True),
        (_src(FREEZING, RESTORE, COMMIT), FROZEN, SourceAction.SETTLE, False),
        (_src(FREEZING, RESTORE, COMMIT, HANDED), FROZEN, SourceAction.FINISH_HANDOVER, False),
        (_src(FREEZING, RESTORE, RESUMING), FROZEN, SourceAction.RESUME, False),
        (_src(FREEZING, RESTORE, RESUMING), RUNNING, SourceAction.RESUME, False),
        (_src(FREEZING, RESTORE, RESUMING), GONE, SourceAction.LOST, False),
        (_src(FREEZING, RESUMING, DONE), RUNNING, SourceAction.PUBLISH, False),
        (_src(DONE, j.Published(migration_id=MID)), RUNNING, SourceAction.NOTHING, False),
    ],
)
def test_source_recovery_table(
    entries: list[j.MigrationEntry], runtime: RuntimeReport, action: SourceAction, fence: bool
) -> None:
    decision = recover_source(entries, runtime)
    assert decision.action is action
    assert decision.fence_allowed is fence


PREPARED = j.Prepared(migration_id=MID, service="svc", epoch=2, source="gw1", technique="cold")
RESTORING = j.Restoring(migration_id=MID)
COMMITTED = j.Committed(migration_id=MID, service="svc", epoch=2)
TOMB = j.Tombstoned(migration_id=MID, reason="aborted")


@pytest.mark.parametrize(
    ("entries", "runtime", "action", "kill"),
    [
        ([PREPARED], GONE, DestinationAction.FENCE, False),
        ([PREPARED, RESTORING], GONE, DestinationAction.FENCE, True),
        ([PREPARED, RESTORING], RUNNING, DestinationAction.FENCE, True),
        ([PREPARED, RESTORING, COMMITTED], RUNNING, DestinationAction.KEEP, False),
        ([PREPARED, RESTORING, COMMITTED], GONE, DestinationAction.LOST, False),
        ([PREPARED, RESTORING, TOMB], RUNNING, DestinationAction.CLEAN, True),
        ([PREPARED, TOMB], GONE, DestinationAction.CLEAN, False),
    ],
)
def test_destination_recovery_table(
    entries: list[j.AnyEntry], runtime: RuntimeReport, action: DestinationAction, kill: bool
) -> None:
    [decision] = recover_destination(entries, {"svc": runtime})
    assert decision.action is action
    assert decision.kill is kill


def test_an_old_aborted_migration_never_kills_a_later_owner() -> None:
    later = [
        j.Prepared(migration_id="svc-2", service="svc", epoch=2, source="gw1", technique="cold"),
        j.Restoring(migration_id="svc-2"),
        j.Committed(migration_id="svc-2", service="svc", epoch=2),
    ]
    plans = recover_destination([PREPARED, RESTORING, TOMB, *later], {"svc": RUNNING})
    assert [(p.migration_id, p.action, p.kill) for p in plans] == [
        (MID, DestinationAction.FORGET, False),
        ("svc-2", DestinationAction.KEEP, False),
    ]
