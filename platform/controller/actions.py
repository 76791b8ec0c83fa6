"""What the controller's core hands back and keeps: events, launches and its move queue.

:class:`ControllerEvent` and :class:`Launch` are the core's outputs (an :data:`Action` each);
:class:`PendingMove` and :class:`InFlight` are the moves it waits to start or to see finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from fogmig.platform.bus.schemas import Decision, MigrateCommand
from fogmig.platform.controller.config import Trigger


class EventKind(StrEnum):
    """What a :class:`ControllerEvent` reports."""

    DECISION = "decision"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    SEND_FAILED = "send_failed"
    GAVE_UP = "gave_up"
    DONE = "done"
    LOST = "lost"
    HOLD = "hold"
    DRAIN_STARTED = "drain_started"
    DRAIN_ENDED = "drain_ended"
    NODE_EMPTY = "node_empty"
    PROGRESS = "progress"
    REFUSED = "refused"
    """A message the controller does not take: dated in its future, or one device too many."""
    RESUMED = "resumed"
    """The controller took the state it saved before it stopped."""
    STATE_REJECTED = "state_rejected"
    """The saved state was corrupt or of another site: set aside, the controller starts empty."""


WARNINGS: Final = frozenset(
    {
        EventKind.REJECTED,
        EventKind.SEND_FAILED,
        EventKind.GAVE_UP,
        EventKind.LOST,
        EventKind.REFUSED,
        EventKind.STATE_REJECTED,
    }
)
"""Kinds the controller logs as warnings (the rest at INFO, holds at DEBUG)."""


@dataclass(frozen=True, slots=True)
class ControllerEvent:
    """Something the controller decided or saw, for the log, the decision file and a live view."""

    kind: EventKind
    at: float
    message: str
    service: str | None = None
    node: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "event": self.kind.value,
            "service": self.service,
            "node": self.node,
            "message": self.message,
            **self.data,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


@dataclass(frozen=True, slots=True)
class Launch:
    """Send ``command`` to ``source`` (and publish ``decision`` first)."""

    source: str
    command: MigrateCommand
    decision: Decision
    resend: bool = False
    """The same command again, after a restart of the controller: its decision was published
    already, and an agent that took it refuses it as a replay."""


Action = Launch | ControllerEvent


@dataclass(slots=True)
class PendingMove:
    """A move waiting for its turn: the service's current migration, a node's capacity or a
    retry's backoff. A newer move of the same service replaces its target."""

    service: str
    target: str
    trigger: Trigger
    detail: str
    not_before: float
    attempts: int = 0


@dataclass(slots=True)
class InFlight:
    """A migration command sent and not finished."""

    serial: int
    source: str
    command: MigrateCommand
    decision: Decision
    trigger: Trigger
    detail: str
    attempts: int
    sent_at: float
    acked: bool = False
    resumed: bool = False
    """Sent by this controller before it restarted: its MigrationDone may have gone by."""
    acked_wall: float = 0.0
    """Wall clock when the source took the command (or when the controller resumed)."""
    ended_seen: float | None = None
    """When the source's status first showed no migration of the service under way."""

    @property
    def destination(self) -> str:
        return self.command.destination
