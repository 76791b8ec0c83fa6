"""Authorization by identity: a node acts only on itself and its own services, a presence
counts only from its own node's address and not from the future, a command runs once and
fresh, and the controller's memory of devices is bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pytest

from fogmig.platform.agent.admission import Admission, CommandRefusedError, CommandReplayedError
from fogmig.platform.agent.commands import CommandHandling
from fogmig.platform.agent.follow import Follow
from fogmig.platform.agent.forwarding import Location
from fogmig.platform.base.errors import ServiceError
from fogmig.platform.base.vocabulary import NodeCapabilities
from fogmig.platform.bus.schemas import (
    BusMessage,
    CommandAck,
    DeviceAttach,
    DrainCommand,
    NodeStatus,
    ServicePresence,
    UndeployCommand,
)
from fogmig.platform.bus.topics import Rejection, SchemaError, topics
from fogmig.platform.controller import core as core_module
from fogmig.platform.controller.actions import EventKind
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.core import ControllerCore
from fogmig.platform.runtime.results import ContainerState
from fogmig.services import deploy as deploy_module

IPS = {"gw1": "10.79.0.1", "gw2": "10.79.0.2"}

# --- a node acts on its own services only --------------------------------------------------


class _Bus:
    def __init__(self) -> None:
        self.published: list[tuple[str, BusMessage]] = []

    async def publish(self, topic: str, model: BusMessage, **_: Any) -> None:
        self.published.append((topic, model))


def _agent(node: str) -> tuple[CommandHandling, _Bus]:
    agent = object.__new__(CommandHandling)
    agent.node = node
    agent.migrating = {}
    agent.admission = Admission()
    bus = _Bus()
    agent.bus = bus  # type: ignore[assignment]

    async def no_status() -> None:
        return None

    agent._publish_status = no_status  # type: ignore[method-assign]
    return agent, bus


def _acks(bus: _Bus) -> list[CommandAck]:
    return [m for _, m in bus.published if isinstance(m, CommandAck)]


def test_a_node_cannot_undeploy_another_nodes_service(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped: list[str] = []

    async def find_service(name: str) -> list[deploy_module.Placement]:
        # s2 runs on gw2 only.
        return [deploy_module.Placement("gw2", ContainerState(id=name, status="running", pid=1))]

    async def stop(self: Any, name: str, *, grace: float) -> None:
        stopped.append(f"{self.node}:{name}")

    monkeypatch.setattr(deploy_module, "find_service", find_service)
    monkeypatch.setattr(deploy_module.NodeRuntime, "stop", stop)
    agent, bus = _agent("gw1")
    asyncio.run(agent._on_command(UndeployCommand(command_id="u1", service="s2")))
    assert stopped == []
    (ack,) = _acks(bus)
    assert not ack.accepted
    assert ack.error_type == ServiceError.__name__


# --- a command runs once, and only while fresh -----------------------------------------------


def test_a_replayed_command_id_is_refused() -> None:
    agent, bus = _agent("gw1")
    drain = DrainCommand(command_id="d1")
    asyncio.run(agent._on_command(drain))
    asyncio.run(agent._on_command(drain))  # the same message again
    first, second = _acks(bus)
    assert first.accepted
    assert not second.accepted
    assert second.error_type == CommandReplayedError.__name__
    assert "replay" in (second.reason or "")


def test_stale_and_future_commands_are_refused() -> None:
    gate = Admission(max_age_s=60, max_skew_s=10)
    now = 10_000.0
    with pytest.raises(CommandRefusedError, match="stale"):
        gate.admit("old", now - 61, now)
    with pytest.raises(CommandRefusedError, match="future"):
        gate.admit("ahead", now + 11, now)
    gate.admit("ok", now - 5, now)
    # Remembered for its window, forgotten after it (the staleness rule covers it then).
    with pytest.raises(CommandRefusedError, match="replay"):
        gate.admit("ok", now - 5, now + 30)
    with pytest.raises(CommandRefusedError, match="stale"):
        gate.admit("ok", now - 5, now + 100)


def test_the_remembered_ids_are_bounded() -> None:
    gate = Admission(max_remembered=100)
    now = 1_000.0
    for i in range(1_000):
        gate.admit(f"c{i}", now, now)
    assert len(gate._taken) == 100


# --- presences: own node's address, not from the future, withdrawn by the node itself ---------


class _Rules:
    def __init__(self) -> None:
        self.now: dict[str, str] = {}

    async def install(self) -> None:
        pass

    async def update(self, locations: Mapping[str, Location]) -> None:
        self.now = {s: loc.node for s, loc in locations.items()}


def _follow(node: str = "gw1") -> tuple[Follow, _Rules]:
    rules = _Rules()
    follow = Follow(node=node, data_ip=IPS[node], routing=rules, addresses=IPS)
    follow.mark_synced()
    return follow, rules


def _presence(node: str, **fields: Any) -> ServicePresence:
    doc: dict[str, Any] = {
        "service": "s2",
        "node": node,
        "data_ip": IPS[node],
        "port": 5683,
        "present": True,
        "at": time.time(),
        "seq": 1,
    }
    doc.update(fields)
    return ServicePresence(**doc)


def test_a_presence_at_another_address_than_its_nodes_is_refused() -> None:
    follow, rules = _follow()
    asyncio.run(follow.on_message(_presence("gw2")))
    assert rules.now == {"s2": "gw2"}
    # gw1 claims s2 at an address of its choosing, far above gw2's seq.
    asyncio.run(follow.on_message(_presence("gw1", data_ip="10.66.6.6", seq=1_000)))
    assert rules.now == {"s2": "gw2"}


def test_a_future_dated_presence_is_refused() -> None:
    follow, rules = _follow()
    asyncio.run(follow.on_message(_presence("gw2")))
    asyncio.run(follow.on_message(_presence("gw1", seq=5, at=time.time() + 3600)))
    assert rules.now == {"s2": "gw2"}


def test_an_empty_retained_payload_removes_no_forwarding() -> None:
    from fogmig.platform.bus.schemas import decode

    follow, rules = _follow()
    asyncio.run(follow.on_message(_presence("gw2")))
    with pytest.raises(SchemaError) as caught:
        decode(topics.service("gw2", "s2"), b"")
    assert caught.value.reason is Rejection.MALFORMED
    assert rules.now == {"s2": "gw2"}
    # The node itself withdraws it, with a presence of its own that outranks the earlier one.
    asyncio.run(follow.on_message(_presence("gw2", present=False, seq=2)))
    assert rules.now == {}


def test_the_controller_refuses_future_dated_reports() -> None:
    core = ControllerCore(ControllerConfig(), wall_clock=lambda: 1_000.0)
    caps = NodeCapabilities(criu_version=None, postcopy=False, native_predump=False)
    status = NodeStatus(
        node="gw1",
        online=True,
        at=1_000.0 + 3_600,
        load=0.1,
        mem_total_bytes=1,
        mem_free_bytes=1,
        capabilities=caps,
    )
    refused = core.on_status(status, 0.0)
    assert [a.kind for a in refused] == [EventKind.REFUSED]  # type: ignore[union-attr]
    assert "gw1" not in core.registry.nodes
    presence = _presence("gw2", at=1_000.0 + 3_600)
    core.on_presence(presence, 0.0)
    assert core.registry.location("s2") is None
    attach = DeviceAttach(device="d1", gateway="gw1", at=1_000.0 + 3_600, service="s2")
    core.on_attach(attach, 0.0)
    assert core.registry.attachments == {}


def test_the_controller_follows_a_bounded_number_of_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(core_module, "MAX_DEVICES", 50)
    core = ControllerCore(ControllerConfig(), wall_clock=lambda: 1_000.0)
    for i in range(1_000):
        core.on_attach(DeviceAttach(device=f"d{i}", gateway="gw1", at=999.0, service="s1"), 0.0)
    assert len(core.registry.attachments) == 50
