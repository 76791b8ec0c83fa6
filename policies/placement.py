"""Where services should run: follow the device, relieve overloaded nodes, drain a node.

Pure functions over typed snapshots of node status and service placement; each returns move
requests with their reason, or holds that say why a service stays where it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from fogmig.policies.conditions import InvalidConditionsError


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """A fog node as placement sees it: the input the policies decide from.

    ``load`` is the node's utilisation as a fraction of its capacity (1.0 = saturated).
    ``accepting`` is false for a node being drained or otherwise closed to new services.

    Not the bus's ``NodeStatus``: that is the wire message one agent publishes about itself
    (memory, measured links, per-service figures, capabilities, version, with bounds for
    untrusted input). The controller's registry turns each node's last status into one
    snapshot holding only what placement weighs (``accepting`` folds in ``online`` and
    ``draining``), so the policies stay free of the wire format.
    """

    name: str
    load: float
    mem_free_bytes: int
    services: tuple[str, ...] = ()
    online: bool = True
    accepting: bool = True

    def __post_init__(self) -> None:
        if not self.load >= 0.0:
            raise InvalidConditionsError(f"node {self.name}: load must be >= 0, got {self.load!r}")
        if self.mem_free_bytes < 0:
            raise InvalidConditionsError(f"node {self.name}: mem_free_bytes must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "load": self.load,
            "mem_free_bytes": self.mem_free_bytes,
            "services": list(self.services),
            "online": self.online,
            "accepting": self.accepting,
        }


@dataclass(frozen=True, slots=True)
class ServicePlacement:
    """Where one service runs and what it needs.

    ``mem_bytes``: memory it needs on a target. ``load``: its share of its node's load, in
    the same units as ``NodeSnapshot.load``; ``None`` when unknown (then the node's load is
    assumed to be shared equally by its services). ``device``: the device it serves, if any.
    """

    service: str
    node: str
    mem_bytes: int
    load: float | None = None
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "node": self.node,
            "mem_bytes": self.mem_bytes,
            "load": self.load,
            "device": self.device,
        }


class MoveReason(StrEnum):
    FOLLOW_DEVICE = "follow_device"
    LOAD_BALANCE = "load_balance"
    DRAIN = "drain"


@dataclass(frozen=True, slots=True)
class MoveRequest:
    """Move ``service`` from ``source`` to ``target``, and why."""

    service: str
    source: str
    target: str
    reason: MoveReason
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "source": self.source,
            "target": self.target,
            "reason": self.reason.value,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Hold:
    """A service that stays where it is, and why (no eligible target, already there ...).

    ``service`` is ``None`` when the hold concerns a whole node (an overloaded node with
    nothing that can be moved).
    """

    service: str | None
    node: str
    reason: MoveReason
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "node": self.node,
            "reason": self.reason.value,
            "detail": self.detail,
            "hold": True,
        }


@dataclass(frozen=True, slots=True)
class LoadPolicy:
    """Thresholds of the placement policies.

    A node above ``high_watermark`` is overloaded. A target must stay at or below
    ``low_watermark`` after taking the service: the gap between the two is the hysteresis that
    keeps a service from bouncing between two nodes. ``mem_reserve_bytes`` is the free memory a
    target keeps beyond the service (restore needs room for the images as well).
    """

    high_watermark: float = 0.80
    low_watermark: float = 0.60
    mem_reserve_bytes: int = 64 << 20
    moves_per_node: int = 1
    """Moves proposed per overloaded node per evaluation; the next evaluation sees their effect."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_watermark < self.high_watermark:
            raise InvalidConditionsError(
                f"need 0 <= low_watermark < high_watermark, got {self.low_watermark} and "
                f"{self.high_watermark}"
            )
        if self.moves_per_node < 1:
            raise InvalidConditionsError("moves_per_node must be >= 1")


@dataclass(slots=True)
class _Plan:
    """Node loads and free memory as they will be once the planned moves are done."""

    load: dict[str, float] = field(default_factory=dict)
    mem: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, nodes: Iterable[NodeSnapshot]) -> _Plan:
        plan = cls()
        for n in nodes:
            plan.load[n.name] = n.load
            plan.mem[n.name] = n.mem_free_bytes
        return plan

    def move(self, p: ServicePlacement, share: float, target: str) -> None:
        self.load[p.node] = max(0.0, self.load[p.node] - share)
        self.mem[p.node] += p.mem_bytes
        self.load[target] += share
        self.mem[target] -= p.mem_bytes


def _index(nodes: Iterable[NodeSnapshot]) -> dict[str, NodeSnapshot]:
    out: dict[str, NodeSnapshot] = {}
    for n in nodes:
        if n.name in out:
            raise InvalidConditionsError(f"node {n.name} reported twice")
        out[n.name] = n
    return out


def _share(
    p: ServicePlacement, nodes: Mapping[str, NodeSnapshot], placements: Sequence[ServicePlacement]
) -> float:
    if p.load is not None:
        return p.load
    node = nodes.get(p.node)
    if node is None:
        return 0.0
    count = max(1, sum(1 for q in placements if q.node == p.node), len(node.services))
    return node.load / count


def _why_not(
    node: NodeSnapshot | None,
    *,
    name: str,
    p: ServicePlacement,
    share: float,
    plan: _Plan,
    policy: LoadPolicy,
    load_limit: float | None,
) -> str | None:
    """Why ``name`` cannot take ``p`` under ``plan``; ``None`` if it can."""
    if node is None:
        return f"{name} is not a known node"
    if not node.online:
        return f"{name} is offline"
    if not node.accepting:
        return f"{name} accepts no services (draining)"
    need = p.mem_bytes + policy.mem_reserve_bytes
    if plan.mem[name] < need:
        return f"{name} has {plan.mem[name] >> 20} MiB free, needs {need >> 20} MiB"
    if load_limit is not None and plan.load[name] + share > load_limit + 1e-9:
        return f"{name} would reach load {plan.load[name] + share:.2f} (limit {load_limit:.2f})"
    return None


def _least_loaded(
    candidates: Iterable[NodeSnapshot],
    p: ServicePlacement,
    share: float,
    plan: _Plan,
    policy: LoadPolicy,
    *,
    load_limit: float | None,
) -> tuple[str | None, list[str]]:
    """The least-loaded node that can take ``p`` (most free memory, then name, on ties)."""
    reasons: list[str] = []
    eligible: list[str] = []
    for n in candidates:
        why = _why_not(
            n, name=n.name, p=p, share=share, plan=plan, policy=policy, load_limit=load_limit
        )
        if why is None:
            eligible.append(n.name)
        else:
            reasons.append(why)
    if not eligible:
        return None, reasons
    eligible.sort(key=lambda name: (plan.load[name], -plan.mem[name], name))
    return eligible[0], reasons


def follow_device(
    placement: ServicePlacement,
    gateway: str,
    nodes: Iterable[NodeSnapshot],
    *,
    policy: LoadPolicy | None = None,
    busy: frozenset[str] = frozenset(),
) -> MoveRequest | Hold:
    """Mobility: the service should run on the gateway its device is attached to now.

    The gateway's load is not held against it (serving the device locally is the point), but
    it must be online, accepting and have the memory.
    """
    pol = policy if policy is not None else LoadPolicy()
    index = _index(nodes)
    who = f"device {placement.device}" if placement.device else "its device"
    if placement.node == gateway:
        return Hold(
            placement.service,
            placement.node,
            MoveReason.FOLLOW_DEVICE,
            f"already on {gateway}, the gateway of {who}",
        )
    if placement.service in busy:
        return Hold(
            placement.service,
            placement.node,
            MoveReason.FOLLOW_DEVICE,
            "a migration of this service is already in progress",
        )
    plan = _Plan.of(index.values())
    why = _why_not(
        index.get(gateway),
        name=gateway,
        p=placement,
        share=0.0,
        plan=plan,
        policy=pol,
        load_limit=None,
    )
    if why is not None:
        return Hold(
            placement.service,
            placement.node,
            MoveReason.FOLLOW_DEVICE,
            f"{who} is now on {gateway}, but {why}",
        )
    return MoveRequest(
        placement.service,
        placement.node,
        gateway,
        MoveReason.FOLLOW_DEVICE,
        f"{who} attached to {gateway}",
    )


def balance_load(
    nodes: Iterable[NodeSnapshot],
    placements: Sequence[ServicePlacement],
    *,
    policy: LoadPolicy | None = None,
    busy: frozenset[str] = frozenset(),
) -> list[MoveRequest | Hold]:
    """Load balancing: for each node above the high watermark, move services to the least
    loaded nodes that stay at or below the low watermark afterwards.

    Per overloaded node, the service chosen is the smallest (cheapest to migrate) whose move
    alone brings the node back under the high watermark, else the one shedding the most load.
    A node with nothing movable yields a ``Hold`` naming why.
    """
    pol = policy if policy is not None else LoadPolicy()
    index = _index(nodes)
    plan = _Plan.of(index.values())
    out: list[MoveRequest | Hold] = []
    overloaded = sorted(
        (n for n in index.values() if n.online and n.load > pol.high_watermark),
        key=lambda n: (-n.load, n.name),
    )
    moved: set[str] = set()
    for node in overloaded:
        for _ in range(pol.moves_per_node):
            if plan.load[node.name] <= pol.high_watermark:
                break
            local = [
                p
                for p in placements
                if p.node == node.name and p.service not in busy and p.service not in moved
            ]
            if not local:
                out.append(
                    Hold(
                        None,
                        node.name,
                        MoveReason.LOAD_BALANCE,
                        f"{node.name} is at load {plan.load[node.name]:.2f} but has no "
                        "service that can be moved now",
                    )
                )
                break
            excess = plan.load[node.name] - pol.high_watermark
            shares = {p.service: _share(p, index, placements) for p in local}
            enough = sorted(
                (p for p in local if shares[p.service] >= excess),
                key=lambda p: (p.mem_bytes, p.service),
            )
            rest = sorted(
                (p for p in local if shares[p.service] < excess),
                key=lambda p: (-shares[p.service], p.mem_bytes, p.service),
            )
            chosen: tuple[ServicePlacement, str] | None = None
            reasons: list[str] = []
            for p in enough + rest:
                others = (n for n in index.values() if n.name != node.name)
                target, why = _least_loaded(
                    others, p, shares[p.service], plan, pol, load_limit=pol.low_watermark
                )
                if target is not None:
                    chosen = (p, target)
                    break
                reasons.extend(why)
            if chosen is None:
                detail = "; ".join(dict.fromkeys(reasons)) or "no other node"
                out.append(
                    Hold(
                        None,
                        node.name,
                        MoveReason.LOAD_BALANCE,
                        f"{node.name} is at load {plan.load[node.name]:.2f} but no node can "
                        f"take any of its services: {detail}",
                    )
                )
                break
            p, target = chosen
            share = shares[p.service]
            out.append(
                MoveRequest(
                    p.service,
                    node.name,
                    target,
                    MoveReason.LOAD_BALANCE,
                    f"{node.name} at load {plan.load[node.name]:.2f} > {pol.high_watermark:.2f}; "
                    f"{target} at {plan.load[target]:.2f} takes about {share:.2f}",
                )
            )
            plan.move(p, share, target)
            moved.add(p.service)
    return out


def drain(
    node: str,
    nodes: Iterable[NodeSnapshot],
    placements: Sequence[ServicePlacement],
    *,
    policy: LoadPolicy | None = None,
    busy: frozenset[str] = frozenset(),
) -> list[MoveRequest | Hold]:
    """Take every service off ``node``, each to the least-loaded other node with capacity
    (memory, and load staying at or below the high watermark). Largest services are placed
    first, so the big ones still find room."""
    pol = policy if policy is not None else LoadPolicy()
    index = _index(nodes)
    if node not in index:
        raise InvalidConditionsError(f"cannot drain {node}: not a known node")
    plan = _Plan.of(index.values())
    out: list[MoveRequest | Hold] = []
    local = sorted(
        (p for p in placements if p.node == node), key=lambda p: (-p.mem_bytes, p.service)
    )
    for p in local:
        if p.service in busy:
            out.append(
                Hold(
                    p.service,
                    node,
                    MoveReason.DRAIN,
                    "a migration of this service is already in progress",
                )
            )
            continue
        share = _share(p, index, placements)
        others = (n for n in index.values() if n.name != node)
        target, reasons = _least_loaded(others, p, share, plan, pol, load_limit=pol.high_watermark)
        if target is None:
            detail = "; ".join(reasons) or "there is no other node"
            out.append(Hold(p.service, node, MoveReason.DRAIN, f"no node can take it: {detail}"))
            continue
        out.append(
            MoveRequest(
                p.service,
                node,
                target,
                MoveReason.DRAIN,
                f"draining {node}; {target} is the least loaded with room "
                f"(load {plan.load[target]:.2f})",
            )
        )
        plan.move(p, share, target)
    return out


def mark_draining(nodes: Iterable[NodeSnapshot], node: str) -> list[NodeSnapshot]:
    """The same snapshot with ``node`` closed to new services (for evaluations during a drain)."""
    return [replace(n, accepting=False) if n.name == node else n for n in nodes]
