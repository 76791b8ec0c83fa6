"""Where the controller wants services: next to their device, off overloaded and draining nodes.

The triggers of the controller's core (no I/O): each reads the registry, asks the placement
policies and queues the moves they request (``CoreBasis._enqueue``) or says why not (a hold).
"""

from __future__ import annotations

from fogmig.platform.bus.schemas import NodeStatus
from fogmig.platform.controller.actions import Action, EventKind
from fogmig.platform.controller.basis import CoreBasis
from fogmig.policies import placement


class Planning(CoreBasis):
    """Mobility (follow the device), load (relieve a node) and drain (empty a node)."""

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
            if node in self.draining and msg.online:
                del self.draining[node]
                actions.append(
                    self._event(EventKind.DRAIN_ENDED, f"{node} is no longer draining", node=node)
                )
            return actions
        if node not in self.draining:
            self.draining[node] = False
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
            self.draining[node] = False
            actions += self._plan_drain(node, now)
        return actions + self._check_empty(node)

    def _check_empty(self, node: str) -> list[Action]:
        """Say once that a draining node is empty: it reports no service and none is leaving."""
        status = self.registry.nodes.get(node)
        if (
            status is None
            or self.draining.get(node, True)
            or status.services
            or any(f.source == node for f in self.inflight.values())
        ):
            return []
        self.draining[node] = True
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
