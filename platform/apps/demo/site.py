"""The testbed a whole-platform run brings up for itself, and takes down again.

Pieces ``fogmig demo`` and ``fogmig soak`` share: :func:`bring_up` (the testbed and an agent
per node), :func:`deploy_services`, :func:`open_buses` (the controller's bus and one per device),
:func:`announce` (where each fresh service runs, before its node says so) and
:func:`tear_down` (services, agents, testbed; every step tried, whatever failed before), and
:func:`answered_since` (the devices' traffic reaches their services again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from fogmig.device_sim.events import RequestKind
from fogmig.device_sim.fleet import DeviceFleet
from fogmig.platform.base.errors import FogmigError, TestbedError
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import ServicePresence
from fogmig.platform.bus.topics import topics
from fogmig.platform.testbed.state import TestbedState
from fogmig.services.deploy import Deployment, ServiceSpec

Say = Callable[[str], None]


async def bring_up(
    profile_name: str, nodes: int, *, say: Say, what: str, on_up: Callable[[], None]
) -> TestbedState:
    """A fresh testbed of ``nodes`` gateways with an agent on each (``what``: who asks, for
    the refusal when a testbed is already up). ``on_up`` is called once the testbed is up,
    before the agents start: from then on the caller must tear both down."""
    from fogmig.platform.agent.launcher import agents_up
    from fogmig.platform.testbed import lifecycle
    from fogmig.platform.testbed.profiles import load_profile
    from fogmig.platform.testbed.state import state_path
    from fogmig.services.image import ensure_image

    if state_path().exists():
        raise TestbedError(
            f"the testbed is already up; {what} brings up its own and tears it down",
            hint="`fogmig testbed down` first (if nobody else is using it)",
        )
    profile = load_profile(profile_name)
    await ensure_image(progress=say)
    say(f"testbed: {nodes} gateways, {profile.describe()}")
    result = await lifecycle.up(profile, nodes, progress=say)
    on_up()
    pids = await agents_up()
    say(f"agents: {', '.join(f'{n} (pid {p})' for n, p in pids.items())}")
    return result.state


async def deploy_services(placed: Sequence[tuple[ServiceSpec, str]]) -> list[Deployment]:
    """Deploy each spec on its node, all at once; the first failure is raised."""
    from fogmig.services.deploy import deploy

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(deploy(spec, node=node)) for spec, node in placed]
    except* FogmigError as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]


@contextlib.asynccontextmanager
async def open_buses(
    state: TestbedState, devices: Mapping[str, str]
) -> AsyncIterator[tuple[Bus, dict[str, Bus]]]:
    """The controller principal's bus, and one per device of ``devices`` (name -> service)
    with the device's own certificate, for the block."""
    from fogmig.platform.controller.access import open_testbed_bus
    from fogmig.platform.testbed.devices import device_buses

    async with (
        open_testbed_bus("controller") as controller_bus,
        device_buses(devices, state) as buses,
    ):
        yield controller_bus, buses


async def announce(bus: Bus, state: TestbedState, deployments: Sequence[Deployment]) -> None:
    """Say where each freshly deployed service runs, so every gateway forwards to it from the
    first reading on (its node says the same at its next status report). At the node's data
    address: the agents refuse a presence at any other."""
    for d in deployments:
        data_ip = state.node(d.node).data_ip
        await bus.publish(
            topics.service(d.node, d.name),
            ServicePresence(
                service=d.name,
                node=d.node,
                data_ip=data_ip,
                port=d.port,
                present=True,
                at=time.time(),
            ),
            retain=True,
        )


async def tear_down(services: Sequence[str], *, agents: bool, testbed: bool, say: Say) -> None:
    """Remove ``services``, stop the agents and take the testbed down, as far as asked."""
    from fogmig.platform.agent.launcher import agents_down
    from fogmig.platform.testbed import lifecycle
    from fogmig.services.deploy import find_service, undeploy

    if services:
        say(f"removing services {', '.join(services)}")
    for name in services:
        try:
            if await find_service(name):
                await undeploy(name, grace=2.0)
        except FogmigError as exc:
            say(f"could not remove {name}: {exc}")
    if agents:
        try:
            stopped = await agents_down()
            say(f"agents stopped: {', '.join(stopped) or 'none'}")
        except FogmigError as exc:
            say(f"could not stop the agents: {exc}")
    if testbed:
        try:
            await lifecycle.down()
            say("testbed down")
        except FogmigError as exc:
            say(f"could not take the testbed down: {exc} (run `fogmig testbed down`)")


def answered_since(fleet: DeviceFleet, since: float) -> bool:
    """Every device had a reading acknowledged that it sent after ``since``: the last
    migration's forwarding changes have reached the devices, so the final continuity checks
    meet services that answer."""
    for device in fleet.devices:
        posts = [r for r in device.records[-4:] if r.request is RequestKind.POST]
        if not posts or not posts[-1].ok or posts[-1].sent_at < since:
            return False
    return True
