"""The controller's core: follows devices, relieves overloaded nodes and drains nodes.

:class:`ControllerCore` holds the registry and every decision as plain values (messages and a
clock reading in, actions out), so it is tested without a broker; the asyncio side that wires it
to the bus lives in ``fogmig.platform.controller.runner``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from fogmig.platform.base import fmt
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.bus.schemas import (
    DeviceAttach,
    MigrationDone,
    NodeStatus,
    ServicePresence,
)
from fogmig.platform.controller.actions import (
    Action,
    ControllerEvent,
    EventKind,
    InFlight,
    Launch,
    PendingMove,
)
from fogmig.platform.controller.config import OBJECTIVES, ControllerConfig, Trigger
from fogmig.platform.controller.decide import decide_move
from fogmig.platform.controller.registry import Registry
from fogmig.platform.migration.record import MigrationRecord
from fogmig.policies import placement

_TRIGGERS: Final[dict[placement.MoveReason, Trigger]] = {
    placement.MoveReason.FOLLOW_DEVICE: "mobility",
    placement.MoveReason.LOAD_BALANCE: "load",
    placement.MoveReason.DRAIN: "drain",
}


def _measured(record: MigrationRecord) -> dict[str, float | None]:
    return {
        "downtime_s": record.downtime_s,
        "total_time_s": record.total_time_s,
        "transferred_bytes": float(record.transferred_bytes),
    }


# A figure the decision did not predict reads "?" in the controller's lines.
_time = functools.partial(fmt.duration, missing="?")
_size = functools.partial(fmt.megabytes, missing="?")


def _compare(predicted: dict[str, Any], measured: dict[str, float | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, m in measured.items():
        p = predicted.get(key)
        p = float(p) if isinstance(p, int | float) else None
        out[key] = {
            "predicted": p,
            "measured": m,
            "error": None if p is None or m is None else m - p,
            "ratio": None if p is None or m is None or p == 0 else m / p,
        }
    return out


ENDED_KEPT = 4096
"""How many ended migrations the controller remembers to recognise a repeated end."""
MAX_SKEW_S = 30.0
"""A message dated further ahead of the controller's clock is refused: the registry orders
evidence by time, so it would outrank every later report."""
MAX_DEVICES = 10_000
"""Devices the controller follows at most; a new one beyond is refused (memory stays bounded)."""


class ControllerCore:
    """The controller's state and rules, without I/O.

    Feed it bus messages (``on_*``) and the outcome of the commands it asked for (``on_ack``,
    ``on_rejected``, ``on_send_failed``); call :meth:`tick` after each input and at
    :meth:`next_due`. Every call takes ``now`` (a monotonic clock reading) and returns actions:
    :class:`Launch` to send a command, :class:`ControllerEvent` to report.
    """

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
        self._draining: dict[str, bool] = {}  # node -> its emptiness was reported
        self._holds: dict[str, str] = {}
        # Migration ids whose MigrationDone was taken: an agent that restarts between
        # publishing the event and journaling that it did publishes it again.
        self._ended: dict[str, None] = {}

    # --- inputs ------------------------------------------------------------------------

    def _future(self, what: str, at: float, **data: Any) -> list[Action]:
        """A refusal if ``at`` is further ahead of the wall clock than the skew allowed."""
        ahead = at - self._wall()
        if ahead <= MAX_SKEW_S:
            return []
        return [
            self._event(
                EventKind.REFUSED,
                f"{what} refused: dated {ahead:.0f} s in the controller's future",
                **data,
            )
        ]

    def on_attach(self, msg: DeviceAttach, now: float) -> list[Action]:
        refused = self._future(f"attach of {msg.device}", msg.at, node=msg.gateway)
        if refused:
            return refused
        reg = self.registry
        if msg.device not in reg.attachments and len(reg.attachments) >= MAX_DEVICES:
            return self._hold(
                None,
                msg.gateway,
                f"device {msg.device} refused: the controller follows {MAX_DEVICES} devices",
            )
        change = self.registry.update_attach(msg, now)
        att = change.attachment
        if att is not None and change.moved:
            self._timer(now + self.config.debounce_s, "settle", att.device, att.generation)
        return []

    def on_status(self, msg: NodeStatus, now: float) -> list[Action]:
        refused = self._future(f"status of {msg.node}", msg.at, node=msg.node)
        if refused:
            return refused
        reg = self.registry
        change = reg.update_status(msg)
        if reg.nodes.get(msg.node) is not msg:
            return []  # older than what is known
        self._recheck |= change.listed
        if change.flipped(msg):
            self._recheck.update(reg.services_on(msg.node))
            self._recheck.update(
                a.service for a in reg.attachments.values() if a.gateway == msg.node
            )
        actions: list[Action] = []
        actions += self._watch_drain(msg, now)
        if msg.online and not msg.draining and msg.load > self.config.load_threshold:
            count = self._overload.get(msg.node, 0) + 1
            if count >= self.config.load_reports:
                count = 0  # the next evaluation waits for K more reports, so moves take effect
                actions += self._plan_load(msg.node, now)
            self._overload[msg.node] = count
        else:
            self._overload[msg.node] = 0
        return actions

    def on_status_cleared(self, node: str, now: float) -> list[Action]:
        self._recheck |= self.registry.forget_node(node)
        self._overload.pop(node, None)
        self._draining.pop(node, None)
        return []

    def on_presence(self, msg: ServicePresence, now: float) -> list[Action]:
        refused = self._future(
            f"presence of {msg.service} on {msg.node}", msg.at, service=msg.service, node=msg.node
        )
        if refused:
            return refused
        self.registry.update_presence(msg)
        self._recheck.add(msg.service)
        return []

    def on_ack(self, service: str, command_id: str, now: float) -> list[Action]:
        f = self.inflight.get(service)
        if f is None or f.command.command_id != command_id:
            return []  # its MigrationDone came first
        f.acked = True
        self._timer(now + self.config.done_timeout_s, "done", service, f.serial)
        return [
            self._event(
                EventKind.ACCEPTED,
                f"{f.source} accepted: {service} {f.source} -> {f.destination} "
                f"({f.command.technique})",
                service=service,
                node=f.source,
                command_id=command_id,
            )
        ]

    def on_rejected(self, service: str, command_id: str, reason: str, now: float) -> list[Action]:
        return self._failed(EventKind.REJECTED, service, command_id, reason, now)

    def on_send_failed(self, service: str, command_id: str, error: str, now: float) -> list[Action]:
        """The command could not be delivered or no acknowledgement came in time."""
        return self._failed(EventKind.SEND_FAILED, service, command_id, error, now)

    def on_done(self, msg: MigrationDone, now: float) -> list[Action]:
        if msg.migration_id in self._ended:
            return []  # the same end again (at least once delivery)
        self._ended[msg.migration_id] = None
        while len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        service = msg.service
        f = self.inflight.get(service)
        mine = f is not None and f.command.command_id == msg.command_id
        record = msg.record
        destination = f.destination if f is not None and mine else record.destination
        if msg.outcome is Outcome.COMPLETED:
            self.registry.note_moved(service, destination, self._wall())
        self._recheck.add(service)
        measured = _measured(record)
        if f is None or not mine:
            return [
                self._event(
                    EventKind.DONE,
                    f"{service}: migration {msg.migration_id} ({msg.command_id}) by "
                    f"{msg.node} ended {msg.outcome.value}; not one of this controller's",
                    service=service,
                    node=msg.node,
                    command_id=msg.command_id,
                    outcome=msg.outcome.value,
                    measured=measured,
                    foreign=True,
                )
            ]
        del self.inflight[service]
        predicted = dict(f.decision.predicted)
        comparison = _compare(predicted, measured)
        line = (
            f"{service} {f.source} -> {f.destination} {f.command.technique} "
            f"{msg.outcome.value} in {_time(measured['total_time_s'])}: downtime "
            f"{_time(measured['downtime_s'])} (predicted "
            f"{_time(comparison['downtime_s']['predicted'])}), total "
            f"{_time(measured['total_time_s'])} (predicted "
            f"{_time(comparison['total_time_s']['predicted'])}), "
            f"{_size(measured['transferred_bytes'])} (predicted "
            f"{_size(comparison['transferred_bytes']['predicted'])})"
        )
        if msg.error:
            line += f"; error: {msg.error}"
        actions: list[Action] = [
            self._event(
                EventKind.DONE,
                line,
                service=service,
                node=f.source,
                command_id=msg.command_id,
                migration_id=msg.migration_id,
                destination=f.destination,
                technique=f.command.technique,
                trigger=f.trigger,
                outcome=msg.outcome.value,
                comparison=comparison,
                error=msg.error,
            )
        ]
        if msg.outcome is Outcome.ROLLED_BACK:
            # The service is still at the source and the reason to move it still holds.
            actions += self._retry(f, now, EventKind.REJECTED, f"rolled back: {msg.error}")
        return actions + self._check_empty(f.source)

    # --- the clock ---------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When :meth:`tick` has work next (``None``: only a new input can create work)."""
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> list[Action]:
        """Settle debounced attachments, re-evaluate what changed, launch what may start."""
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, key, generation = heapq.heappop(self._timers)
            if kind == "settle":
                att = self.registry.attachments.get(key)
                if att is not None and att.generation == generation and not att.settled:
                    att.settled = True
                    self._recheck.add(att.service)
            elif kind == "done":
                actions += self._lost(key, generation, now)
        if self._recheck:
            for service in sorted(self._recheck):
                if service not in self.inflight:
                    self._recheck.discard(service)
                    actions += self._follow(service, now)
        for service, move in list(self.pending.items()):
            if move.not_before <= now and service not in self.inflight:
                actions += self._start(move, now)
        return actions

    # --- triggers ----------------------------------------------------------------------

    def _follow(self, service: str, now: float) -> list[Action]:
        """Mobility: the service should run where its device is attached."""
        reg = self.registry
        att = reg.device_of(service)
        if att is None or not att.settled:
            return []
        location = reg.location(service)
        if location is None:
            return self._hold(
                service,
                None,
                f"device {att.device} is on {att.gateway}, but where {service} runs is unknown",
            )
        info = reg.service_info(service, location)
        where = placement.ServicePlacement(
            service=service,
            node=location,
            mem_bytes=info.state_bytes if info is not None else 0,
            device=att.device,
        )
        result = placement.follow_device(
            where, att.gateway, reg.node_snapshot(), policy=self._policy
        )
        if isinstance(result, placement.MoveRequest):
            return self._enqueue(result, now)
        queued = self.pending.get(service)
        if queued is not None and queued.trigger == "mobility":
            del self.pending[service]  # the device came back, or its gateway cannot take it
        if location == att.gateway:
            self._holds.pop(service, None)
            return []
        return self._hold(service, location, result.detail)

    def _pinned(self) -> set[str]:
        """Services on the gateway of their device: moving them for load would only make
        mobility move them back."""
        reg = self.registry
        return {
            a.service
            for a in reg.attachments.values()
            if a.settled and reg.location(a.service) == a.gateway
        }

    def _plan_load(self, node: str, now: float) -> list[Action]:
        busy = frozenset(set(self.inflight) | set(self.pending) | self._pinned())
        actions: list[Action] = []
        results = placement.balance_load(
            self.registry.node_snapshot(),
            self.registry.placements(),
            policy=self._policy,
            busy=busy,
        )
        for r in results:
            if isinstance(r, placement.MoveRequest) and r.source == node:
                actions += self._enqueue(r, now)
            elif isinstance(r, placement.Hold) and r.node == node:
                actions += self._hold(None, node, r.detail)
        return actions

    def _watch_drain(self, msg: NodeStatus, now: float) -> list[Action]:
        node = msg.node
        actions: list[Action] = []
        if not msg.draining:
            if node in self._draining and msg.online:
                del self._draining[node]
                actions.append(
                    self._event(EventKind.DRAIN_ENDED, f"{node} is no longer draining", node=node)
                )
            return actions
        if node not in self._draining:
            self._draining[node] = False
            names = [s.name for s in msg.services]
            actions.append(
                self._event(
                    EventKind.DRAIN_STARTED,
                    f"{node} is draining: moving {len(names)} service(s) off it",
                    node=node,
                    services=names,
                )
            )
        if msg.services:
            self._draining[node] = False
            actions += self._plan_drain(node, now)
        return actions + self._check_empty(node)

    def _check_empty(self, node: str) -> list[Action]:
        """Say once that a draining node is empty: it reports no service and none is leaving."""
        status = self.registry.nodes.get(node)
        if (
            status is None
            or self._draining.get(node, True)
            or status.services
            or any(f.source == node for f in self.inflight.values())
        ):
            return []
        self._draining[node] = True
        return [
            self._event(EventKind.NODE_EMPTY, f"{node} is empty and ready to power down", node=node)
        ]

    def _plan_drain(self, node: str, now: float) -> list[Action]:
        reg = self.registry
        results = placement.drain(
            node,
            reg.node_snapshot(),
            reg.placements(),
            policy=self._policy,
            busy=frozenset(self.inflight),
        )
        actions: list[Action] = []
        for r in results:
            if isinstance(r, placement.MoveRequest):
                actions += self._enqueue(r, now)
            elif r.service not in self.inflight:
                actions += self._hold(r.service, node, r.detail)
        return actions

    # --- the queue ---------------------------------------------------------------------

    def _enqueue(self, move: placement.MoveRequest, now: float) -> list[Action]:
        service, trigger = move.service, _TRIGGERS[move.reason]
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

    def _busy_nodes(self) -> dict[str, int]:
        count: dict[str, int] = {}
        for f in self.inflight.values():
            for n in (f.source, f.destination):
                count[n] = count.get(n, 0) + 1
        return count

    def _start(self, move: PendingMove, now: float) -> list[Action]:
        reg, cfg = self.registry, self.config
        service, target = move.service, move.target
        source = reg.location(service)
        if source is None:
            del self.pending[service]
            return self._hold(service, None, f"cannot move {service}: where it runs is unknown")
        if source == target:
            del self.pending[service]
            self._holds.pop(service, None)
            return []
        src, dst = reg.nodes.get(source), reg.nodes.get(target)
        why = None
        if src is None or not src.online:
            why = f"its node {source} is {'offline' if src else 'not reporting'}"
        elif dst is None or not dst.online:
            why = f"{target} is {'offline' if dst else 'not reporting'}"
        elif dst.draining:
            why = f"{target} is draining"
        if why is not None or src is None or dst is None:
            del self.pending[service]
            return self._hold(service, source, f"cannot move {service} to {target}: {why}")
        busy = self._busy_nodes()
        limit = cfg.max_migrations_per_node
        if busy.get(source, 0) >= limit or busy.get(target, 0) >= limit:
            return []  # waits for a migration on the same node to finish
        try:
            command, decision, choice = decide_move(
                move,
                source,
                src,
                dst,
                info=reg.service_info(service, source),
                config=cfg,
                objective=self._objective,
                new_id=self._new_id,
                wall=self._wall,
            )
        except (FogmigError, ValueError, ArithmeticError) as exc:  # a policy's or a model's
            del self.pending[service]
            return self._hold(service, source, f"cannot decide how to move {service}: {exc}")
        technique = command.technique
        del self.pending[service]
        self._holds.pop(service, None)
        self.inflight[service] = InFlight(
            serial=next(self._serial),
            source=source,
            command=command,
            decision=decision,
            trigger=move.trigger,
            detail=move.detail,
            attempts=move.attempts,
            sent_at=now,
        )
        p = choice.prediction
        event = self._event(
            EventKind.DECISION,
            f"{move.trigger}: {service} {source} -> {target} by {technique} "
            f"(predicted downtime {_time(p.downtime)}, total {_time(p.total_time)}, "
            f"{_size(p.transferred_bytes)}): {move.detail}",
            service=service,
            node=source,
            command_id=command.command_id,
            attempt=move.attempts + 1,
            decision=decision.model_dump(mode="json"),
            choice=choice.to_dict(),
        )
        return [Launch(source, command, decision), event]

    def _failed(
        self, kind: EventKind, service: str, command_id: str, why: str, now: float
    ) -> list[Action]:
        f = self.inflight.get(service)
        if f is None or f.command.command_id != command_id:
            return []
        del self.inflight[service]
        return self._retry(f, now, kind, why)

    def _retry(self, f: InFlight, now: float, kind: EventKind, why: str) -> list[Action]:
        service = f.command.service
        attempts = f.attempts + 1
        common: dict[str, Any] = {
            "service": service,
            "node": f.source,
            "command_id": f.command.command_id,
            "destination": f.destination,
            "attempts": attempts,
            "reason": why,
        }
        what = f"{service} {f.source} -> {f.destination}"
        if attempts >= self.config.max_attempts:
            self.pending.pop(service, None)
            return [
                self._event(
                    EventKind.GAVE_UP,
                    f"{what}: gave up after {attempts} attempts; last: {why}",
                    **common,
                )
            ]
        delay = self.config.retry_delay(attempts)
        queued = self.pending.get(service)
        if queued is None:
            queued = PendingMove(service, f.destination, f.trigger, f.detail, now)
            self.pending[service] = queued
        queued.not_before = max(queued.not_before, now + delay)
        queued.attempts = max(queued.attempts, attempts)
        self._timer(queued.not_before, "wake", service, 0)
        return [
            self._event(kind, f"{what}: {why}; retry in {delay:g} s", retry_in_s=delay, **common)
        ]

    def _lost(self, service: str, serial: int, now: float) -> list[Action]:
        f = self.inflight.get(service)
        if f is None or f.serial != serial:
            return []
        del self.inflight[service]
        self._recheck.add(service)
        return [
            self._event(
                EventKind.LOST,
                f"{service} {f.source} -> {f.destination}: no MigrationDone within "
                f"{self.config.done_timeout_s:g} s; the controller stops waiting for it",
                service=service,
                node=f.source,
                command_id=f.command.command_id,
            )
        ]

    # --- helpers -----------------------------------------------------------------------

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
