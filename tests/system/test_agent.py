"""The node agent on the testbed: refusals, broker restarts, ACLs, forwarding to a moved service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from fogmig.platform.bus.client import Bus, CommandRejectedError, CommandTimeoutError
from fogmig.platform.bus.schemas import (
    CommandAck,
    DeployCommand,
    DeviceAttach,
    MigrateCommand,
    NodeStatus,
    ServicePresence,
    UndeployCommand,
)
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.access import open_testbed_bus
from fogmig.platform.controller.actions import ControllerEvent, EventKind
from fogmig.platform.controller.config import config_for_testbed
from fogmig.platform.controller.runner import Controller
from fogmig.platform.security.identity import Identity
from fogmig.platform.testbed.broker import restart_broker
from fogmig.platform.testbed.devices import TestbedDevices, device_buses, enroll_devices
from fogmig.platform.testbed.mqtt import mosquitto_client_args
from fogmig.platform.testbed.state import TestbedState
from fogmig.services.deploy import ServiceSpec, deploy, find_service, undeploy

pytestmark = [pytest.mark.system, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture(scope="module")
def testbed(lan_testbed: TestbedState) -> TestbedState:
    return lan_testbed


def migrate_command(service: str, destination: str = "gw2") -> MigrateCommand:
    return MigrateCommand(
        command_id=uuid.uuid4().hex[:12],
        service=service,
        destination=destination,
        technique="cold",
    )


async def raw_publish(user: str, topic: str, payload: bytes) -> None:
    identity = Identity.controller() if user == "controller" else Identity.node(user)
    argv = ["mosquitto_pub", *mosquitto_client_args(identity), "-q", "1", "-t", topic]
    # From stdin (-s): the payload may hold any byte.
    proc = await asyncio.create_subprocess_exec(*argv, "-s", stdin=asyncio.subprocess.PIPE)
    await proc.communicate(payload)
    assert proc.returncode == 0


async def next_ack(bus: Bus, node: str, command_id: str, timeout: float = 10.0) -> CommandAck:
    async with asyncio.timeout(timeout):
        async with bus.subscribe(topics.events(node)) as events:
            async for _, msg in events:
                if isinstance(msg, CommandAck) and msg.command_id == command_id:
                    return msg
    raise AssertionError("no ack")


async def test_agent_refuses_malformed_and_impossible_commands_and_stays_up(
    testbed: TestbedState,
) -> None:
    async with open_testbed_bus("operator") as bus:
        # Malformed (invalid service name, unknown technique): a typed rejection by its id.
        bad = (
            b'{"version": 1, "kind": "migrate", "command_id": "bad1", "service": "NO!",'
            b' "destination": "gw2", "technique": "teleport"}'
        )
        ack_task = asyncio.create_task(next_ack(bus, "gw1", "bad1"))
        # As the controller (none runs here): a second operator client would close ``bus``.
        await asyncio.sleep(0.3)
        await raw_publish("controller", topics.cmd("gw1"), bad)
        ack = await ack_task
        assert not ack.accepted
        assert ack.error_type == "SchemaError"
        # Garbage: nothing to answer, nothing broken.
        await raw_publish("controller", topics.cmd("gw1"), b"\x00not json")
        # Well-formed but impossible: the service does not run there.
        with pytest.raises(CommandRejectedError) as rejected:
            await bus.request("gw1", migrate_command("ghost"), timeout=10)
        assert rejected.value.ack.error_type == "MigrationError"
        # Still alive and answering.
        with pytest.raises(CommandRejectedError):
            await bus.request("gw1", migrate_command("ghost"), timeout=10)


async def test_agents_survive_a_broker_restart(testbed: TestbedState) -> None:
    restarted_at = time.time()
    await restart_broker()
    async with open_testbed_bus("operator") as bus:
        # Each agent reconnects and publishes a fresh status ...
        fresh: set[str] = set()
        async with asyncio.timeout(30), bus.subscribe(topics.status()) as statuses:
            async for _, msg in statuses:
                if isinstance(msg, NodeStatus) and msg.online and msg.at > restarted_at:
                    fresh.add(msg.node)
                    if fresh == {"gw1", "gw2"}:
                        break
        # ... and takes commands again (an answer proves it resubscribed).
        for node, other in (("gw1", "gw2"), ("gw2", "gw1")):
            with pytest.raises(CommandRejectedError):
                await bus.request(node, migrate_command("ghost", other), timeout=10)


async def test_a_command_with_a_devices_credentials_is_dropped(testbed: TestbedState) -> None:
    # A device's certificate (not gw2's: the broker keeps one connection per principal, so
    # connecting as gw2 would close gw2's agent; test_bus shows a node cannot command another).
    async with device_buses({"impostor": "ghost"}) as buses:
        impostor = buses["impostor"]
        # The broker acknowledges the denied publish and drops it: only the end-to-end ack tells.
        with pytest.raises(CommandTimeoutError):
            await impostor.request("gw1", migrate_command("ghost"), timeout=3)


async def test_another_principal_cannot_take_over_an_agents_session(
    testbed: TestbedState,
) -> None:
    log_path = Path(testbed.broker.log_path)
    start = log_path.stat().st_size
    enroll_devices({"takeover": "ghost"})
    attach = DeviceAttach(device="takeover", gateway="gw1", at=time.time(), service="ghost")
    async with (
        open_testbed_bus("operator") as bus,
        bus.subscribe(topics.status("gw1")) as statuses,
    ):
        # A device's certificate asking for the ids gw1's agent has had or has now.
        for asked in ("gw1", "gw1-agent"):
            argv = ["mosquitto_pub", *mosquitto_client_args(Identity.device("takeover"))]
            argv += ["-i", asked, "-q", "1", "-t", topics.attach("takeover"), "-s"]
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE)
            await proc.communicate(attach.model_dump_json().encode())
            assert proc.returncode == 0
        # No last will (gw1 offline) follows: the agent's session stayed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                async for _, msg in statuses:
                    assert not (isinstance(msg, NodeStatus) and not msg.online), msg
        with pytest.raises(CommandRejectedError):
            await bus.request("gw1", migrate_command("ghost"), timeout=10)
    with log_path.open("rb") as fh:
        fh.seek(start)
        log = fh.read().decode(errors="replace")
    assert "already connected" not in log
    assert "as takeover" in log  # the broker named both by their certificate


@pytest.mark.skipif(shutil.which("coap-client-notls") is None, reason="libcoap's client")
async def test_gateway_forwards_to_the_node_running_the_service(testbed: TestbedState) -> None:
    await deploy(ServiceSpec(name="fwd", state_mb=2, dirty_kbps=1, port=5701), node="gw2")
    try:
        gw1 = testbed.node("gw1").data_ip
        for _ in range(40):  # the agents learn the location from the bus
            done = subprocess.run(
                [
                    "nsenter",
                    f"--net=/var/run/netns/{testbed.device_host.netns}",
                    "coap-client-notls",
                    "-B",
                    "2",
                    "-m",
                    "get",
                    f"coap://{gw1}:5701/state",
                ],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if '"count"' in done.stdout:
                break
            await asyncio.sleep(0.25)
        # The device asked gw1; the service on gw2 answered through it.
        assert '"count"' in done.stdout, done.stdout + done.stderr
    finally:
        await undeploy("fwd")


async def node_load(bus: Bus, node: str, reports: int = 2) -> float:
    """The lowest load ``node`` reports over ``reports`` fresh status messages."""
    loads: list[float] = []
    since = time.time()
    async with asyncio.timeout(30), bus.subscribe(topics.status(node)) as statuses:
        async for _, msg in statuses:
            if isinstance(msg, NodeStatus) and msg.at > since and msg.services:
                loads.append(msg.load)
                if len(loads) == reports:
                    return min(loads)
    raise AssertionError("no status")


async def test_an_overloaded_node_sheds_a_service(testbed: TestbedState, tmp_path: Path) -> None:
    # Two services that dirty memory hard load gw1's cgroup; gw2 runs nothing.
    names = ("hot1", "hot2")
    for i, name in enumerate(names):
        spec = ServiceSpec(name=name, state_mb=8, dirty_kbps=100000, port=5710 + i)
        await deploy(spec, node="gw1")
    events: list[ControllerEvent] = []
    shed = asyncio.Event()

    def on_event(event: ControllerEvent) -> None:
        events.append(event)
        if event.kind is EventKind.DONE and event.data.get("trigger") == "load":
            shed.set()

    stop = asyncio.Event()
    try:
        async with open_testbed_bus("controller") as bus:
            # Thresholds relative to the load these services really cause on this machine:
            # gw1 is above the threshold, and one service alone fits under the target.
            load = await node_load(bus, "gw1")
            assert load > 0
            config = config_for_testbed(
                debounce_s=0.3,
                load_threshold=0.7 * load,
                load_target=0.65 * load,
                load_reports=2,
                decision_log=tmp_path / "decisions.jsonl",
            )
            controller = Controller(config, bus, devices=TestbedDevices(), on_event=on_event)
            task = asyncio.create_task(controller.run(stop))
            await asyncio.wait_for(shed.wait(), 120)
            stop.set()
            await asyncio.wait_for(task, 10)
        done = [e for e in events if e.kind is EventKind.DONE and e.data.get("trigger") == "load"]
        assert done[0].data["outcome"] == "completed", done[0].message
        assert done[0].data["destination"] == "gw2"
        moved = done[0].service
        assert moved in names
        placements = {
            n: [p.node for p in await find_service(n) if p.container.running] for n in names
        }
        assert placements[moved] == ["gw2"]
        assert sum(nodes == ["gw1"] for nodes in placements.values()) == 1
    finally:
        stop.set()
        for name in names:
            with contextlib.suppress(Exception):
                await undeploy(name)


async def test_deploy_and_undeploy_through_the_agent(testbed: TestbedState) -> None:
    async with open_testbed_bus("operator") as bus:
        ack = await bus.request(
            "gw2",
            DeployCommand(command_id="dep1", service="viacmd", state_mb=2, dirty_kbps=1),
            timeout=60,
        )
        assert ack.accepted
        assert [p.node for p in await find_service("viacmd") if p.container.running] == ["gw2"]
        # gw1 is told to undeploy it: it acts on its own services only, and refuses.
        with pytest.raises(CommandRejectedError) as refused:
            await bus.request(
                "gw1", UndeployCommand(command_id="undep0", service="viacmd"), timeout=30
            )
        assert refused.value.ack.error_type == "ServiceError"
        assert [p.node for p in await find_service("viacmd") if p.container.running] == ["gw2"]
        # The same command again: a replay, refused before it is even judged.
        with pytest.raises(CommandRejectedError) as replayed:
            await bus.request(
                "gw1", UndeployCommand(command_id="undep0", service="viacmd"), timeout=30
            )
        assert replayed.value.ack.error_type == "CommandReplayedError"
        ack = await bus.request(
            "gw2", UndeployCommand(command_id="undep1", service="viacmd"), timeout=30
        )
        assert ack.accepted
        assert await find_service("viacmd") == []


async def test_a_service_removed_by_hand_is_withdrawn_from_the_bus_at_once(
    testbed: TestbedState,
) -> None:
    """``fogmig undeploy`` stops the container itself; its agent is told (SIGHUP) and
    withdraws the presence now, not at its next status report (5 s): until then every gateway
    forwards the port to a node where nothing listens. Twice, so that a status report that
    happens to fall right after the removal cannot pass for it."""
    async with open_testbed_bus("operator") as bus:
        for attempt in range(2):
            name = f"byhand{attempt}"
            async with bus.subscribe(topics.service("gw2", name)) as presences:
                await deploy(ServiceSpec(name=name, state_mb=2, dirty_kbps=1), node="gw2")
                async with asyncio.timeout(3):
                    async for _, msg in presences:
                        if isinstance(msg, ServicePresence) and msg.present:
                            break
                await undeploy(name)
                removed = time.monotonic()
                async with asyncio.timeout(3):
                    async for _, msg in presences:
                        if isinstance(msg, ServicePresence) and not msg.present:
                            break
                assert time.monotonic() - removed < 1.0
