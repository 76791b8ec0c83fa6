"""The controller's registry: where devices are attached, what nodes report, where services run.

Pure state fed from bus messages (no I/O, no decisions; those live in
``fogmig.platform.controller.core``), with the snapshots the placement policies take as input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fogmig.platform.bus.schemas import DeviceAttach, NodeStatus, ServiceInfo, ServicePresence
from fogmig.policies import placement


@dataclass(slots=True)
class Attachment:
    """A device's current gateway and the service it uses there.

    ``at`` is the device's own timestamp (it orders redelivered or late messages); ``since`` is
    the controller's clock when the gateway last changed, which the debounce counts from.
    ``generation`` grows with every change, so a timer set for an older one is recognised.
    """

    device: str
    gateway: str
    service: str
    at: float
    since: float
    generation: int = 0
    settled: bool = False


@dataclass(frozen=True, slots=True)
class AttachChange:
    """What an attach message changed: nothing, the timestamp only, or the gateway/service."""

    attachment: Attachment | None
    """``None`` when the message was older than what is known (a late redelivery)."""
    moved: bool
    previous_service: str | None = None


@dataclass(frozen=True, slots=True)
class StatusChange:
    """What a node status changed."""

    previous: NodeStatus | None
    listed: frozenset[str]
    """Services that appeared in or vanished from the node's service list."""

    def flipped(self, current: NodeStatus) -> bool:
        """The node is new, came online, went offline, started or stopped draining."""
        prev = self.previous
        return prev is None or prev.online != current.online or prev.draining != current.draining


@dataclass(slots=True)
class _Claims:
    """Evidence of where one service runs, each piece with the time it was true."""

    presence: dict[str, float] = field(default_factory=dict)  # node -> ServicePresence.at
    listed: dict[str, float] = field(default_factory=dict)  # node -> NodeStatus.at
    moved: tuple[str, float] | None = None  # destination of a completed migration, when


STALE_GRACE_S = 0.5
"""A node's status must be this much newer than a presence to overrule it: an agent lists its
containers a moment before it stamps its status."""


class Registry:
    """Attachments, node status and service locations, as the bus last reported them.

    A service's location is the most recent evidence among its retained presence messages, the
    service lists in node status, and migrations that completed (the latter bridges the few
    seconds until the nodes' next status reports). A presence or a completed move that the
    node's own later status does not confirm is stale (a retained presence outlives a service
    removed without clearing it).
    """

    def __init__(self) -> None:
        self.nodes: dict[str, NodeStatus] = {}
        self.attachments: dict[str, Attachment] = {}
        self._claims: dict[str, _Claims] = {}
        self._device_of: dict[str, str] = {}  # service -> the device that last named it
        self._snapshot: list[placement.NodeSnapshot] | None = None
        self.attach_revision = 0
        """Grows with every change of a device's gateway, service or settling."""

    # --- updates ---------------------------------------------------------------------

    def update_attach(self, msg: DeviceAttach, now: float) -> AttachChange:
        known = self.attachments.get(msg.device)
        if known is not None and msg.at < known.at:
            return AttachChange(None, moved=False)
        self._device_of[msg.service] = msg.device
        if known is None:
            att = Attachment(msg.device, msg.gateway, msg.service, msg.at, since=now)
            self.attachments[msg.device] = att
            self.attach_revision += 1
            return AttachChange(att, moved=True)
        known.at = msg.at
        if known.gateway == msg.gateway and known.service == msg.service:
            return AttachChange(known, moved=False)
        previous = known.service
        known.gateway = msg.gateway
        known.service = msg.service
        known.since = now
        known.generation += 1
        known.settled = False
        self.attach_revision += 1
        if previous != msg.service and self._device_of.get(previous) == msg.device:
            del self._device_of[previous]
        return AttachChange(known, moved=True, previous_service=previous)

    def restore_attachment(self, att: Attachment) -> None:
        """An attachment saved before a restart (older than any message that follows)."""
        self.attachments[att.device] = att
        self._device_of[att.service] = att.device

    def moved_hints(self) -> dict[str, tuple[str, float]]:
        """Service -> (destination, wall time) of the migrations that completed."""
        return {s: c.moved for s, c in self._claims.items() if c.moved is not None}

    def update_status(self, msg: NodeStatus) -> StatusChange:
        previous = self.nodes.get(msg.node)
        if previous is not None and msg.at < previous.at:
            return StatusChange(previous, frozenset())  # a late redelivery
        self.nodes[msg.node] = msg
        self._snapshot = None
        before = {s.name for s in previous.services} if previous is not None else set()
        now_listed = {s.name for s in msg.services}
        for name in before - now_listed:
            claims = self._claims.get(name)
            if claims is not None:
                claims.listed.pop(msg.node, None)
        for name in now_listed:
            self._claims.setdefault(name, _Claims()).listed[msg.node] = msg.at
        return StatusChange(previous, frozenset(before ^ now_listed))

    def forget_node(self, node: str) -> set[str]:
        """The node's retained status was cleared: it left. Returns the services it listed."""
        previous = self.nodes.pop(node, None)
        self._snapshot = None
        names = {s.name for s in previous.services} if previous is not None else set()
        for name in names:
            claims = self._claims.get(name)
            if claims is not None:
                claims.listed.pop(node, None)
        return names

    def update_presence(self, msg: ServicePresence) -> None:
        claims = self._claims.setdefault(msg.service, _Claims())
        if msg.present:
            claims.presence[msg.node] = max(msg.at, claims.presence.get(msg.node, 0.0))
        else:
            claims.presence.pop(msg.node, None)

    def note_moved(self, service: str, destination: str, at: float) -> None:
        """A migration to ``destination`` completed at ``at`` (wall clock)."""
        claims = self._claims.setdefault(service, _Claims())
        claims.moved = (destination, at)

    # --- queries ---------------------------------------------------------------------

    def location(self, service: str) -> str | None:
        """Where ``service`` runs now: the node of the most recent evidence, if any."""
        claims = self._claims.get(service)
        if claims is None:
            return None
        best: tuple[float, int, str] | None = None
        # On equal times a presence beats a move hint, which beats a service list.
        for rank, items in (
            (2, claims.presence.items()),
            (1, [claims.moved] if claims.moved is not None else []),
            (0, claims.listed.items()),
        ):
            for node, at in items:
                if rank and self._contradicted(claims, node, at):
                    continue
                key = (at, rank, node)
                if best is None or key > best:
                    best = key
        return None if best is None else best[2]

    def _contradicted(self, claims: _Claims, node: str, at: float) -> bool:
        status = self.nodes.get(node)
        return status is not None and status.at > at + STALE_GRACE_S and node not in claims.listed

    def service_info(self, service: str, node: str | None = None) -> ServiceInfo | None:
        """What ``node`` (default: the service's location) reports about ``service``."""
        where = node if node is not None else self.location(service)
        status = self.nodes.get(where) if where is not None else None
        if status is None:
            return None
        for info in status.services:
            if info.name == service:
                return info
        return None

    def device_of(self, service: str) -> Attachment | None:
        device = self._device_of.get(service)
        return self.attachments.get(device) if device is not None else None

    def services_on(self, node: str) -> list[str]:
        return sorted(name for name in self._claims if self.location(name) == node)

    def node_snapshot(self) -> list[placement.NodeSnapshot]:
        """The nodes as the placement policies see them (cached until the next status)."""
        if self._snapshot is None:
            self._snapshot = [
                placement.NodeSnapshot(
                    name=s.node,
                    load=s.load,
                    mem_free_bytes=s.mem_free_bytes,
                    services=tuple(i.name for i in s.services),
                    online=s.online,
                    accepting=s.online and not s.draining,
                )
                for s in self.nodes.values()
            ]
        return self._snapshot

    def placements(self) -> list[placement.ServicePlacement]:
        """Every service whose location is a known node, with the memory it needs."""
        out: list[placement.ServicePlacement] = []
        for name in sorted(self._claims):
            node = self.location(name)
            if node is None or node not in self.nodes:
                continue
            info = self.service_info(name, node)
            att = self.device_of(name)
            out.append(
                placement.ServicePlacement(
                    service=name,
                    node=node,
                    mem_bytes=info.state_bytes if info is not None else 0,
                    device=att.device if att is not None else None,
                )
            )
        return out
