"""The lazy phase's numbers in the record: its bytes on the link's terms, like the others."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from fogmig.platform.base.vocabulary import Technique
from fogmig.platform.migration.context import MigrationContext
from fogmig.platform.migration.handover.messages import LazyStatusOk, Ticket
from fogmig.platform.migration.postcopy import LazyPages
from fogmig.platform.migration.record import MigrationRecord


def _ctx() -> MigrationContext:
    record = MigrationRecord(
        migration_id="m1", service="s", source="a", destination="b", technique=Technique.POSTCOPY
    )
    return cast(MigrationContext, SimpleNamespace(record=record, on_progress=None))


def _done(**counts: int) -> LazyStatusOk:
    ticket = Ticket(incarnation=1, seq=1)
    return LazyStatusOk(migration_id="m1", ticket=ticket, done=True, seconds=2.0, **counts)


def test_the_faulted_pages_count_what_crossed_the_link() -> None:
    ctx = _ctx()
    LazyPages().replied(ctx, _done(remote_bytes=4096 * 100, remote_pages=100, wire_bytes=9000), 0.1)
    assert ctx.record.faulted_pages_bytes == 9000
    assert ctx.record.faulted_pages_remote == 100
    assert ctx.record.faulted_pages_transfer_time_s == 2.0


def test_a_destination_that_counts_no_wire_bytes_gives_the_pages() -> None:
    ctx = _ctx()
    LazyPages().replied(ctx, _done(remote_bytes=4096 * 100, remote_pages=100), 0.1)
    assert ctx.record.faulted_pages_bytes == 4096 * 100
