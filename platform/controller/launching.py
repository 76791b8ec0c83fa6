"""How the controller's core starts the moves it queued, and what it does when one fails.

A queued move starts when its service, its nodes and the per-node limit allow; a rejected,
undelivered or rolled-back one is retried with a growing pause, a lost one given up. No I/O.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from fogmig.platform.base import fmt
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.controller.actions import Action, EventKind, InFlight, Launch, PendingMove
from fogmig.platform.controller.basis import CoreBasis
from fogmig.platform.controller.decide import decide_move

REPLAYED: Final = "CommandReplayedError"
"""How an agent names the refusal of a command id it took before (``agent/admission``)."""
REFUSED: Final = "CommandRefusedError"
"""How an agent names the refusal of a stale command."""
RESUME_SETTLE_S: Final = 2.0
"""After the source's status shows a resumed migration over, how long the controller waits
for the presence of the destination before it takes the service as not moved."""

# A figure the decision did not predict reads "?" in the controller's lines.
fmt_time = functools.partial(fmt.duration, missing="?")
fmt_size = functools.partial(fmt.megabytes, missing="?")


class Launching(CoreBasis):
    """Starting queued moves, retrying failed ones, giving up lost ones."""

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
            f"(predicted downtime {fmt_time(p.downtime)}, total {fmt_time(p.total_time)}, "
            f"{fmt_size(p.transferred_bytes)}): {move.detail}",
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

    def _watch_resumed(self, now: float) -> list[Action]:
        """Migrations sent before a restart: their MigrationDone may have gone by unseen, so
        the source's status, stamped after it took the command, decides that one is over."""
        for service, f in self.inflight.items():
            if not f.resumed or not f.acked or f.ended_seen is not None:
                continue
            src = self.registry.nodes.get(f.source)
            if src is None or not src.online or src.at <= f.acked_wall:
                continue
            if service in src.migrating:
                continue
            f.ended_seen = now
            self._timer(now + RESUME_SETTLE_S, "resume", service, f.serial)
        return []

    def _resume_ended(self, service: str, serial: int) -> list[Action]:
        f = self.inflight.get(service)
        if f is None or f.serial != serial:
            return []
        del self.inflight[service]
        self._recheck.add(service)
        where = self.registry.location(service)
        moved = where == f.destination
        if moved:
            self.registry.note_moved(service, f.destination, self.wall())
        outcome = "completed" if moved else "not_moved"
        what = "it runs there" if moved else f"it runs on {where or 'an unknown node'}"
        return [
            self._event(
                EventKind.DONE,
                f"{service} {f.source} -> {f.destination} {f.command.technique}: ended while "
                f"the controller was away; {what}",
                service=service,
                node=f.source,
                command_id=f.command.command_id,
                destination=f.destination,
                technique=f.command.technique,
                trigger=f.trigger,
                outcome=outcome,
                learned=True,
            )
        ]
