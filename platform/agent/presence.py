"""Which node a service's traffic goes to, from the presences every node publishes (no I/O).

Each node keeps one retained presence per service (``nodes/<node>/services/<service>``). Of a
service's presences the one with the highest order ``(seq, node)`` wins, never the one that
arrived last: a node publishes one more than the highest ``seq`` it has seen for the service
(a Lamport clock), so a newer presence always outranks every one its publisher knew of, and
the greater node name breaks a tie the same way on every gateway. The winner's node gets the
traffic: it runs the service (``running``), holds its datagrams for an arriving copy
(``holding``), or is about to freeze it and still serves until the destination holds
(``moving``). A presence that loses is ignored (and reported once), unless losing is how a
migration goes: a ``moving`` presence outranked by the same migration's destination.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from fogmig.platform.agent.forwarding import Location
from fogmig.platform.bus.schemas import ServicePresence

Order = tuple[int, str]
NoticeKind = Literal["stale", "conflict", "older"]


def order(p: ServicePresence) -> Order:
    """The rank of a presence among those of its service: higher wins."""
    return (p.seq, p.node)


def location(p: ServicePresence) -> Location:
    """Where a winning presence sends the service's traffic: always its own node."""
    return Location(p.service, p.node, p.data_ip, p.port)


@dataclass(frozen=True, slots=True)
class Notice:
    """A presence that does not count, and why (for a log line)."""

    kind: NoticeKind
    """``stale``: another node's presence outranks it; ``conflict``: another node's has the
    same ``seq`` (the node names decided); ``older``: a lower ``seq`` than the presence its own
    topic already carries."""
    presence: ServicePresence
    winner: ServicePresence

    def __str__(self) -> str:
        p, w = self.presence, self.winner
        return (
            f"{self.kind} presence of {p.service} ignored: {p.state}@{p.node} seq {p.seq} "
            f"({p.migration_id or '-'}) loses to {w.state}@{w.node} seq {w.seq} "
            f"({w.migration_id or '-'})"
        )


NOTICED_KEPT = 1024


class PresenceBook:
    """The presences one node knows of, and the winner per service."""

    def __init__(self) -> None:
        self._by_topic: dict[tuple[str, str], ServicePresence] = {}  # (node, service) -> latest
        self._high: dict[str, int] = {}  # service -> highest seq ever seen (cleared ones too)
        # The latest NOTICED_KEPT notices (a dict as an ordered set): each is logged once.
        self._noticed: dict[tuple[NoticeKind, str, str, int], None] = {}
        self._pending: list[Notice] = []

    def put(self, p: ServicePresence) -> bool:
        """Take a presence from its node's topic; False if it changed nothing."""
        if not p.present:
            self._see(p.seq, p.service)
            return self.drop(p.node, p.service)
        key = (p.node, p.service)
        held = self._by_topic.get(key)
        self._see(p.seq, p.service)
        if held is not None and held.seq > p.seq:
            # A topic's presences only ever go up; a lower one is a late or replayed copy.
            self._notice("older", p, held)
            return False
        if held == p:
            return False
        self._by_topic[key] = p
        self._review(p.service)
        return True

    def drop(self, node: str, service: str) -> bool:
        """The node's topic for ``service`` was cleared; False if there was nothing."""
        if self._by_topic.pop((node, service), None) is None:
            return False
        self._review(service)
        return True

    def get(self, node: str, service: str) -> ServicePresence | None:
        return self._by_topic.get((node, service))

    def of(self, service: str) -> list[ServicePresence]:
        """Every presence of ``service``, highest order first."""
        found = [p for (_, s), p in self._by_topic.items() if s == service]
        return sorted(found, key=order, reverse=True)

    def winner(self, service: str) -> ServicePresence | None:
        found = self.of(service)
        return found[0] if found else None

    def services(self) -> set[str]:
        return {s for _, s in self._by_topic}

    def locations(self) -> dict[str, Location]:
        """Service -> where its traffic goes now."""
        out = {}
        for service in self.services():
            won = self.winner(service)
            if won is not None:
                out[service] = location(won)
        return out

    def next_seq(self, service: str) -> int:
        """The ``seq`` of a presence that outranks every one seen of ``service``."""
        return self._high.get(service, 0) + 1

    def notices(self) -> list[Notice]:
        """Presences newly found not to count (each reported once)."""
        out, self._pending = self._pending, []
        return out

    def _see(self, seq: int, service: str) -> None:
        self._high[service] = max(self._high.get(service, 0), seq)

    def _review(self, service: str) -> None:
        ranked = self.of(service)
        if not ranked:
            return
        won = ranked[0]
        for p in ranked[1:]:
            if p.seq == won.seq:
                self._notice("conflict", p, won)
            elif not superseded_in_course(p, won):
                self._notice("stale", p, won)

    def _notice(self, kind: NoticeKind, p: ServicePresence, winner: ServicePresence) -> None:
        key = (kind, p.node, p.service, p.seq)
        if key not in self._noticed:
            self._noticed[key] = None
            while len(self._noticed) > NOTICED_KEPT:
                del self._noticed[next(iter(self._noticed))]
            self._pending.append(Notice(kind, p, winner))

    def __iter__(self) -> Iterator[ServicePresence]:
        return iter(list(self._by_topic.values()))


def superseded_in_course(p: ServicePresence, winner: ServicePresence) -> bool:
    """``p`` loses to ``winner`` as a migration means it to: the source's ``moving`` presence
    outranked by its destination holding or running the service for the same migration."""
    return (
        p.state == "moving"
        and p.migration_id is not None
        and winner.migration_id == p.migration_id
        and winner.node == p.to
    )
