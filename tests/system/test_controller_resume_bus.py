"""The controller's restart against a real Mosquitto on loopback, with scripted nodes that take
each command id once (a replay is refused, as an agent does) and report their migrations.

The controller's task is cancelled right after its command went out and its state file is put
back as it was at that moment (what a SIGKILL leaves); a new controller on the same file then
resumes the migration without a second one, whether its MigrationDone comes after the restart
or went by while no controller listened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fogmig.platform.apps.bench.controller_sim import LocalBroker, SimulatedNode
from fogmig.platform.bus.schemas import DeviceAttach, MigrateCommand
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.actions import ControllerEvent, EventKind
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.runner import Controller
from fogmig.platform.testbed.broker import CONTROLLER_USER

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto"),
    pytest.mark.timeout(90),
]

NODES = ("gw1", "gw2")


async def _until(what: str, check: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("done_while_away", [False, True])
@pytest.mark.parametrize("answered", [False, True])
async def test_a_restarted_controller_resumes_its_migration_once(
    tmp_path: Path, done_while_away: bool, answered: bool
) -> None:
    """``answered``: whether the file had the node's acknowledgement when the controller died
    (the file is written before the command goes out, and again when the answer comes)."""
    state = tmp_path / "state.json"
    config = ControllerConfig(
        debounce_s=0.2, retry_initial_s=0.2, ack_timeout_s=3.0, state_file=state, site="bus"
    )
    events: list[ControllerEvent] = []
    async with LocalBroker(nodes=NODES) as broker, contextlib.AsyncExitStack() as stack:
        buses = {n: await stack.enter_async_context(broker.bus(n)) for n in NODES}
        nodes = {n: SimulatedNode(buses[n], n, migrate_delay_s=1.5) for n in NODES}
        for node in nodes.values():
            node.peers = nodes
        nodes["gw1"].add_service("s1")
        for node in nodes.values():
            await node.start()
        broker.enroll("d1", "s1")
        dev = await stack.enter_async_context(broker.bus("d1"))
        # One connection per principal: the first controller's goes with it, as a SIGKILL's
        # would, before the second one connects.
        first_bus = contextlib.AsyncExitStack()

        async def controller(
            own: contextlib.AsyncExitStack,
        ) -> tuple[Controller, asyncio.Event, asyncio.Task[None]]:
            bus = await own.enter_async_context(
                broker.bus(CONTROLLER_USER, known_nodes=list(NODES))
            )
            ctl = Controller(config, bus, devices=broker.service_of, on_event=events.append)
            stop = asyncio.Event()
            task = asyncio.create_task(ctl.run(stop))
            await asyncio.wait_for(ctl.ready.wait(), 10)
            return ctl, stop, task

        first, _, task = await controller(first_bus)
        await _until("gw2's status", lambda: "gw2" in first.core.registry.nodes)
        attach = DeviceAttach(device="d1", gateway="gw2", at=time.time(), service="s1")
        await dev.publish(topics.attach("d1"), attach)
        # The command is out: what the file holds now is what a SIGKILL would leave.
        await _until("the command", lambda: nodes["gw1"].received)
        saved = json.loads(state.read_text())
        [flight] = saved["inflight"]
        if not answered:
            flight.update(acked=False, acked_at=None)
        left = json.dumps(saved).encode()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await first_bus.aclose()
        if done_while_away:
            await _until("the migration's end", lambda: "s1" in nodes["gw2"].services)
            await asyncio.sleep(0.2)
        state.write_bytes(left)

        second, stop, task = await controller(stack)
        if done_while_away:
            # The nodes report again (an agent does every few seconds).
            await asyncio.sleep(0.3)
            for node in nodes.values():
                await node.publish_status()
        await _until("the end", lambda: [e for e in events if e.kind is EventKind.DONE])
        await asyncio.sleep(1.0)  # time for a second command, if one were coming
        stop.set()
        await asyncio.wait_for(task, 10)
        for node in nodes.values():
            await node.stop()

    commands = [r.command for r in nodes["gw1"].received if isinstance(r.command, MigrateCommand)]
    # The first, and the same one again when the file had no acknowledgement.
    assert len(commands) == (1 if answered else 2)
    assert all(c == commands[0] for c in commands)
    assert "s1" in nodes["gw2"].services
    [resumed] = [e for e in events if e.kind is EventKind.RESUMED]
    assert resumed.data["inflight"] == ["s1"]
    assert resumed.data["devices"] == 1
    [done] = [e for e in events if e.kind is EventKind.DONE]
    assert done.data["outcome"] == "completed"
    assert bool(done.data.get("learned")) == done_while_away
    assert second.core.inflight == {}
    assert second.stats.rejected == 0  # the replay counted as the acknowledgement
