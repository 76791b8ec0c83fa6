"""A controller killed with SIGKILL right after it commanded a migration, and started again,
on the real testbed (three nodes, their agents, ``fogmig controller`` as a process):

- the migration happens exactly once: one command id on the source's command topic (a command
  sent again after the restart keeps its id), one MigrationDone, the service on the device's
  gateway only;
- the restarted controller resumes the device's attachment and the drain of gw3 from its
  state file;
- gw3's agent, killed and started again, still reports draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fogmig.platform.agent.launcher import agents_dir, agents_up
from fogmig.platform.apps.demo import site
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import (
    DeviceAttach,
    DrainCommand,
    MigrateCommand,
    MigrationDone,
    NodeStatus,
)
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.access import open_testbed_bus
from fogmig.platform.testbed import pids
from fogmig.platform.testbed.devices import device_buses
from fogmig.platform.testbed.state import TestbedState, exclusive_use, load_state
from fogmig.services.deploy import ServiceSpec, find_service, undeploy

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(900),
]

NAME = "ctl-restart"
DEVICE = "devr"


def _controller(tmp: Path) -> int:
    argv = [
        sys.executable, "-P", "-m", "fogmig.platform.cli.main", "controller",
        "--debounce", "0.3", "--load-threshold", "1000000",
        "--state-file", str(tmp / "state.json"), "--decision-log", str(tmp / "decisions.jsonl"),
    ]  # fmt: skip
    return pids.spawn_detached(argv, log_path=tmp / "controller.log")


def _events(tmp: Path, kind: str) -> list[dict[str, object]]:
    path = tmp / "decisions.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line still being written
            rows.append(json.loads(line))
    return [r for r in rows if r.get("event") == kind]


async def _until(what: str, check: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _fogmig(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", *args],
        capture_output=True, text=True, timeout=300, check=False, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout


@pytest.fixture(scope="module")
def testbed() -> Iterator[TestbedState]:
    """Three nodes with their agents, held under the lease, torn down at the end."""
    with exclusive_use(timeout=900):
        _fogmig("testbed", "down")  # leftovers of a crashed run
        _fogmig("testbed", "up", "--profile", "orchestration", "--nodes", "3")
        try:
            _fogmig("agents", "up")
            yield load_state()
        finally:
            subprocess.run(
                [sys.executable, "-P", "-m", "fogmig.platform.cli.main", "agents", "down"],
                capture_output=True, timeout=120, check=False, cwd="/",
            )  # fmt: skip
            _fogmig("testbed", "down")


async def test_a_migration_commanded_before_a_sigkill_happens_once(
    testbed: TestbedState, tmp_path: Path
) -> None:
    [deployment] = await site.deploy_services(
        [(ServiceSpec(name=NAME, state_mb=4, dirty_kbps=20.0, port=5683), "gw1")]
    )
    commands: list[MigrateCommand] = []
    done: list[MigrationDone] = []
    status: dict[str, NodeStatus] = {}
    # Announced as the controller principal before the controller runs (the broker keeps one
    # connection per principal); the test then speaks as the operator and as its device.
    async with open_testbed_bus("controller") as bus:
        await site.announce(bus, testbed, [deployment])
    controller = _controller(tmp_path)
    killed = asyncio.Event()

    async def watch(bus: Bus, pattern: str) -> None:
        async with bus.subscribe(pattern) as sub:
            async for _, msg in sub:
                if isinstance(msg, MigrateCommand) and msg.service == NAME:
                    commands.append(msg)
                    if not killed.is_set():
                        os.kill(controller, signal.SIGKILL)  # the command is out: now
                        killed.set()
                elif isinstance(msg, MigrationDone) and msg.service == NAME:
                    done.append(msg)
                elif isinstance(msg, NodeStatus):
                    status[msg.node] = msg

    try:
        async with (
            open_testbed_bus("operator") as bus,
            device_buses({DEVICE: NAME}, testbed) as devices,
        ):
            tasks = [
                asyncio.create_task(watch(bus, p))
                for p in (topics.cmd("gw1"), topics.events(), topics.status())
            ]
            await bus.request("gw3", DrainCommand(command_id=f"drain-{os.getpid()}"), 15.0)
            state = tmp_path / "state.json"
            await _until(
                "the controller saving gw3's drain",
                lambda: state.exists() and "gw3" in json.loads(state.read_text())["draining"],
                60,
            )
            attach = DeviceAttach(device=DEVICE, gateway="gw2", at=time.time(), service=NAME)
            await devices[DEVICE].publish(topics.attach(DEVICE), attach)
            await asyncio.wait_for(killed.wait(), 60)
            await pids.wait_gone(controller, 10)
            controller = _controller(tmp_path)  # the same state file
            await _until(
                "the restarted controller's resume", lambda: _events(tmp_path, "resumed"), 60
            )
            await _until("the migration's end", lambda: done, 120)
            # Its end, seen by the restarted controller: as a MigrationDone, or (when that went
            # by before it subscribed) from gw1's status and the service's presence on gw2.
            await _until("the controller's end of it", lambda: _events(tmp_path, "done"), 60)
            await asyncio.sleep(8.0)  # time for a second command, if one were coming
            # gw3's agent forgets nothing either.
            placements = [p.node for p in await find_service(NAME) if p.container.running]
            assert placements == ["gw2"]
            agent = pids.read_pidfile(agents_dir() / "gw3.pid")
            assert agent is not None
            os.kill(agent, signal.SIGKILL)
            await pids.wait_gone(agent, 10)
            restarted = time.time()
            await agents_up()
            await _until(
                "gw3's status after its restart",
                lambda: "gw3" in status and status["gw3"].at > restarted and status["gw3"].online,
                30,
            )
            for task in tasks:
                task.cancel()
    finally:
        await pids.stop_process(controller, ("controller",), grace=10.0)
        with contextlib.suppress(Exception):
            await undeploy(NAME)

    assert len({c.command_id for c in commands}) == 1, [c.command_id for c in commands]
    assert [d.outcome.value for d in done] == ["completed"]
    assert done[0].command_id == commands[0].command_id
    [resumed] = _events(tmp_path, "resumed")
    assert resumed["devices"] == 1
    assert "gw3" in resumed["draining"]  # type: ignore[operator]
    assert NAME in resumed["inflight"]  # type: ignore[operator]
    saved = json.loads((tmp_path / "state.json").read_text())
    assert [a["device"] for a in saved["attachments"]] == [DEVICE]
    assert "gw3" in saved["draining"]
    assert saved["inflight"] == []
    [ended] = _events(tmp_path, "done")
    assert ended["outcome"] == "completed"
    assert status["gw3"].draining  # the agent's drain flag outlived its SIGKILL
