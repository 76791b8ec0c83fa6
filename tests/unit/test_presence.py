"""The ordering of a service's presences: which node every gateway forwards it to."""

from __future__ import annotations

import itertools
import json

import pytest

from fogmig.platform.agent.forwarding import Location
from fogmig.platform.agent.presence import PresenceBook
from fogmig.platform.bus.schemas import PresenceState, ServicePresence, decode, encode
from fogmig.platform.bus.topics import Rejection, SchemaError, topics

IPS = {"gw1": "10.79.0.1", "gw2": "10.79.0.2", "gw3": "10.79.0.3"}


def presence(
    node: str,
    seq: int,
    state: PresenceState = "running",
    *,
    mid: str | None = None,
    to: str | None = None,
    service: str = "svc",
) -> ServicePresence:
    return ServicePresence(
        service=service,
        node=node,
        data_ip=IPS[node],
        port=5683,
        present=True,
        at=1.0,
        seq=seq,
        state=state,
        migration_id=mid,
        to=to,
    )


def where(book: PresenceBook, service: str = "svc") -> str | None:
    loc = book.locations().get(service)
    return None if loc is None else loc.node


def test_the_highest_seq_wins_not_the_latest_topic() -> None:
    # gw1 -> gw2 -> gw1: gw1's topic was first in the book, gw2's second. Picking by
    # insertion order (the old presence loop) would forward to gw2, where it no longer runs.
    book = PresenceBook()
    book.put(presence("gw1", 1))
    book.put(presence("gw2", 2, mid="m1"))
    book.put(presence("gw1", 3, mid="m2"))
    assert where(book) == "gw1"
    assert book.locations() == {"svc": Location("svc", "gw1", IPS["gw1"], 5683)}
    # Each leftover presence (gw1's first, then gw2's) is reported once as it loses.
    notices = book.notices()
    assert [(n.kind, n.presence.node, n.presence.seq, n.winner.node) for n in notices] == [
        ("stale", "gw1", 1, "gw2"),
        ("stale", "gw2", 2, "gw1"),
    ]
    book.put(presence("gw3", 1, service="other"))
    assert book.notices() == []


def test_every_arrival_order_gives_the_same_winner() -> None:
    msgs = [
        presence("gw1", 1),
        presence("gw1", 2, "moving", mid="m", to="gw2"),
        presence("gw2", 3, "holding", mid="m"),
        presence("gw2", 4, mid="m"),
    ]
    winners = set()
    for perm in itertools.permutations(msgs):
        book = PresenceBook()
        for m in perm:
            book.put(m)
        winners.add(book.winner("svc"))
    assert winners == {msgs[-1]}


def test_a_tie_goes_to_the_greater_node_name_and_is_reported() -> None:
    for first, second in (("gw1", "gw2"), ("gw2", "gw1")):
        book = PresenceBook()
        book.put(presence(first, 5))
        book.put(presence(second, 5))
        assert where(book) == "gw2"
        [notice] = book.notices()
        assert (notice.kind, notice.presence.node) == ("conflict", "gw1")
        book.put(presence("gw3", 1, service="other"))
        assert book.notices() == []  # once


def test_an_older_presence_on_the_same_topic_is_ignored() -> None:
    book = PresenceBook()
    book.put(presence("gw2", 4, mid="m"))
    assert not book.put(presence("gw2", 3, "holding", mid="m"))  # a late copy
    assert book.get("gw2", "svc") == presence("gw2", 4, mid="m")
    assert [n.kind for n in book.notices()] == ["older"]


def test_moving_still_serves_at_the_source_until_the_destination_holds() -> None:
    book = PresenceBook()
    book.put(presence("gw1", 1))
    book.put(presence("gw1", 2, "moving", mid="m", to="gw2"))
    assert where(book) == "gw1"
    book.put(presence("gw2", 3, "holding", mid="m"))
    assert where(book) == "gw2"
    # The source's moving presence losing to its own migration's destination is the plan.
    assert book.notices() == []
    book.drop("gw1", "svc")  # the source clears it after the commit
    assert where(book) == "gw2"


def test_a_cleared_winner_falls_back_and_seq_keeps_climbing() -> None:
    book = PresenceBook()
    book.put(presence("gw1", 2, "moving", mid="m", to="gw2"))
    book.put(presence("gw2", 3, "holding", mid="m"))
    assert book.next_seq("svc") == 4
    book.drop("gw2", "svc")  # the destination gave up
    assert where(book) == "gw1"
    assert book.next_seq("svc") == 4  # never below what was once seen
    assert not book.drop("gw2", "svc")
    assert book.next_seq("new") == 1


def test_a_presence_that_is_not_present_removes_its_topic() -> None:
    book = PresenceBook()
    book.put(presence("gw1", 1))
    gone = presence("gw1", 2).model_copy(update={"present": False})
    assert book.put(gone)
    assert book.locations() == {}
    assert book.next_seq("svc") == 3


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"state": "moving", "migration_id": "m"}, "destination"),
        ({"state": "moving", "to": "gw2"}, "migration"),
        ({"state": "moving", "to": "gw1", "migration_id": "m"}, "itself"),
        ({"state": "holding"}, "migration"),
        ({"state": "running", "to": "gw2"}, "only a moving"),
        ({"state": "holding", "migration_id": "m", "present": False}, "not present"),
        ({"seq": -1}, "seq"),
        ({"state": "gone"}, "state"),
    ],
)
def test_the_schema_refuses_presences_that_do_not_hold_together(
    fields: dict[str, object], why: str
) -> None:
    payload = presence("gw1", 1).model_dump(mode="json") | fields
    with pytest.raises(SchemaError, match=why) as info:
        decode(topics.service("gw1", "svc"), json.dumps(payload).encode())
    assert info.value.reason is Rejection.INVALID


def test_a_moving_presence_round_trips_and_names_a_known_destination() -> None:
    msg = presence("gw1", 7, "moving", mid="m-1", to="gw2")
    topic = topics.service("gw1", "svc")
    assert decode(topic, encode(topic, msg)) == msg
    with pytest.raises(SchemaError) as info:
        encode(topic, msg, known_nodes={"gw1"})
    assert info.value.reason is Rejection.UNKNOWN_NODE
