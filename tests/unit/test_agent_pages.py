"""The destination's side of a page call: the pages of each run, checked before use."""

from __future__ import annotations

import pytest

from fogmig.platform.agent.app import pages_per_run
from fogmig.platform.base.errors import MigrationError
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.handover.messages import GetPagesOk, Refused
from fogmig.platform.transfer.codec import ChunkEncoder


def page(n: int) -> bytes:
    return bytes([n]) * PAGE_SIZE


def test_the_pages_of_each_run_come_apart_in_order() -> None:
    data = page(1) + page(2) + page(3)
    reply = GetPagesOk(migration_id="m", nr_pages=3, tagged=True, runs=[2, 0, 1])
    assert pages_per_run("m", reply, ChunkEncoder().encode(data), 3) == [
        page(1) + page(2),
        b"",
        page(3),
    ]
    one = GetPagesOk(migration_id="m", nr_pages=1)  # untagged, one run: no counts needed
    assert pages_per_run("m", one, page(7), 1) == [page(7)]


@pytest.mark.parametrize(
    ("reply", "data", "runs", "match"),
    [
        (Refused(migration_id="m", state="unknown"), b"", 1, "refused pages"),
        (GetPagesOk(migration_id="m", nr_pages=2, runs=[1]), page(1) * 2, 2, "for 2 runs"),
        (GetPagesOk(migration_id="m", nr_pages=2, runs=[1, 2]), page(1) * 2, 2, "for 2 runs"),
        (GetPagesOk(migration_id="m", nr_pages=2), page(1), 1, "do not decode"),
        (GetPagesOk(migration_id="m", nr_pages=1, tagged=True), b"\xff" * 9, 1, "do not decode"),
    ],
)
def test_a_reply_that_does_not_add_up_is_a_migration_error(
    reply: GetPagesOk | Refused, data: bytes, runs: int, match: str
) -> None:
    with pytest.raises(MigrationError, match=match):
        pages_per_run("m", reply, data, runs)
