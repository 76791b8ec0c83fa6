"""What a simulated device observes: requests, moves, outages, continuity checks, migrations.

Plain frozen values; the fleet hands each to its ``on_event`` callback as it happens and
writes them out (requests to the timeline CSV, the rest as JSON lines).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias

from fogmig.platform.base.vocabulary import Outcome, Technique


class RequestOutcome(StrEnum):
    """How a request ended: a 2.xx answer, no answer in time, or an error (code or network)."""

    OK = "ok"
    TIMEOUT = "timeout"
    ERROR = "error"


class RequestKind(StrEnum):
    POST = "post"  # a reading to /sensor
    STATE = "state"  # GET /state: a baseline or a continuity check


NETWORK_ERROR = "network"
"""The ``code`` of a request that failed below CoAP (e.g. an ICMP port unreachable)."""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One CoAP request of one device (one row of the timeline)."""

    kind_name: ClassVar[str] = "request"

    device: str
    request: RequestKind
    seq: int | None
    attempt: int
    """1 for the first send of ``seq``; a retry of the same reading counts up."""
    service: str
    gateway: str
    address: str
    port: int
    sent_at: float
    """UNIX time the request left."""
    latency_s: float
    """Until the answer came, or until the device gave up (a timeout)."""
    outcome: RequestOutcome
    code: str = ""
    """CoAP code ``"c.dd"``, :data:`NETWORK_ERROR`, or empty for a timeout."""
    applied: bool | None = None
    """For an acknowledged reading: whether this request applied it (False: a repeat)."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is RequestOutcome.OK

    @property
    def answered_at(self) -> float | None:
        return self.sent_at + self.latency_s if self.code and self.code != NETWORK_ERROR else None


@dataclass(frozen=True, slots=True)
class Roam:
    """The device moved from one gateway to another (and said so on the bus, if ``published``)."""

    kind_name: ClassVar[str] = "roam"

    device: str
    service: str
    at: float
    from_gateway: str | None
    to_gateway: str
    published: bool


@dataclass(frozen=True, slots=True)
class Outage:
    """A gap in a device's good answers: the last good one before it, the first after it."""

    kind_name: ClassVar[str] = "outage"

    device: str
    service: str
    last_ok_at: float
    first_ok_at: float
    failed: int
    """Requests in between that got no good answer."""
    gateway_before: str
    gateway_after: str

    @property
    def downtime_s(self) -> float:
        return self.first_ok_at - self.last_ok_at


@dataclass(frozen=True, slots=True)
class ContinuityCheck:
    """The device's ledger held against the service's ``/state``.

    ``verified`` is None when the state could not be read; otherwise ``matches`` tells whether
    the service holds exactly what the device had acknowledged (``lost`` and ``doubled`` say
    how it differs).
    """

    kind_name: ClassVar[str] = "check"

    device: str
    service: str
    gateway: str
    at: float
    reason: str
    verified: bool
    matches: bool = False
    expected_count: int = 0
    service_count: int = 0
    lost: int = 0
    doubled: int = 0
    unacknowledged_applied: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class MigrationSeen:
    """A migration of a service some device uses, as its node reported it on the bus."""

    kind_name: ClassVar[str] = "migration"

    migration_id: str
    service: str
    technique: Technique
    source: str
    destination: str
    outcome: Outcome
    started_at: float
    finished_at: float
    downtime_s: float
    """The platform's downtime (the paper's: dump + dump transfer + resume)."""
    total_time_s: float


FleetEvent: TypeAlias = RequestRecord | Roam | Outage | ContinuityCheck | MigrationSeen


def event_dict(event: FleetEvent) -> dict[str, Any]:
    """A JSON-ready dict of ``event`` with its ``kind``."""
    out: dict[str, Any] = {"kind": event.kind_name, **dataclasses.asdict(event)}
    if isinstance(event, Outage):
        out["downtime_s"] = round(event.downtime_s, 6)
    return out
