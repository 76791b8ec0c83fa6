"""The controller's core: messages and a clock reading in, actions out.

:class:`ControllerCore` holds the registry and every decision as plain values (messages and a
clock reading in, actions out), so it is tested without a broker; the asyncio side that wires it
to the bus lives in ``fogmig.platform.controller.runner``.
"""

from __future__ import annotations

import heapq
from typing import Any

from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.bus.schemas import (
    DeviceAttach,
    MigrationDone,
    NodeStatus,
    ServicePresence,
)
from fogmig.platform.controller.actions import Action, EventKind
from fogmig.platform.controller.launching import (
    REFUSED,
    REPLAYED,
    Launching,
    fmt_size,
    fmt_time,
)
from fogmig.platform.controller.planning import Planning
from fogmig.platform.migration.record import MigrationRecord


def _measured(record: MigrationRecord) -> dict[str, float | None]:
    return {
        "downtime_s": record.downtime_s,
        "total_time_s": record.total_time_s,
        "transferred_bytes": float(record.transferred_bytes),
    }


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


MAX_SKEW_S = 30.0
"""A message dated further ahead of the controller's clock is refused: the registry orders
evidence by time, so it would outrank every later report."""
MAX_DEVICES = 10_000
"""Devices the controller follows at most; a new one beyond is refused (memory stays bounded)."""


class ControllerCore(Planning, Launching):
    """The controller's state and rules, without I/O.

    Feed it bus messages (``on_*``) and the outcome of the commands it asked for (``on_ack``,
    ``on_rejected``, ``on_send_failed``); call :meth:`tick` after each input and at
    :meth:`next_due`. Every call takes ``now`` (a monotonic clock reading) and returns actions:
    :class:`Launch` to send a command, :class:`ControllerEvent` to report. Construct it with
    ``ControllerCore(config, wall_clock=..., new_id=...)`` (see :class:`CoreBasis`).
    """

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
            self.arm_settle(att, now)
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
        self.draining.pop(node, None)
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
        f.acked_wall = self.wall()
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

    def on_rejected(
        self,
        service: str,
        command_id: str,
        reason: str,
        now: float,
        *,
        error_type: str | None = None,
    ) -> list[Action]:
        """The source refused the command (``error_type``: the class of its error)."""
        f = self.inflight.get(service)
        if f is not None and f.resumed and f.command.command_id == command_id:
            if error_type == REPLAYED:
                # Sent again after a restart and refused as a replay: the agent took it before.
                return self.on_ack(service, command_id, now)
            if error_type == REFUSED:
                # Too old to be taken now; whether it was taken then, the source's status says.
                f.acked = True
                f.acked_wall = self.wall()
                self.arm_done(f, now)
                return []
        return self._failed(EventKind.REJECTED, service, command_id, reason, now)

    def on_send_failed(self, service: str, command_id: str, error: str, now: float) -> list[Action]:
        """The command could not be delivered or no acknowledgement came in time."""
        return self._failed(EventKind.SEND_FAILED, service, command_id, error, now)

    def on_done(self, msg: MigrationDone, now: float) -> list[Action]:
        if msg.migration_id in self._ended:
            return []  # the same end again (at least once delivery)
        self.remember_ended([msg.migration_id])
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
            f"{msg.outcome.value} in {fmt_time(measured['total_time_s'])}: downtime "
            f"{fmt_time(measured['downtime_s'])} (predicted "
            f"{fmt_time(comparison['downtime_s']['predicted'])}), total "
            f"{fmt_time(measured['total_time_s'])} (predicted "
            f"{fmt_time(comparison['total_time_s']['predicted'])}), "
            f"{fmt_size(measured['transferred_bytes'])} (predicted "
            f"{fmt_size(comparison['transferred_bytes']['predicted'])})"
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
                    self.registry.attach_revision += 1
                    self._recheck.add(att.service)
            elif kind == "done":
                actions += self._lost(key, generation, now)
            elif kind == "resume":
                f = self.inflight.get(key)
                actions += self._resume_ended(key, generation)
                if f is not None and key not in self.inflight:
                    actions += self._check_empty(f.source)
        actions += self._watch_resumed(now)
        if self._recheck:
            for service in sorted(self._recheck):
                if service not in self.inflight:
                    self._recheck.discard(service)
                    actions += self._follow(service, now)
        for service, move in list(self.pending.items()):
            if move.not_before <= now and service not in self.inflight:
                actions += self._start(move, now)
        return actions
