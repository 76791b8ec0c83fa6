"""The probe device on the real testbed: 20 NON pings a second from the device host's
namespace to a sensor service in a runc container on gw1, over the emulated lan link.

Freezing the container (``runc pause``) for a second must show as about a second of
downtime; a quiet run must show next to none. This is the probe's calibration: the same
measurement taken around a migration is the downtime its devices see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from fogmig.device_sim.probe import Probe, ProbeSettings
from fogmig.platform.base.errors import TestbedError
from fogmig.platform.base.nodes import netns_name, runc_root
from fogmig.platform.base.proc import run
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.testbed import lifecycle
from fogmig.platform.testbed.profiles import load_profile
from fogmig.platform.testbed.state import TestbedState, exclusive_use, state_path
from fogmig.services.deploy import ServiceSpec, deploy

LEASE_WAIT_S = 150.0
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(LEASE_WAIT_S + 240),
]

SERVICE = "sp"
PORT = 5700
NODE = "gw1"
PAUSE_S = 1.0
SETTINGS = ProbeSettings(rate_hz=20, timeout_s=0.5)


@pytest.fixture(scope="module")
def testbed() -> Iterator[TestbedState]:
    """A testbed of our own (lan, two gateways) with the service on gw1; never someone else's."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_use(timeout=LEASE_WAIT_S))
        except TestbedError as exc:
            pytest.skip(f"the testbed stays in use elsewhere: {exc}")
        if state_path().exists():
            pytest.skip(f"a testbed is already up ({state_path()}): not ours to use or tear down")
        try:
            state = asyncio.run(lifecycle.up(load_profile("lan"), 2)).state
            asyncio.run(
                deploy(ServiceSpec(name=SERVICE, state_mb=4, dirty_kbps=10, port=PORT), node=NODE)
            )
            yield state
        finally:
            asyncio.run(lifecycle.down())


def runtime() -> NodeRuntime:
    return NodeRuntime(node=NODE, netns=netns_name(NODE), runc_root=runc_root(NODE))


@contextlib.asynccontextmanager
async def paused(cid: str) -> AsyncIterator[None]:
    """The container frozen (cgroup freezer) for the block; thawed whatever happens."""
    argv = ["runc", "--root", str(runc_root(NODE))]
    await run([*argv, "pause", cid], timeout=10)
    try:
        yield
    finally:
        await run([*argv, "resume", cid], timeout=10)


def probing(testbed: TestbedState) -> contextlib.AbstractAsyncContextManager[Probe]:
    """A probe from the device host to the service through gw1, running for the block."""
    return Probe.running(
        address=testbed.node(NODE).data_ip,
        port=PORT,
        settings=SETTINGS,
        netns=testbed.device_host.netns,
    )


async def test_a_quiet_run_shows_no_downtime(testbed: TestbedState) -> None:
    async with probing(testbed) as probe:
        await asyncio.sleep(1.0)
        t0 = probe.now()
        await asyncio.sleep(1.0)
        t1 = probe.now()
        await asyncio.sleep(1.0)
    timeline = probe.timeline()
    seen = timeline.window(t0, t1)
    print(seen)
    assert seen.downtime_s is not None
    assert seen.downtime_s < 0.2
    assert 18 <= seen.sent <= 22
    assert seen.lost == 0
    assert timeline.sent == timeline.answered
    assert {r.address for r in timeline.records} == {testbed.node(NODE).data_ip}


async def test_a_paused_service_shows_its_pause(testbed: TestbedState) -> None:
    async with probing(testbed) as probe:
        await asyncio.sleep(1.0)
        t0 = probe.now()
        async with paused(SERVICE):
            assert (await runtime().state(SERVICE)).status == "paused"
            await asyncio.sleep(PAUSE_S)
        t1 = probe.now()
        await asyncio.sleep(1.0)
    assert (await runtime().state(SERVICE)).status == "running"
    seen = probe.timeline().window(t0, t1)
    print(seen, f"pause window {t1 - t0:.3f} s")
    assert seen.downtime_s is not None
    assert 0.8 <= seen.downtime_s <= 1.4
    # Requests sent early in the pause timed out (0.5 s) before the thaw; the later ones
    # waited in the service's socket and were answered when it thawed.
    assert seen.lost >= 5
    assert seen.answered >= 3
    assert seen.sent == seen.answered + seen.lost
