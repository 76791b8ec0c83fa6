"""The handover's typed messages: one registry, exact decoding, refusals of bad input."""

from __future__ import annotations

from typing import Any

import pytest

from fogmig.platform.base.errors import MigrationError
from fogmig.platform.migration.handover import messages as m

PREPARE: dict[str, Any] = {
    "migration_id": "svc-20250101T000000-abcdef",
    "service": "svc",
    "epoch": 3,
    "source": "gw1",
    "technique": "precopy",
    "args": ["python", "-m", "svc"],
}


def test_every_op_round_trips() -> None:
    ticket = m.Ticket(incarnation=2, seq=7)
    calls: list[m.Request] = [
        m.Prepare.model_validate(PREPARE),
        m.SendFiles(migration_id="a", ticket=ticket, name="r0", files=3, bytes=10),
        m.ApplyDelta(migration_id="a", ticket=ticket, base="r0", delta="d1", out="r1"),
        m.Restore(migration_id="a", epoch=4, ticket=ticket, mode="lazy", images="lazy", base="r1"),
        m.LazyStatus(migration_id="a", ticket=ticket),
        m.Commit(migration_id="a", epoch=4, ticket=ticket),
        m.Abort(migration_id="a", epoch=4, reason="link down"),
        m.Status(migration_id="a"),
        m.GetPages(migration_id="a", pid=1, vaddr=0x7F0000000000, nr_pages=256),
    ]
    assert {c.op for c in calls} == set(m.OPS)
    for call in calls:
        op, params = m.encode_call(call)
        assert m.decode_call(op, params) == call
    reply = m.RestoreOk(migration_id="a", ticket=ticket, seconds=0.5, pid=42)
    assert m.decode_reply("restore", m.encode_reply("restore", reply)) == reply
    refused = m.Refused(migration_id="a", state="fenced", detail="lease ran out")
    assert m.decode_reply("commit", m.encode_reply("commit", refused)) == refused


@pytest.mark.parametrize(
    "change",
    [
        {"migration_id": "../etc"},
        {"migration_id": "a\n"},
        {"service": "Svc"},
        {"source": "gw1 "},
        {"epoch": -1},
        {"epoch": 2**60},
        {"epoch": "3"},
        {"epoch": 3.0},
        {"technique": "warm"},
        {"args": ["x"] * 65},
        {"extra": 1},
    ],
)
def test_a_malformed_call_is_a_migration_error(change: dict[str, Any]) -> None:
    with pytest.raises(MigrationError, match="malformed 'prepare'"):
        m.decode_call("prepare", {**PREPARE, **change})


def test_a_page_call_carries_further_runs_and_its_reply_the_pages_of_each() -> None:
    more = [m.PageRun(vaddr=0x7F0000002000 + 0x2000 * i, nr_pages=1) for i in range(3)]
    call = m.GetPages(migration_id="a", pid=1, vaddr=0x7F0000000000, nr_pages=2, more=more)
    op, params = m.encode_call(call)
    assert params["more"][0] == {"vaddr": 0x7F0000002000, "nr_pages": 1}
    assert m.decode_call(op, params) == call
    reply = m.GetPagesOk(migration_id="a", nr_pages=4, tagged=True, runs=[2, 1, 0, 1])
    assert m.decode_reply(op, m.encode_reply(op, reply)) == reply
    too_many = [{"vaddr": 0, "nr_pages": 1}] * m.MAX_PAGE_RUNS
    for bad in (too_many, [{"vaddr": 0, "nr_pages": 0}], [{"vaddr": -1, "nr_pages": 1}]):
        with pytest.raises(MigrationError, match="malformed 'get_pages'"):
            m.decode_call(op, {**params, "more": bad})


def test_unknown_ops_and_bad_numbers_are_refused() -> None:
    with pytest.raises(MigrationError, match="unknown operation"):
        m.decode_call("keepalive", {"migration_id": "a"})
    ok = {"kind": "ok", "migration_id": "a", "ticket": {"incarnation": 1, "seq": 1}}
    for seconds in (float("nan"), float("inf"), -1.0, 1e7):
        with pytest.raises(MigrationError):
            m.decode_reply("apply_delta", {**ok, "seconds": seconds})
    with pytest.raises(MigrationError):
        m.decode_reply("commit", {"kind": "refused", "migration_id": "a", "state": "maybe"})
    with pytest.raises(MigrationError, match="does not answer"):
        m.encode_reply("commit", m.StatusOk(migration_id="a", state="running"))
