"""The controller against a real Mosquitto on loopback (authentication and ACL on) with
scripted nodes that acknowledge commands and report MigrationDone.

An attach to another gateway gives exactly one MigrateCommand, to the service's node, with the
technique the policy chooses; a flapping device gives one; a rejected or unanswered command is
retried; a drain empties the node; a device that names another's service moves nothing. Last,
on the testbed with the real agents: a device's attach makes the controller migrate a real
service (runc + CRIU) and compare its prediction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fogmig.platform.apps.bench.controller_sim import LocalBroker, SimulatedNode
from fogmig.platform.base.vocabulary import NodeCapabilities
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import Decision, DeviceAttach, MigrateCommand
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.access import open_testbed_bus
from fogmig.platform.controller.actions import ControllerEvent, EventKind
from fogmig.platform.controller.config import ControllerConfig, config_for_testbed
from fogmig.platform.controller.drain import drain_node
from fogmig.platform.controller.runner import Controller
from fogmig.platform.testbed.broker import CONTROLLER_USER, OPERATOR_USER
from fogmig.platform.testbed.devices import TestbedDevices, device_buses
from fogmig.platform.testbed.state import TestbedState
from fogmig.policies.choice import choose_technique
from fogmig.policies.conditions import ServiceConditions
from fogmig.services.deploy import ServiceSpec, deploy, find_service, undeploy

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto"),
    pytest.mark.timeout(60),
]

NODES = ("gw1", "gw2", "gw3")


@dataclass
class Fog:
    nodes: dict[str, SimulatedNode]
    broker: LocalBroker
    stack: contextlib.AsyncExitStack
    operator: Bus
    config: ControllerConfig
    events: list[ControllerEvent] = field(default_factory=list)
    controller: Controller | None = None
    devices: dict[str, Bus] = field(default_factory=dict)
    """Each device's own connection (with its own certificate)."""

    async def attach(self, device: str, gateway: str, service: str) -> None:
        """``device`` announces its attachment; a new device is enrolled for ``service``."""
        if device not in self.devices:
            self.broker.enroll(device, service)
            self.devices[device] = await self.stack.enter_async_context(self.broker.bus(device))
        msg = DeviceAttach(device=device, gateway=gateway, at=time.time(), service=service)
        await self.devices[device].publish(topics.attach(device), msg)

    def commands(self) -> list[MigrateCommand]:
        return [
            r.command
            for n in self.nodes.values()
            for r in n.received
            if isinstance(r.command, MigrateCommand)
        ]

    async def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                kinds = [e.kind.value for e in self.events]
                raise AssertionError(f"timed out waiting for {what}; events: {kinds}")
            await asyncio.sleep(0.02)

    @property
    def ctl(self) -> Controller:
        assert self.controller is not None
        return self.controller

    def of_kind(self, kind: EventKind) -> list[ControllerEvent]:
        return [e for e in self.events if e.kind is kind]


@contextlib.asynccontextmanager
async def fog(
    tmp_path: Path,
    services: dict[str, str],
    *,
    serve: tuple[str, ...] = NODES,
    setup: Callable[[dict[str, SimulatedNode]], None] | None = None,
    **config: Any,
) -> AsyncIterator[Fog]:
    """Nodes holding ``services`` (service -> node), an operator and a running controller;
    devices connect as they first attach."""
    async with LocalBroker(nodes=NODES) as broker, contextlib.AsyncExitStack() as stack:
        buses = {n: await stack.enter_async_context(broker.bus(n)) for n in NODES}
        nodes = {n: SimulatedNode(buses[n], n) for n in NODES}
        for node in nodes.values():
            node.peers = nodes
        for service, node_name in services.items():
            nodes[node_name].add_service(service)
        if setup is not None:
            setup(nodes)
        for name, node in nodes.items():
            if name in serve:
                await node.start()
            else:
                await node.publish_status()  # reports, but answers no command
        cfg = ControllerConfig(
            debounce_s=config.pop("debounce_s", 0.3),
            retry_initial_s=config.pop("retry_initial_s", 0.2),
            ack_timeout_s=config.pop("ack_timeout_s", 3.0),
            decision_log=tmp_path / "decisions.jsonl",
            **config,
        )
        cbus = await stack.enter_async_context(broker.bus(CONTROLLER_USER, known_nodes=list(NODES)))
        operator = await stack.enter_async_context(broker.bus(OPERATOR_USER))
        world = Fog(nodes, broker, stack, operator, cfg)
        controller = Controller(cfg, cbus, devices=broker.service_of, on_event=world.events.append)
        world.controller = controller
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            await asyncio.wait_for(controller.ready.wait(), 10)
            # The retained status of every node has reached the controller.
            await world.wait_for(
                "node status", lambda: len(controller.core.registry.nodes) == len(NODES)
            )
            yield world
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            for node in nodes.values():
                await node.stop()


async def test_attach_elsewhere_sends_one_command_with_the_chosen_technique(
    tmp_path: Path,
) -> None:
    async with fog(tmp_path, {"s1": "gw1", "s2": "gw3"}) as world:
        decisions: list[Decision] = []

        async def watch() -> None:
            async with world.operator.subscribe(topics.decisions()) as sub:
                async for _, msg in sub:
                    assert isinstance(msg, Decision)
                    decisions.append(msg)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        await world.attach("d1", "gw2", "s1")
        await world.wait_for("the migration", lambda: bool(world.of_kind(EventKind.DONE)))
        await asyncio.sleep(world.config.debounce_s + 0.5)  # nothing more follows
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

        [cmd] = world.commands()
        assert [r.command for r in world.nodes["gw1"].received] == [cmd]
        assert (cmd.service, cmd.destination) == ("s1", "gw2")
        info = world.nodes["gw2"].services["s1"]
        expected = choose_technique(
            ServiceConditions(
                state_bytes=info.state_bytes, dirty_rate_bytes_per_s=info.dirty_rate_bytes_per_s
            ),
            world.config.default_link,
            NodeCapabilities(postcopy=True, native_predump=False),
            NodeCapabilities(postcopy=True, native_predump=False),
        )
        assert cmd.technique == expected.technique.value
        [decision] = decisions
        assert (decision.source, decision.destination, decision.trigger) == (
            "gw1",
            "gw2",
            "mobility",
        )
        assert decision.technique == cmd.technique
        assert decision.predicted["downtime_s"] == pytest.approx(expected.prediction.downtime)
        [done] = world.of_kind(EventKind.DONE)
        assert done.data["comparison"]["downtime_s"]["measured"] == pytest.approx(0.3)
        assert world.ctl.core.registry.location("s1") == "gw2"

        lines = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
        kinds = [line["event"] for line in lines]
        assert kinds.count("decision") == 1
        assert {"decision", "accepted", "done"} <= set(kinds)


async def test_flapping_device_causes_one_migration(tmp_path: Path) -> None:
    async with fog(tmp_path, {"s1": "gw1"}, debounce_s=0.6) as world:
        for gw in ("gw2", "gw3", "gw1", "gw3", "gw2", "gw3"):
            await world.attach("d1", gw, "s1")
            await asyncio.sleep(0.1)
        await world.wait_for("the migration", lambda: bool(world.of_kind(EventKind.DONE)))
        await asyncio.sleep(1.2)
        [cmd] = world.commands()
        assert cmd.destination == "gw3"
        assert "s1" in world.nodes["gw3"].services


async def test_rejected_command_is_retried(tmp_path: Path) -> None:
    def busy(nodes: dict[str, SimulatedNode]) -> None:
        nodes["gw1"].reject = 1

    async with fog(tmp_path, {"s1": "gw1"}, setup=busy) as world:
        await world.attach("d1", "gw2", "s1")
        await world.wait_for("the migration", lambda: bool(world.of_kind(EventKind.DONE)))
        first, second = world.commands()
        assert first.command_id != second.command_id
        assert first.destination == second.destination == "gw2"
        [rejected] = world.of_kind(EventKind.REJECTED)
        assert rejected.data["reason"] == "busy"
        assert "s1" in world.nodes["gw2"].services
        assert world.ctl.stats.rejected == 1


async def test_unanswered_command_is_retried_once_the_node_answers(tmp_path: Path) -> None:
    async with fog(
        tmp_path, {"s1": "gw1"}, serve=("gw2", "gw3"), ack_timeout_s=0.5, retry_initial_s=0.5
    ) as world:
        await world.attach("d1", "gw2", "s1")
        await world.wait_for("a timeout", lambda: bool(world.of_kind(EventKind.SEND_FAILED)))
        assert "no acknowledgement" in world.of_kind(EventKind.SEND_FAILED)[0].data["reason"]
        await world.nodes["gw1"].start(presence=False)
        await world.wait_for("the migration", lambda: bool(world.of_kind(EventKind.DONE)))
        assert "s1" in world.nodes["gw2"].services


async def test_drain_empties_the_node(tmp_path: Path) -> None:
    services = {"s1": "gw1", "s2": "gw1", "s3": "gw2"}
    async with fog(tmp_path, services) as world:
        lines: list[str] = []
        took = await drain_node(world.operator, "gw1", timeout=30, on_update=lines.append)
        assert took > 0
        gw1 = world.nodes["gw1"]
        assert gw1.draining
        assert gw1.services == {}
        moved = world.commands()
        assert sorted(c.service for c in moved) == ["s1", "s2"]
        assert all(c.destination in {"gw2", "gw3"} for c in moved)
        assert {"s1", "s2"} <= set(world.nodes["gw2"].services) | set(world.nodes["gw3"].services)
        await world.wait_for("node empty", lambda: bool(world.of_kind(EventKind.NODE_EMPTY)))
        [empty] = world.of_kind(EventKind.NODE_EMPTY)
        assert empty.node == "gw1"
        assert any("accepted the drain" in line for line in lines)
        assert sum("moving" in line for line in lines) == 2
        # A device attaching at the drained node does not bring its service back there.
        await world.attach("d3", "gw1", "s3")
        await asyncio.sleep(world.config.debounce_s + 0.5)
        assert len(world.commands()) == 2
        assert any("draining" in e.message for e in world.of_kind(EventKind.HOLD))


async def test_a_device_moves_only_its_own_service(tmp_path: Path) -> None:
    async with fog(tmp_path, {"s1": "gw1", "s2": "gw1"}) as world:
        await world.attach("d1", "gw1", "s1")  # enrolled for s1, where s1 runs
        await world.attach("d2", "gw1", "s2")
        # d1 claims s2, then publishes for d2 (the broker drops that: d1's certificate writes
        # only d1's topic).
        await world.attach("d1", "gw3", "s2")
        forged = DeviceAttach(device="d2", gateway="gw3", at=time.time(), service="s2")
        await world.devices["d1"].publish(topics.attach("d2"), forged)
        await asyncio.sleep(world.config.debounce_s + 0.7)
        assert world.commands() == []
        refused = world.of_kind(EventKind.REFUSED)
        assert [e.message for e in refused] == ["attach of d1 refused: it uses service s1, not s2"]
        assert world.ctl.stats.refused_attach == 1
        assert world.ctl.core.registry.attachments["d2"].gateway == "gw1"
        # Its own service follows it.
        await world.attach("d1", "gw3", "s1")
        await world.wait_for("the migration", lambda: bool(world.of_kind(EventKind.DONE)))
        [cmd] = world.commands()
        assert (cmd.service, cmd.destination) == ("s1", "gw3")


# --- with the real agents on the testbed ---------------------------------------------------


@pytest.fixture(scope="module")
def testbed(orchestration_testbed: TestbedState) -> TestbedState:
    return orchestration_testbed


@pytest.mark.timeout(1200)  # mostly waiting for the testbed lease held by other test modules
async def test_controller_moves_a_real_service_after_its_device(
    testbed: TestbedState, tmp_path: Path
) -> None:
    name = "ctl-follow"
    await deploy(ServiceSpec(name=name, state_mb=4, dirty_kbps=20.0, port=5683), node="gw1")
    events: list[ControllerEvent] = []
    config = config_for_testbed(debounce_s=0.3, decision_log=tmp_path / "decisions.jsonl")
    assert config.default_link.throughput_mbit_per_s == pytest.approx(72.41)
    stop = asyncio.Event()
    try:
        async with open_testbed_bus("controller") as bus:
            controller = Controller(config, bus, devices=TestbedDevices(), on_event=events.append)
            task = asyncio.create_task(controller.run(stop))
            await asyncio.wait_for(controller.ready.wait(), 10)
            registry = controller.core.registry
            deadline = time.monotonic() + 15
            while registry.location(name) != "gw1":  # the agent's next status lists it
                assert time.monotonic() < deadline, "gw1's status never listed the service"
                await asyncio.sleep(0.1)
            attach = DeviceAttach(device="dctl", gateway="gw2", at=time.time(), service=name)
            async with device_buses({"dctl": name}) as devices:
                await devices["dctl"].publish(topics.attach("dctl"), attach)
            deadline = time.monotonic() + 120
            while not [e for e in events if e.kind is EventKind.DONE]:
                assert time.monotonic() < deadline, [e.message for e in events]
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 10)
        [decision] = [e for e in events if e.kind is EventKind.DECISION]
        [done] = [e for e in events if e.kind is EventKind.DONE]
        assert done.data["outcome"] == "completed", done.message
        assert done.data["technique"] == decision.data["decision"]["technique"]
        measured = done.data["comparison"]["downtime_s"]["measured"]
        assert measured is not None
        assert measured > 0
        assert done.data["comparison"]["transferred_bytes"]["measured"] >= 4 * 1024 * 1024
        placements = [p.node for p in await find_service(name) if p.container.running]
        assert placements == ["gw2"]
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await undeploy(name)


@pytest.mark.timeout(1200)  # mostly waiting for the testbed lease held by other test modules
async def test_fogmig_drain_empties_a_real_node(testbed: TestbedState, tmp_path: Path) -> None:
    # Runs after the mobility test: gw2 stays draining until its agent restarts.
    name = "ctl-drain"
    await deploy(ServiceSpec(name=name, state_mb=4, dirty_kbps=20.0, port=5683), node="gw2")
    events: list[ControllerEvent] = []
    config = config_for_testbed(debounce_s=0.3, decision_log=tmp_path / "decisions.jsonl")
    stop = asyncio.Event()
    try:
        async with open_testbed_bus("controller") as bus:
            controller = Controller(config, bus, devices=TestbedDevices(), on_event=events.append)
            task = asyncio.create_task(controller.run(stop))
            await asyncio.wait_for(controller.ready.wait(), 10)
            lines: list[str] = []
            took = await drain_node(bus, "gw2", timeout=120, on_update=lines.append)
            deadline = time.monotonic() + 10
            while not any(e.kind is EventKind.NODE_EMPTY for e in events):
                assert time.monotonic() < deadline, [e.message for e in events]
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 10)
        assert took > 0
        [decision] = [e for e in events if e.kind is EventKind.DECISION]
        assert decision.data["decision"]["trigger"] == "drain"
        assert decision.data["decision"]["destination"] == "gw1"
        [done] = [e for e in events if e.kind is EventKind.DONE]
        assert done.data["outcome"] == "completed", done.message
        assert any(e.kind is EventKind.NODE_EMPTY and e.node == "gw2" for e in events)
        assert any(f"moving {name} to gw1" in line for line in lines)
        assert any(f"{name} left gw2 for gw1: completed" in line for line in lines)
        placements = [p.node for p in await find_service(name) if p.container.running]
        assert placements == ["gw1"]
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await undeploy(name)
