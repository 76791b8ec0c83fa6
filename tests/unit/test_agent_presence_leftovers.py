"""A service announced on this node before its agent (re)started, and gone since, has its
retained presence withdrawn: otherwise every gateway keeps forwarding its port to this node."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fogmig.platform.agent.follow import Follow
from fogmig.platform.agent.status import StatusReporting
from fogmig.platform.bus.schemas import BusMessage, ServicePresence


class _Bus:
    def __init__(self) -> None:
        self.published: list[tuple[str, BusMessage]] = []

    async def publish(self, topic: str, model: BusMessage, **_: Any) -> None:
        self.published.append((topic, model))


class _Routing:
    async def install(self) -> None:
        return None

    async def update(self, locations: Any) -> None:
        return None


def _presence(service: str, node: str, *, state: str = "running") -> ServicePresence:
    extra: dict[str, Any] = {}
    if state == "moving":
        extra = {"migration_id": "m1", "to": "gw2" if node != "gw2" else "gw1"}
    return ServicePresence(
        service=service,
        node=node,
        data_ip="10.79.0.1" if node == "gw1" else "10.79.0.2",
        port=5683,
        present=True,
        at=time.time(),
        seq=3,
        state=state,  # type: ignore[arg-type]
        **extra,
    )


def test_a_retained_presence_of_a_service_gone_from_here_is_withdrawn() -> None:
    agent = object.__new__(StatusReporting)
    agent.node = "gw1"
    agent.migrating = {}
    agent._published = set()  # a new process: it announced nothing yet
    agent.follow = Follow(node="gw1", data_ip="10.79.0.1", routing=_Routing())
    for p in (
        _presence("ct1", "gw1"),  # removed while the agent was down
        _presence("s1", "gw1"),  # runs here
        _presence("s2", "gw2"),  # another node's
        _presence("s3", "gw1", state="moving"),  # its migration settles it
    ):
        agent.follow.book.put(p)
    bus = _Bus()
    agent.bus = bus  # type: ignore[assignment]

    async def owned(service: str) -> None:
        agent._published.add(service)

    agent._owned = owned  # type: ignore[method-assign]
    asyncio.run(agent._reconcile_presence({"s1"}))
    withdrawn = [(t, m) for t, m in bus.published if isinstance(m, ServicePresence)]
    assert [(m.service, m.node, m.present) for _, m in withdrawn] == [("ct1", "gw1", False)]
    assert withdrawn[0][1].seq > 3  # outranks what the gateways hold
    assert agent._published == {"s1"}
