"""The fog controller: follows devices, relieves overloaded nodes and drains nodes by migrating.

:class:`ControllerCore` holds the registry and every decision as plain values (messages and a
clock reading in, actions out), so it is tested without a broker; :class:`Controller` wires it
to the bus, sends the commands, and writes the JSON-lines decision log.

Log levels: INFO decisions, accepted commands, finished migrations (predicted against measured),
drains; WARNING rejected or unanswered commands, rollbacks, migrations given up or lost;
DEBUG holds (a move that cannot happen now, and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final, Literal

from fogmig.platform.base.errors import BusError, ConfigError, FogmigError
from fogmig.platform.bus.client import Bus, CommandRejectedError, Subscription
from fogmig.platform.bus.schemas import (
    BusMessage,
    Cleared,
    Decision,
    DeviceAttach,
    MigrateCommand,
    MigrationDone,
    MigrationProgress,
    NodeStatus,
    PrecopyRules,
    ServicePresence,
    TopicKind,
    topics,
)
from fogmig.platform.controller.registry import Registry
from fogmig.platform.migration.record import Outcome, Technique
from fogmig.policies import placement
from fogmig.policies.choice import Decision as TechniqueDecision
from fogmig.policies.choice import choose_technique
from fogmig.policies.conditions import (
    LinkConditions,
    NodeCapabilities,
    Objective,
    PrecopyStopRules,
    ServiceConditions,
)
from fogmig.policies.conditions import Technique as PolicyTechnique
from fogmig.policies.costmodel import Prediction

log = logging.getLogger(__name__)

Trigger = Literal["mobility", "load", "drain"]
ObjectiveName = Literal["downtime", "total", "bytes"]

OBJECTIVES: Final[dict[str, Callable[[], Objective]]] = {
    "downtime": Objective.least_downtime,
    "total": Objective.least_total_time,
    "bytes": Objective.least_bytes,
}

_TRIGGERS: Final[dict[placement.MoveReason, Trigger]] = {
    placement.MoveReason.FOLLOW_DEVICE: "mobility",
    placement.MoveReason.LOAD_BALANCE: "load",
    placement.MoveReason.DRAIN: "drain",
}

_WIRE_TECHNIQUE: Final[dict[PolicyTechnique, Technique]] = {
    PolicyTechnique.COLD: "cold",
    PolicyTechnique.PRECOPY: "precopy",
    PolicyTechnique.POSTCOPY: "postcopy",
    PolicyTechnique.HYBRID: "hybrid",
}

_TEXT_MAX = 4096  # the bus's limit for free text


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerConfig:
    """How the controller decides; every field has a working default."""

    debounce_s: float = 1.5
    """An attachment must stay on one gateway this long before its service follows it."""
    load_threshold: float = 0.8
    """A node above this load (fraction of capacity) for ``load_reports`` reports in a row is
    overloaded."""
    load_target: float = 0.6
    """A node taking a service for load reasons must stay at or below this load afterwards."""
    load_reports: int = 3
    objective: ObjectiveName = "downtime"
    default_link: LinkConditions = field(
        default_factory=lambda: LinkConditions.from_mbit(11.34, 122.95)
    )
    """The data link assumed between two nodes that have not measured it (the profile's)."""
    default_state_bytes: int = 4 << 20
    """State size assumed for a service its node does not (yet) report."""
    stop_rules: PrecopyStopRules = field(default_factory=PrecopyStopRules)
    compression: bool = False
    mem_reserve_bytes: int = 64 << 20
    max_migrations_per_node: int = 1
    """Migrations one node takes part in at once (as source or destination): the cost model
    assumes a migration has the data link to itself."""
    ack_timeout_s: float = 10.0
    done_timeout_s: float = 900.0
    """An accepted migration with no MigrationDone after this long is given up as lost."""
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    max_attempts: int = 8
    decision_log: Path | None = None

    def __post_init__(self) -> None:
        if self.debounce_s < 0:
            raise ConfigError(f"debounce must be >= 0 s, got {self.debounce_s}")
        if not 0 <= self.load_target < self.load_threshold:
            raise ConfigError(
                f"need 0 <= load target ({self.load_target}) < load threshold "
                f"({self.load_threshold})"
            )
        if self.load_reports < 1 or self.max_attempts < 1 or self.max_migrations_per_node < 1:
            raise ConfigError("load_reports, max_attempts and max_migrations_per_node must be >= 1")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}"
            )
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ConfigError("need 0 < retry_initial_s <= retry_max_s")
        if self.ack_timeout_s <= 0 or self.done_timeout_s <= 0:
            raise ConfigError("timeouts must be > 0")

    def retry_delay(self, attempts: int) -> float:
        """The pause before attempt ``attempts + 1`` (exponential, capped)."""
        return float(min(self.retry_max_s, self.retry_initial_s * 2.0 ** max(attempts - 1, 0)))


# --- actions ------------------------------------------------------------------------------


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


_WARNINGS = frozenset(
    {EventKind.REJECTED, EventKind.SEND_FAILED, EventKind.GAVE_UP, EventKind.LOST}
)


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

    @property
    def destination(self) -> str:
        return self.command.destination


def _caps(status: NodeStatus) -> NodeCapabilities:
    return NodeCapabilities(
        postcopy=status.capabilities.postcopy,
        native_predump=status.capabilities.native_predump,
    )


def _numbers(p: Prediction) -> dict[str, float]:
    return {
        "downtime_s": p.downtime,
        "total_time_s": p.total_time,
        "transferred_bytes": float(p.transferred_bytes),
    }


def _measured(record: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("downtime_s", "total_time_s", "transferred_bytes"):
        value = record.get(key)
        out[key] = float(value) if isinstance(value, int | float) else None
    return out


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


def _fmt_time(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:.2f} s" if x >= 1 else f"{x * 1000:.0f} ms"


def _fmt_bytes(x: float | None) -> str:
    return "?" if x is None else f"{x / 1e6:.1f} MB"


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 3] + "..."


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

    # --- inputs ------------------------------------------------------------------------

    def on_attach(self, msg: DeviceAttach, now: float) -> list[Action]:
        change = self.registry.update_attach(msg, now)
        att = change.attachment
        if att is not None and change.moved:
            self._timer(now + self.config.debounce_s, "settle", att.device, att.generation)
        return []

    def on_status(self, msg: NodeStatus, now: float) -> list[Action]:
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
        self.registry.update_presence(msg)
        self._recheck.add(msg.service)
        return []

    def on_presence_cleared(self, node: str, service: str, now: float) -> list[Action]:
        self.registry.clear_presence(node, service)
        self._recheck.add(service)
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
        service = msg.service
        f = self.inflight.get(service)
        mine = f is not None and f.command.command_id == msg.command_id
        record: dict[str, Any] = dict(msg.record)
        destination = f.destination if f is not None and mine else record.get("destination")
        if msg.outcome is Outcome.COMPLETED and isinstance(destination, str):
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
            f"{msg.outcome.value} in {_fmt_time(measured['total_time_s'])}: downtime "
            f"{_fmt_time(measured['downtime_s'])} (predicted "
            f"{_fmt_time(comparison['downtime_s']['predicted'])}), total "
            f"{_fmt_time(measured['total_time_s'])} (predicted "
            f"{_fmt_time(comparison['total_time_s']['predicted'])}), "
            f"{_fmt_bytes(measured['transferred_bytes'])} (predicted "
            f"{_fmt_bytes(comparison['transferred_bytes']['predicted'])})"
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
            command, decision, choice = self._decide(move, source, src, dst)
        except (FogmigError, ValueError) as exc:  # a policy's or a model's validation error
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
            f"(predicted downtime {_fmt_time(p.downtime)}, total {_fmt_time(p.total_time)}, "
            f"{_fmt_bytes(p.transferred_bytes)}): {move.detail}",
            service=service,
            node=source,
            command_id=command.command_id,
            attempt=move.attempts + 1,
            decision=decision.model_dump(mode="json"),
            choice=choice.to_dict(),
        )
        return [Launch(source, command, decision), event]

    def _decide(
        self, move: PendingMove, source: str, src: NodeStatus, dst: NodeStatus
    ) -> tuple[MigrateCommand, Decision, TechniqueDecision]:
        """The technique for ``move`` and the command and decision that carry it."""
        reg, cfg = self.registry, self.config
        service, target = move.service, move.target
        info = reg.service_info(service, source)
        conditions = ServiceConditions(
            state_bytes=info.state_bytes if info is not None else cfg.default_state_bytes,
            dirty_rate_bytes_per_s=info.dirty_rate_bytes_per_s if info is not None else 0.0,
        )
        link, link_source = cfg.default_link, "profile"
        for m in src.links:
            if m.peer == target and m.throughput_bytes_per_s > 0:
                link = LinkConditions(
                    throughput_bytes_per_s=m.throughput_bytes_per_s, rtt_s=m.rtt_s
                )
                link_source = "measured"
        choice = choose_technique(
            conditions, link, _caps(src), _caps(dst), self._objective, cfg.stop_rules
        )
        reason = _clip(f"{move.detail}; {choice.reason}")
        predicted: dict[str, Any] = {
            **_numbers(choice.prediction),
            "objective": self._objective.name,
            "ranking": [t.value for t in choice.ranking],
            "alternatives": {t.value: _numbers(p) for t, p in choice.predictions.items()},
            "excluded": {t.value: why for t, why in choice.excluded.items()},
            "inputs": {
                **conditions.to_dict(),
                **link.to_dict(),
                "link_source": link_source,
                "service_source": "status" if info is not None else "default",
            },
        }
        technique = _WIRE_TECHNIQUE[choice.technique]
        rules = cfg.stop_rules
        command = MigrateCommand(
            command_id=self._new_id(),
            service=service,
            destination=target,
            technique=technique,
            compression=cfg.compression,
            precopy=PrecopyRules(
                max_rounds=min(rules.max_rounds, 100),
                min_changed_bytes=rules.min_changed_bytes,
                stop_when_not_shrinking=rules.stop_when_not_shrinking,
            ),
            reason=reason,
        )
        decision = Decision(
            service=service,
            source=source,
            destination=target,
            technique=technique,
            reason=reason,
            predicted=predicted,
            trigger=move.trigger,
            at=self._wall(),
        )
        return command, decision, choice

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


# --- the asyncio side ---------------------------------------------------------------------

EventCallback = Callable[[ControllerEvent], None]


@dataclass(slots=True)
class ControllerStats:
    """Counters of what the controller has processed (for the benchmark and a live view)."""

    attach_events: int = 0
    status_events: int = 0
    presence_events: int = 0
    done_events: int = 0
    decisions: int = 0
    accepted: int = 0
    rejected: int = 0
    send_failed: int = 0
    dropped: int = 0
    """Messages the bus dropped because the controller did not keep up."""

    def to_dict(self) -> dict[str, int]:
        return {
            "attach_events": self.attach_events,
            "status_events": self.status_events,
            "presence_events": self.presence_events,
            "done_events": self.done_events,
            "decisions": self.decisions,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "send_failed": self.send_failed,
            "dropped": self.dropped,
        }


class _Stopped(Exception):
    """Ends the controller's task group on a requested stop."""


class Controller:
    """The controller on a bus: ``await Controller(config, bus).run(stop)``.

    ``on_event`` receives every :class:`ControllerEvent` (decisions, outcomes, holds, drain
    progress and migration progress) for a live view; ``ready`` is set once the subscriptions
    are in place.
    """

    def __init__(
        self,
        config: ControllerConfig,
        bus: Bus,
        *,
        on_event: EventCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.bus = bus
        self.core = ControllerCore(config, wall_clock=wall_clock)
        self.stats = ControllerStats()
        self.ready = asyncio.Event()
        self._on_event = on_event
        self._clock = clock
        self._wall = wall_clock
        self._wake = asyncio.Event()
        self._sleep_until: float | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._log_file: IO[str] | None = None
        self._subs: list[Subscription] = []
        self._halt = asyncio.Event()
        self._error: FogmigError | None = None

    def counters(self) -> dict[str, int]:
        """The counters now, including messages the bus had to drop so far."""
        if self._subs:
            self.stats.dropped = sum(s.dropped for s in self._subs)
        return self.stats.to_dict()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises :class:`BusError` if the bus closes under it."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.config.decision_log is not None:
                    path = self.config.decision_log
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._log_file = stack.enter_context(path.open("a", buffering=1))
                # Status and presence first: their retained messages give the picture the
                # first attach events are judged against.
                for pattern in (
                    topics.status(),
                    topics.service(),
                    topics.events(),
                    topics.attach(),
                ):
                    sub = await stack.enter_async_context(self.bus.subscribe(pattern))
                    self._subs.append(sub)
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    for sub in self._subs:
                        tg.create_task(self._read(sub, stop), name=f"controller:{sub.pattern}")
                    tg.create_task(self._clock_loop(), name="controller:clock")
                    stopped = tg.create_task(stop.wait())
                    halted = tg.create_task(self._halt.wait())
                    self.ready.set()
                    await asyncio.wait({stopped, halted}, return_when=asyncio.FIRST_COMPLETED)
                    raise _Stopped
        except* _Stopped:
            pass
        finally:
            self._tg = None
            self.stats.dropped = sum(s.dropped for s in self._subs)
            self._subs.clear()
            self._log_file = None
        if self._error is not None:
            raise self._error

    # --- input -------------------------------------------------------------------------

    async def _read(self, sub: Subscription, stop: asyncio.Event) -> None:
        async for topic, msg in sub:
            now = self._clock()
            try:
                actions = self._dispatch(topic, msg, now)
                actions += self.core.tick(now)
            except FogmigError as exc:
                log.warning("controller: could not handle %s: %s", topic, exc)
                continue
            self._apply(actions)
            self._rearm()
        if not stop.is_set() and self._error is None:
            self._error = BusError("the bus closed under the controller")
            self._halt.set()

    def _dispatch(self, topic: str, msg: BusMessage | Cleared, now: float) -> list[Action]:
        core, stats = self.core, self.stats
        match msg:
            case DeviceAttach():
                stats.attach_events += 1
                return core.on_attach(msg, now)
            case NodeStatus():
                stats.status_events += 1
                return core.on_status(msg, now)
            case ServicePresence():
                stats.presence_events += 1
                return core.on_presence(msg, now)
            case MigrationDone():
                stats.done_events += 1
                return core.on_done(msg, now)
            case MigrationProgress():
                self._emit(
                    ControllerEvent(
                        EventKind.PROGRESS,
                        self._wall(),
                        f"{msg.service}: {msg.phase} {msg.bytes_done}/{msg.bytes_total} B",
                        msg.service,
                        msg.node,
                        msg.model_dump(mode="json"),
                    )
                )
            case Cleared(ref) if ref.kind is TopicKind.STATUS and ref.node is not None:
                return core.on_status_cleared(ref.node, now)
            case Cleared(ref) if ref.node is not None and ref.service is not None:
                stats.presence_events += 1
                return core.on_presence_cleared(ref.node, ref.service, now)
            case _:
                pass
        return []

    # --- output ------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Launch):
                self.stats.decisions += 1
                assert self._tg is not None
                self._tg.create_task(self._send(action), name=f"send:{action.command.service}")
            else:
                self._emit(action)

    async def _send(self, launch: Launch) -> None:
        cmd = launch.command
        assert self._tg is not None
        # Published alongside, not before: the command must not wait for the decision's PUBACK.
        self._tg.create_task(self._publish_decision(launch.decision))
        try:
            await self.bus.request(launch.source, cmd, self.config.ack_timeout_s)
        except CommandRejectedError as exc:
            self.stats.rejected += 1
            actions = self.core.on_rejected(
                cmd.service, cmd.command_id, exc.ack.reason or "no reason given", self._clock()
            )
        except FogmigError as exc:
            self.stats.send_failed += 1
            actions = self.core.on_send_failed(cmd.service, cmd.command_id, str(exc), self._clock())
        else:
            self.stats.accepted += 1
            actions = self.core.on_ack(cmd.service, cmd.command_id, self._clock())
        actions += self.core.tick(self._clock())
        self._apply(actions)
        self._rearm()

    async def _publish_decision(self, decision: Decision) -> None:
        try:
            await self.bus.publish(topics.decisions(), decision)
        except FogmigError as exc:
            log.warning("controller: decision on %s not published: %s", decision.service, exc)

    def _emit(self, event: ControllerEvent) -> None:
        if event.kind is not EventKind.PROGRESS:
            level = logging.WARNING if event.kind in _WARNINGS else logging.INFO
            if event.kind is EventKind.HOLD:
                level = logging.DEBUG
            log.log(level, "controller %s: %s", event.kind.value, event.message)
            if self._log_file is not None:
                self._log_file.write(event.to_json() + "\n")
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("the controller's event callback failed")

    # --- timers ------------------------------------------------------------------------

    def _rearm(self) -> None:
        """Wake the clock loop if the core now has work earlier than the loop sleeps."""
        due = self.core.next_due()
        if due is not None and (self._sleep_until is None or due < self._sleep_until):
            self._wake.set()

    async def _clock_loop(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            self._apply(self.core.tick(now))
            due = self.core.next_due()
            self._sleep_until = due
            timeout = None if due is None else max(0.0, due - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
