"""What every part of the controller's core shares: its state, timers, holds and events.

:class:`CoreBasis` holds the registry, the move queue and the bookkeeping the rules read and
write; ``planning`` (where services should go), ``launching`` (starting, retrying and losing
moves) and ``core`` (the inputs and the clock) add behaviour on it. No I/O.
"""

from __future__ import annotations

import heapq
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from fogmig.platform.controller.actions import (
    Action,
    ControllerEvent,
    EventKind,
    InFlight,
    PendingMove,
)
from fogmig.platform.controller.config import OBJECTIVES, ControllerConfig, Trigger
from fogmig.platform.controller.registry import Attachment, Registry
from fogmig.policies import placement

TRIGGERS: Final[dict[placement.MoveReason, Trigger]] = {
    placement.MoveReason.FOLLOW_DEVICE: "mobility",
    placement.MoveReason.LOAD_BALANCE: "load",
    placement.MoveReason.DRAIN: "drain",
}
"""The trigger a decision names for each reason the placement policies give."""
ENDED_KEPT = 4096
"""How many ended migrations the controller remembers to recognise a repeated end."""


class CoreBasis:
    """The controller core's state and the small steps every rule uses."""

    def __init__(
        self,
        config: ControllerConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.config = config
        self.registry = Registry()
        self.pending: dict[str, PendingMove] = {}
        self.inflight: dict[str, InFlight] = {}
        self._wall = wall_clock
        self._new_id = new_id or (lambda: uuid.uuid4().hex[:12])
        self._objective = OBJECTIVES[config.objective]()
        self._policy = placement.LoadPolicy(
            high_watermark=config.load_threshold,
            low_watermark=config.load_target,
            mem_reserve_bytes=config.mem_reserve_bytes,
        )
        # (due, sequence, kind, key, generation); stale entries are skipped when they fire.
        self._timers: list[tuple[float, int, str, str, int]] = []
        self._seq = itertools.count()
        self._serial = itertools.count(1)
        self._recheck: set[str] = set()
        self._overload: dict[str, int] = {}
        self.draining: dict[str, bool] = {}
        """Nodes seen draining -> whether their emptiness was reported."""
        self._holds: dict[str, str] = {}
        # Migration ids whose MigrationDone was taken: an agent that restarts between
        # publishing the event and journaling that it did publishes it again.
        self._ended: dict[str, None] = {}

    def wall(self) -> float:
        """The wall clock the core stamps events and decisions with."""
        return self._wall()

    def next_serial(self) -> int:
        return next(self._serial)

    def ended_ids(self) -> list[str]:
        """Ids of the migrations whose end was taken, oldest first."""
        return list(self._ended)

    def remember_ended(self, ids: list[str]) -> None:
        for mid in ids:
            self._ended[mid] = None
        while len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]

    def arm_done(self, flight: InFlight, now: float) -> None:
        """Give up waiting for an accepted migration ``done_timeout_s`` after it was sent."""
        due = max(now, flight.sent_at + self.config.done_timeout_s)
        self._timer(due, "done", flight.command.service, flight.serial)

    def arm_settle(self, att: Attachment, now: float) -> None:
        """Settle ``att`` once it has stayed ``debounce_s`` on its gateway."""
        due = max(now, att.since + self.config.debounce_s)
        self._timer(due, "settle", att.device, att.generation)

    def _timer(self, due: float, kind: str, key: str, generation: int) -> None:
        heapq.heappush(self._timers, (due, next(self._seq), kind, key, generation))

    def _hold(self, service: str | None, node: str | None, detail: str) -> list[Action]:
        key = service if service is not None else f"node:{node}"
        if self._holds.get(key) == detail:
            return []
        self._holds[key] = detail
        return [self._event(EventKind.HOLD, detail, service=service, node=node)]

    def _event(
        self,
        kind: EventKind,
        message: str,
        *,
        service: str | None = None,
        node: str | None = None,
        **data: Any,
    ) -> ControllerEvent:
        return ControllerEvent(kind, self._wall(), message, service, node, data)

    def _enqueue(self, move: placement.MoveRequest, now: float) -> list[Action]:
        service, trigger = move.service, TRIGGERS[move.reason]
        f = self.inflight.get(service)
        if f is not None and f.destination == move.target:
            self.pending.pop(service, None)
            return []
        queued = self.pending.get(service)
        if queued is not None:
            # Coalesce: the latest target wins; a retry's backoff still applies.
            queued.target, queued.trigger, queued.detail = move.target, trigger, move.detail
            return []
        self.pending[service] = PendingMove(service, move.target, trigger, move.detail, now)
        return []
