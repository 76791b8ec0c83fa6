"""The device simulator on the real testbed: a sensor service in a runc container on gw1,
devices in the device host's namespace, the real broker with the testbed's certificates.

``fogmig device-sim`` runs one device against gw1 and must see every reading acknowledged and
the service's state match its ledger, announcing its attachment on the bus; the library,
called from the root namespace, roams a device to a gateway without the service and back and
must see the outage and lose nothing. libcoap's ``coap-client`` confirms the service's count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fogmig.device_sim.device import DeviceConfig, RequestSettings
from fogmig.device_sim.events import FleetEvent, RequestKind, RequestOutcome, RequestRecord
from fogmig.device_sim.fleet import DeviceFleet
from fogmig.device_sim.roaming import Hop, Schedule
from fogmig.device_sim.timeline import read_timeline
from fogmig.platform.base.errors import TestbedError
from fogmig.platform.base.proc import in_netns, run
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.bus.client import Bus, Subscription
from fogmig.platform.bus.schemas import DeviceAttach
from fogmig.platform.bus.topics import topics
from fogmig.platform.security.identity import Identity
from fogmig.platform.testbed import lifecycle
from fogmig.platform.testbed.devices import TestbedDevices, device_buses
from fogmig.platform.testbed.mqtt import bus_access
from fogmig.platform.testbed.profiles import load_profile
from fogmig.platform.testbed.state import TestbedState, exclusive_use, state_path
from fogmig.services.deploy import ServiceSpec, deploy

LEASE_WAIT_S = 150.0
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(LEASE_WAIT_S + 150),
]

ENV = {**os.environ, "PYTHONSAFEPATH": "1"}
SERVICE = "s0"
PORT = 5700
COAP_CLIENTS = ("coap-client", "coap-client-notls", "coap-client-gnutls", "coap-client-openssl")


def coap_client() -> str:
    for name in COAP_CLIENTS:
        if shutil.which(name):
            return name
    pytest.skip("libcoap's coap-client is not installed (libcoap3-bin)")


@pytest.fixture(scope="module")
def testbed() -> Iterator[TestbedState]:
    """A testbed of our own (lan, two gateways) with s0 on gw1; never someone else's."""
    # The lease keeps test modules that bring their own testbed up and down out of our way.
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
                deploy(ServiceSpec(name=SERVICE, state_mb=4, dirty_kbps=10, port=PORT), node="gw1")
            )
            yield state
        finally:
            asyncio.run(lifecycle.down())


@asynccontextmanager
async def watcher_bus(state: TestbedState) -> AsyncIterator[Bus]:
    """A bus client that reads everything, as the operator (no command line runs here)."""
    access = bus_access(Identity.operator(), state)
    async with Bus(
        host=access.host,
        port=access.port,
        tls=access.tls,
        client_id=access.client_id,
        known_nodes=access.known_nodes,
    ) as bus:
        yield bus


async def attachments(sub: Subscription, n: int, timeout: float = 10.0) -> list[DeviceAttach]:
    got: list[DeviceAttach] = []
    async with asyncio.timeout(timeout):
        async for _, msg in sub:
            if isinstance(msg, DeviceAttach):
                got.append(msg)
                if len(got) == n:
                    break
    return got


async def service_count_by_coap_client(state: TestbedState, device: str) -> int:
    """The service's count for ``device``, read by libcoap (an independent CoAP peer)."""
    gw1 = state.node("gw1")
    done = await run(
        in_netns(state.device_host.netns, [coap_client(), "-B", "5", "-m", "get",
                 f"coap://{gw1.data_ip}:{PORT}/state"]),
        timeout=15,
    )  # fmt: skip
    body = done.stdout.strip().splitlines()[-1]
    record = json.loads(body)["devices"].get(device)
    return 0 if record is None else int(record["count"])


async def test_cli_device_all_ok_and_announced(testbed: TestbedState, tmp_path: Path) -> None:
    async with (
        watcher_bus(testbed) as bus,
        bus.subscribe(topics.attach()) as sub,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fogmig.platform.cli.main", "device-sim", "--devices", "1",
            "--duration", "5", "--check-every", "2", "--json", "--out", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV, cwd="/",
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        (attach,) = await attachments(sub, 1)
    assert (attach.device, attach.gateway, attach.service) == ("d0", "gw1", SERVICE)
    summary = json.loads(out)
    print(json.dumps({k: summary[k] for k in ("stats", "continuity", "max_downtime_s")}))
    stats = summary["stats"]
    assert stats["requests"] >= 5
    assert stats["ok"] == stats["requests"]
    assert stats["failed"] == 0
    assert stats["latency"]["p99_ms"] < 100  # lan: 1 ms round trip plus the emulator
    assert summary["outages"] == []
    assert summary["continuity"]["passed"] >= 2  # at least one periodic and the final check
    assert summary["continuity"]["failed"] == 0
    assert summary["attach_published"] == 1
    assert summary["per_device"][0]["gateway"] == "gw1"
    rows = read_timeline(tmp_path / "timeline.csv")
    assert {r.address for r in rows} == {testbed.node("gw1").data_ip}
    assert all(r.ok for r in rows)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    final = [e for e in events if e["kind"] == "check"][-1]
    assert final["reason"] == "final"
    assert final["matches"]
    assert await service_count_by_coap_client(testbed, "d0") == final["service_count"]


async def test_library_roams_away_from_the_service_and_back(
    testbed: TestbedState, tmp_path: Path
) -> None:
    # gw2 runs no service and nothing forwards there yet: the device sees an outage while on
    # gw2 and must lose no reading across it.
    gateways = {n.name: n.data_ip for n in testbed.nodes}
    device = DeviceConfig("d0", SERVICE, PORT, "gw1", Schedule((Hop(1.5, "gw2"), Hop(3.5, "gw1"))))
    settings = RequestSettings(
        interval_s=0.25, timeout_s=0.5, ack_timeout_s=0.2, check_every_s=None
    )
    before = await service_count_by_coap_client(testbed, "d0")
    async with (
        watcher_bus(testbed) as watcher,
        watcher.subscribe(topics.attach("d0")) as sub,
        device_buses({"d0": SERVICE}, testbed) as buses,
    ):
        fleet = DeviceFleet(
            devices=[device],
            gateways=gateways,
            buses=buses,
            out=tmp_path,
            settings=settings,
            netns=testbed.device_host.netns,
        )
        summary = await fleet.run(5.5)
        seen = await attachments(sub, 3)
    print(summary.model_dump_json(include={"stats", "outages", "continuity"}))
    assert [a.gateway for a in seen] == ["gw1", "gw2", "gw1"]
    assert summary.roams == 2
    assert summary.attach_published == 3
    (outage,) = summary.outages
    assert (outage.gateway_before, outage.gateway_after) == ("gw1", "gw1")
    assert outage.failed >= 3
    assert 1.8 < outage.downtime_s < 3.0
    failed = [r for r in fleet.devices[0].records if r.request is RequestKind.POST and not r.ok]
    assert {r.gateway for r in failed} == {"gw2"}
    assert all(r.outcome in (RequestOutcome.ERROR, RequestOutcome.TIMEOUT) for r in failed)
    c = summary.continuity
    assert c.failed == 0
    # A check whose GET /state went unanswered (0.5 s on a loaded machine) is taken again at
    # the next reading: the one that counts is verified, and so is the final one.
    checks = fleet.devices[0].checks
    assert checks[-1].verified
    assert c.unverified <= 1
    assert c.passed >= 2  # after the outage and at the end
    ledger = fleet.devices[0].ledger
    assert ledger is not None
    # The device continues whatever record an earlier run left in the service.
    assert ledger.base_count == before
    assert await service_count_by_coap_client(testbed, "d0") == ledger.count


async def test_a_device_speaks_only_for_itself_and_its_own_service(
    testbed: TestbedState,
) -> None:
    # Each device has its own certificate: the broker drops d0's attachment for d5, and the
    # controller refuses d0 naming a service the testbed did not enroll it for.
    from fogmig.platform.controller.access import open_testbed_bus
    from fogmig.platform.controller.config import config_for_testbed
    from fogmig.platform.controller.runner import Controller

    def attach(device: str, service: str) -> DeviceAttach:
        return DeviceAttach(device=device, gateway="gw1", at=time.time(), service=service)

    stop = asyncio.Event()
    async with (
        open_testbed_bus("controller") as cbus,
        cbus.subscribe(topics.attach()) as sub,
        device_buses({"d0": SERVICE, "d5": "s5"}, testbed) as buses,
    ):
        controller = Controller(config_for_testbed(debounce_s=0.3), cbus, devices=TestbedDevices())
        task = asyncio.create_task(controller.run(stop))
        try:
            await asyncio.wait_for(controller.ready.wait(), 10)
            d0 = buses["d0"]
            await d0.publish(topics.attach("d5"), attach("d5", "s5"))
            await d0.publish(topics.attach("d0"), attach("d0", "s5"))
            await d0.publish(topics.attach("d0"), attach("d0", SERVICE))
            # d0's attachment for d5 went first and never arrived: the broker dropped it.
            got = await attachments(sub, 2)
            assert [(a.device, a.service) for a in got] == [("d0", "s5"), ("d0", SERVICE)]
            for _ in range(100):
                if controller.stats.attach_events >= 2:
                    break
                await asyncio.sleep(0.05)
            assert controller.stats.refused_attach == 1
            assert set(controller.core.registry.attachments) == {"d0"}
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def test_one_devices_refusals_never_fail_another(
    testbed: TestbedState, tmp_path: Path
) -> None:
    # d9's service runs nowhere: each of its requests to gw2 draws an ICMP "port unreachable"
    # that comes back over the emulated link a little later. d0 keeps posting to s0 on gw1;
    # none of d9's errors may land on d0 (they did when the devices shared one socket).
    gateways = {n.name: n.data_ip for n in testbed.nodes}
    fleet = DeviceFleet(
        devices=[
            DeviceConfig("d0", SERVICE, PORT, "gw1"),
            DeviceConfig("d9", "s9", PORT + 9, "gw2"),
        ],
        gateways=gateways,
        out=tmp_path,
        settings=RequestSettings(interval_s=0.02, timeout_s=0.5, check_every_s=None),
        netns=testbed.device_host.netns,
    )
    summary = await fleet.run(3.0)
    d0, d9 = fleet.devices
    print(summary.per_device[0].stats.model_dump_json())
    assert summary.per_device[0].stats.requests > 50
    assert summary.per_device[0].stats.failed == 0
    refused = [r for r in d9.records if r.detail and "refused" in r.detail.lower()]
    assert len(refused) >= 3  # the kernel rate-limits ICMP errors: the rest time out
    assert d9.ledger is None  # never got a baseline from a service that does not exist
    assert summary.per_device[0].continuity.passed == 1  # the final check
    assert d0.ledger is not None


async def test_fleet_measures_a_migration_as_its_device_sees_it(
    testbed: TestbedState, tmp_path: Path
) -> None:
    # The device moves to gw2 as the service is migrated there (cold): it sees the service
    # from its last answer on gw1 to its first answer on gw2, which contains the platform's
    # downtime (dump + transfer + resume) and more.
    from fogmig.platform.agent.launcher import agents_down, agents_up
    from fogmig.platform.agent.remote import request_migration

    gateways = {n.name: n.data_ip for n in testbed.nodes}
    device = DeviceConfig("d1", "s1", PORT + 1, "gw1", Schedule((Hop(1.5, "gw2"),)))
    settings = RequestSettings(interval_s=0.1, timeout_s=0.5, ack_timeout_s=0.2, check_every_s=None)
    await deploy(ServiceSpec(name="s1", state_mb=4, dirty_kbps=10, port=PORT + 1), node="gw1")
    await agents_up()
    try:
        async with device_buses({"d1": "s1"}, testbed) as buses:
            back_on_gw2 = asyncio.Event()

            def watch(event: FleetEvent) -> None:
                # The migration was reported and the device has its answers again, on gw2.
                ok = isinstance(event, RequestRecord) and event.ok and event.gateway == "gw2"
                if ok and fleet.migrations:
                    back_on_gw2.set()

            fleet = DeviceFleet(
                devices=[device],
                gateways=gateways,
                buses=buses,
                out=tmp_path,
                settings=settings,
                on_event=watch,
                netns=testbed.device_host.netns,
            )
            running = asyncio.create_task(fleet.run())
            await asyncio.sleep(1.5)
            record = await request_migration("s1", "gw2", Technique.COLD, timeout=120)
            await asyncio.wait_for(back_on_gw2.wait(), 15)
            await asyncio.sleep(0.5)
            fleet.stop()
            summary = await running
    finally:
        await agents_down()
    print(json.dumps({"record_downtime_s": record.downtime_s, "total": record.total_time_s}))
    print(summary.model_dump_json(include={"stats", "outages", "migrations", "continuity"}))
    assert record.outcome is Outcome.COMPLETED
    (seen,) = summary.migrations
    assert (seen.migration_id, seen.technique, seen.destination) == (
        record.migration_id,
        "cold",
        "gw2",
    )
    assert seen.platform_downtime_s == pytest.approx(record.downtime_s)
    observed = seen.observed_downtime_s["d1"]
    assert observed is not None
    assert observed >= record.downtime_s
    assert summary.outages
    assert max(o.downtime_s for o in summary.outages) == pytest.approx(observed)
    c = summary.continuity
    assert (c.failed, c.lost, c.doubled) == (0, 0, 0)
    assert c.passed >= 2  # after the migration and at the end
    reasons = [ch.reason for ch in fleet.devices[0].checks]
    assert {"migration", "outage", "roam"} & set(reasons)
