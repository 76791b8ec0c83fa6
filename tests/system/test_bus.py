"""The bus against a real Mosquitto on loopback, configured as the testbed configures it: MQTT
over TLS 1.3 with client certificates of a site CA (the common name is the user), the ACL, a
packet size limit and persistence.

Round trips of every model, retained status and the last-will after a killed client, request and
acknowledgement, timeouts, reconnection after a broker restart, a publish the ACL denies, a
client without a certificate or with one of another CA, client ids bound to certificates (no
takeover of another's session), devices that write only their own attachment, and retained
state across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fogmig.platform.base.errors import BusError, ServiceError, UnknownNodeError
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Phase, Technique
from fogmig.platform.bus.client import (
    Bus,
    CommandRejectedError,
    CommandTimeoutError,
    Received,
    Subscription,
)
from fogmig.platform.bus.schemas import (
    BusMessage,
    Cleared,
    CommandAck,
    Decision,
    DeployCommand,
    DeviceAttach,
    DrainCommand,
    LinkMeasurement,
    MigrateCommand,
    MigrationDone,
    MigrationProgress,
    NodeStatus,
    ServiceInfo,
    ServicePresence,
    UndeployCommand,
    accept,
    command_id_of,
    reject,
)
from fogmig.platform.bus.topics import Rejection, SchemaError, topics
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import IdentityFiles, create_ca, issue, save_ca, save_identity
from fogmig.platform.security.tls import broker_client_context
from fogmig.platform.testbed.broker import (
    CONTROLLER_USER,
    OPERATOR_USER,
    BrokerFiles,
    acl_rules,
    render_acl,
    render_config,
)
from fogmig.platform.testbed.state import BrokerInfo

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto"),
    pytest.mark.timeout(60),
]

NODES = ("gw1", "gw2")
IDENTITIES = {
    CONTROLLER_USER: Identity.controller(),
    "gw1": Identity.node("gw1"),
    "gw2": Identity.node("gw2"),
    OPERATOR_USER: Identity.operator(),
    "d1": Identity.device("d1"),
    "d2": Identity.device("d2"),
}


def _acl() -> str:
    # The testbed's own rules: nodes read the whole tree and write only their own subtree, so a
    # node cannot command another; a device writes only its own attachment; the operator
    # commands nodes; the controller reads and writes everything.
    return render_acl(acl_rules(NODES, controller=CONTROLLER_USER, operator=OPERATOR_USER))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A private Mosquitto: own port, own CA, certificates and ACL, killed by its own PID."""

    folder: Path
    port: int
    identities: dict[str, IdentityFiles]
    proc: asyncio.subprocess.Process | None = None
    starts: int = field(default=0)

    @property
    def log_path(self) -> Path:
        return self.folder / "mosquitto.out"

    async def stop(self) -> None:
        """A clean stop (SIGTERM): the broker writes its persistent state."""
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            await self.proc.wait()
        self.proc = None

    async def start(self) -> None:
        with (self.folder / "mosquitto.out").open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                "mosquitto", "-c", str(self.folder / "mosquitto.conf"), stdout=out, stderr=out
            )
        self.starts += 1
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            except OSError:
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start (log: {self.log_path})") from None
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self.proc = None

    def bus(self, user: str, **kwargs: object) -> Bus:
        return Bus(
            host="127.0.0.1",
            port=self.port,
            tls=broker_client_context(self.identities[user]),
            # Asked for, and ignored: the broker names every client by its certificate.
            client_id=f"{user}-fmbus-{os.urandom(3).hex()}",
            **kwargs,  # type: ignore[arg-type]
        )


def _write_broker_files(folder: Path, port: int) -> dict[str, IdentityFiles]:
    """The testbed's own configuration of the broker, on loopback, with a fresh site CA."""
    files = BrokerFiles.of(folder)
    files.data.mkdir()
    ca = create_ca(name="fmbus test CA")
    save_ca(ca, folder / "pki")
    broker = save_identity(issue(ca, Identity.broker(), ip_addresses=["127.0.0.1"]), folder / "pki")
    shutil.copyfile(broker.ca, files.ca)
    shutil.copyfile(broker.cert, files.cert)
    shutil.copyfile(broker.key, files.key)
    identities = {
        user: save_identity(issue(ca, identity), folder / "pki")
        for user, identity in IDENTITIES.items()
    }
    files.acl.write_text(_acl())
    info = BrokerInfo(
        netns="-",
        ip="127.0.0.1",
        port=port,
        config_path=str(folder / "mosquitto.conf"),
        log_path=str(folder / "mosquitto.out"),
    )
    # Everything, for the denied publishes the tests look for.
    (folder / "mosquitto.conf").write_text(render_config(info, files) + "log_type all\n")
    with contextlib.suppress(KeyError):
        # Mosquitto started as root drops to its own user and must still read its files.
        entry = pwd.getpwnam("mosquitto")
        for p in [folder, files.data, *folder.iterdir()]:
            os.chown(p, entry.pw_uid, entry.pw_gid)
    return identities


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    folder = Path(tempfile.mkdtemp(prefix="fmbus-"))
    port = _free_port()
    identities = _write_broker_files(folder, port)
    b = Broker(folder, port, identities)
    await b.start()
    try:
        yield b
    finally:
        await b.kill()
        shutil.rmtree(folder, ignore_errors=True)


def _status(node: str, *, online: bool = True) -> NodeStatus:
    return NodeStatus(
        node=node,
        online=online,
        at=time.time(),
        load=0.25,
        mem_total_bytes=1 << 30,
        mem_free_bytes=1 << 29,
        services=[
            ServiceInfo(
                name="sensor",
                state_bytes=4 << 20,
                dirty_rate_bytes_per_s=1e5,
                data_ip="10.10.0.1",
                port=5683,
            )
        ],
        capabilities=NodeCapabilities(criu_version="4.2.1", postcopy=True, native_predump=False),
        links=[LinkMeasurement(peer="gw2", rtt_s=0.01, throughput_bytes_per_s=1.25e6, at=1.0)],
    )


async def _next(sub: Subscription, timeout: float = 5.0) -> Received:
    return await asyncio.wait_for(anext(sub), timeout)


async def _until(
    sub: Subscription, accept: Callable[[Received], bool], timeout: float = 8.0
) -> Received:
    async with asyncio.timeout(timeout):
        async for item in sub:
            if accept(item):
                return item
    raise AssertionError(f"subscription {sub.pattern} ended")


async def test_round_trip_of_every_model(broker: Broker) -> None:
    now = time.time()
    samples: list[tuple[str, BusMessage]] = [
        (topics.status("gw1"), _status("gw1")),
        (
            topics.cmd("gw1"),
            MigrateCommand(
                command_id="c1", service="sensor", destination="gw2", technique="hybrid"
            ),
        ),
        (topics.cmd("gw1"), DeployCommand(command_id="c2", service="s", state_mb=4, dirty_kbps=8)),
        (topics.cmd("gw1"), UndeployCommand(command_id="c3", service="s")),
        (topics.cmd("gw2"), DrainCommand(command_id="c4")),
        (topics.events("gw1"), CommandAck(node="gw1", command_id="c1", accepted=True)),
        (
            topics.events("gw1"),
            MigrationProgress(
                node="gw1",
                command_id="c1",
                migration_id="m1",
                service="sensor",
                phase=Phase.TRANSFERRING,
                bytes_done=10,
                bytes_total=20,
                rate_bytes_per_s=5.0,
                at=now,
            ),
        ),
        (
            topics.events("gw1"),
            MigrationDone(
                node="gw1",
                command_id="c1",
                migration_id="m1",
                service="sensor",
                outcome=Outcome.COMPLETED,
                record=MigrationRecord(
                    migration_id="m1",
                    service="sensor",
                    source="gw1",
                    destination="gw2",
                    technique=Technique.COLD,
                    outcome=Outcome.COMPLETED,
                    dump_time_s=0.5,
                ),
            ),
        ),
        (
            topics.service("gw2", "sensor"),
            ServicePresence(
                service="sensor", node="gw2", data_ip="10.10.0.2", port=5683, present=True, at=now
            ),
        ),
        (topics.attach("dev-1"), DeviceAttach(device="dev-1", gateway="gw2", at=now, service="s")),
        (
            topics.decisions(),
            Decision(
                service="sensor",
                source="gw1",
                destination="gw2",
                technique="precopy",
                reason="device roamed",
                predicted={"downtime_s": 0.4},
                trigger="mobility",
                at=now,
            ),
        ),
    ]
    async with (
        broker.bus("controller", known_nodes=set(NODES)) as bus,
        bus.subscribe(topics.everything()) as sub,
    ):
        for topic, model in samples:
            await bus.publish(topic, model)
            got = await _next(sub)
            assert got.topic == topic
            assert got.message == model
        # An empty retained payload clears a node's status, never a service's presence.
        await bus.clear(topics.status("gw1"))
        got = await _next(sub)
        assert isinstance(got.message, Cleared)
        assert got.message.topic.node == "gw1"
        with pytest.raises(BusError):
            await bus.clear(topics.service("gw2", "sensor"))


WILL_CLIENT = """
import asyncio, sys, time
from pathlib import Path
from fogmig.platform.bus.client import Bus
from fogmig.platform.base.vocabulary import NodeCapabilities
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import identity_files
from fogmig.platform.security.tls import broker_client_context
from fogmig.platform.bus.schemas import NodeStatus
from fogmig.platform.bus.topics import topics

def status(online):
    return NodeStatus(node="gw1", online=online, at=time.time(), load=0.1, mem_total_bytes=1,
        mem_free_bytes=1, capabilities=NodeCapabilities(criu_version=None, postcopy=False,
        native_predump=False))

async def main():
    port, pki = int(sys.argv[1]), Path(sys.argv[2])
    tls = broker_client_context(identity_files(pki, Identity.node("gw1")))
    async with Bus(host="127.0.0.1", port=port, tls=tls, client_id="gw1-will",
                   will=status(False)) as bus:
        await bus.publish(topics.status("gw1"), status(True), retain=True)
        print("ready", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_retained_status_and_last_will_after_the_client_is_killed(broker: Broker) -> None:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WILL_CLIENT,
        str(broker.port),
        str(broker.folder / "pki"),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 20)
        assert line.strip() == b"ready"
        async with (
            broker.bus("gw2") as observer,
            observer.subscribe(topics.status("gw1")) as sub,
        ):
            # A late subscriber gets the retained status at once.
            first = await _next(sub)
            assert isinstance(first.message, NodeStatus)
            assert first.message.online
            killed_at = time.time()
            os.kill(child.pid, signal.SIGKILL)  # no DISCONNECT: the broker sends the will
            await child.wait()
            will = await _until(
                sub, lambda r: isinstance(r.message, NodeStatus) and not r.message.online
            )
            assert isinstance(will.message, NodeStatus)
            assert will.message.node == "gw1"
            assert time.time() - killed_at < 5
        # ...and the offline status is what stays retained.
        async with broker.bus("gw2") as late, late.subscribe(topics.status("gw1")) as sub:
            retained = await _next(sub)
            assert isinstance(retained.message, NodeStatus)
            assert not retained.message.online
    finally:
        if child.returncode is None:
            os.kill(child.pid, signal.SIGKILL)
            await child.wait()


async def test_clean_close_publishes_offline_status(broker: Broker) -> None:
    async with broker.bus("gw1", will=_status("gw1", online=False)) as bus:
        await bus.publish(topics.status("gw1"), _status("gw1"), retain=True)
    async with broker.bus("gw2") as late, late.subscribe(topics.status("gw1")) as sub:
        retained = await _next(sub)
        assert isinstance(retained.message, NodeStatus)
        assert not retained.message.online


async def _responder(bus: Bus, node: str, seen: list[str], ready: asyncio.Event) -> None:
    """A minimal agent: accepts migrations, refuses everything else."""
    async with bus.subscribe(topics.cmd(node)) as commands:
        ready.set()
        async for _, cmd in commands:
            assert isinstance(cmd, MigrateCommand | DeployCommand | UndeployCommand | DrainCommand)
            seen.append(cmd.command_id)
            if isinstance(cmd, MigrateCommand):
                ack = accept(node, cmd.command_id)
            else:
                ack = reject(node, cmd.command_id, ServiceError("this node only migrates"))
            await bus.publish(topics.events(node), ack)


@contextlib.asynccontextmanager
async def _agent(broker: Broker, node: str, seen: list[str]) -> AsyncIterator[None]:
    pending: set[asyncio.Task[None]] = set()

    def answer_invalid(topic: str, payload: bytes, error: SchemaError) -> None:
        # An invalid command that still carries its id is answered, so its sender fails fast.
        command_id = command_id_of(payload)
        if topic == topics.cmd(node) and command_id is not None:
            ack = reject(node, command_id, error)
            task = asyncio.create_task(bus.publish(topics.events(node), ack))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async with broker.bus(node, on_invalid=answer_invalid) as bus:
        ready = asyncio.Event()
        task = asyncio.create_task(_responder(bus, node, seen, ready))
        await asyncio.wait_for(ready.wait(), 5)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _migrate(command_id: str) -> MigrateCommand:
    return MigrateCommand(
        command_id=command_id, service="sensor", destination="gw2", technique="precopy"
    )


async def test_request_is_acknowledged_or_rejected_by_the_node(broker: Broker) -> None:
    seen: list[str] = []
    async with _agent(broker, "gw1", seen), broker.bus("controller") as ctl:
        ack = await ctl.request("gw1", _migrate("m-ok"), timeout=5)
        assert ack.accepted
        assert ack.command_id == "m-ok"
        with pytest.raises(CommandRejectedError) as info:
            await ctl.request("gw1", UndeployCommand(command_id="u-1", service="s"), timeout=5)
        assert info.value.ack.error_type == "ServiceError"
        assert "gw1" in str(info.value)
        assert "only migrates" in str(info.value)
        # Small control messages go out at once (TCP_NODELAY on both ends): without it every
        # request waits for a delayed ACK, about 40 ms each way on Linux.
        rtts = []
        for i in range(20):
            started = time.perf_counter()
            await ctl.request("gw1", _migrate(f"t{i}"), timeout=5)
            rtts.append(time.perf_counter() - started)
        assert sorted(rtts)[10] < 0.025, rtts
        # Concurrent requests each get their own acknowledgement.
        acks = await asyncio.gather(*(ctl.request("gw1", _migrate(f"m{i}")) for i in range(5)))
        assert [a.command_id for a in acks] == [f"m{i}" for i in range(5)]
    assert seen[:3] == ["m-ok", "u-1", "t0"]


async def test_an_invalid_command_is_answered_with_a_typed_rejection(broker: Broker) -> None:
    seen: list[str] = []
    async with (
        _agent(broker, "gw1", seen),
        broker.bus("controller", known_nodes=set(NODES)) as ctl,
        ctl.subscribe(topics.events("gw1")) as events,
    ):
        bad = _migrate("bad-1").model_dump_json().replace('"precopy"', '"teleport"', 1)
        # As the operator: a second controller connection would close ctl's (one per principal).
        await _mosquitto_pub(broker, OPERATOR_USER, topics.cmd("gw1"), bad.encode())
        got = await _next(events)
        assert isinstance(got.message, CommandAck)
        assert not got.message.accepted
        assert got.message.command_id == "bad-1"
        assert got.message.error_type == "SchemaError"
        assert "technique" in (got.message.reason or "")
        # A node the bus does not know is refused before anything is sent.
        with pytest.raises(UnknownNodeError, match="gw7"):
            await ctl.request("gw7", DrainCommand(command_id="d"), timeout=1)
    assert seen == []


async def test_request_without_an_agent_times_out_naming_the_node(broker: Broker) -> None:
    async with broker.bus("controller") as ctl:
        started = time.monotonic()
        with pytest.raises(CommandTimeoutError) as info:
            await ctl.request("gw2", DrainCommand(command_id="d-1"), timeout=0.8)
        assert 0.7 < time.monotonic() - started < 3
        assert info.value.node == "gw2"
        assert "gw2" in str(info.value)
        assert isinstance(info.value, BusError)


async def test_a_publish_the_acl_denies_is_dropped_and_the_request_times_out(
    broker: Broker,
) -> None:
    seen: list[str] = []
    async with _agent(broker, "gw1", seen):
        # gw2 may read gw1's events but not write gw1's commands: the broker acknowledges the
        # publish at QoS 1 and drops it, so only the end-to-end ack reveals the loss.
        async with broker.bus("gw2") as intruder:
            with pytest.raises(CommandTimeoutError) as info:
                await intruder.request("gw1", _migrate("from-gw2"), timeout=1.0)
            assert info.value.node == "gw1"
        # The same command with the controller's credentials goes through (the agent works).
        async with broker.bus("controller") as ctl:
            ack = await ctl.request("gw1", _migrate("from-ctl"), timeout=5)
            assert ack.accepted
    assert seen == ["from-ctl"]
    # The broker's own log shows it dropped the intruder's command.
    denied = [line for line in broker.log_path.read_text().splitlines() if "Denied PUBLISH" in line]
    assert len(denied) == 1
    # Named by its certificate, not by the client id it asked for.
    assert "Denied PUBLISH from gw2 " in denied[0]
    assert "fmbus" not in denied[0]
    assert topics.cmd("gw1") in denied[0]


async def test_reconnects_after_a_broker_restart_and_keeps_its_subscriptions(
    broker: Broker,
) -> None:
    async with (
        broker.bus("controller", backoff_initial=0.05, backoff_max=0.5) as ctl,
        ctl.subscribe(topics.status()) as sub,
    ):
        await ctl.publish(topics.status("gw1"), _status("gw1"))
        assert (await _next(sub)).topic == topics.status("gw1")
        assert ctl.connections == 1

        await broker.kill()
        # Published while the broker is down: sent once the bus is back.
        pending = asyncio.create_task(ctl.publish(topics.status("gw2"), _status("gw2"), timeout=15))
        await asyncio.sleep(0.5)
        assert not ctl.connected
        assert not pending.done()
        await broker.start()
        await asyncio.wait_for(pending, 15)
        assert ctl.connections == 2
        got = await _until(sub, lambda r: r.topic == topics.status("gw2"))
        assert isinstance(got.message, NodeStatus)

        # The subscription was restored at the broker: a message from another client arrives.
        async with broker.bus("gw1") as gw1:
            await gw1.publish(topics.status("gw1"), _status("gw1", online=True))
        got = await _until(sub, lambda r: r.topic == topics.status("gw1"))
        assert isinstance(got.message, NodeStatus)


def _tls_args(broker: Broker, user: str) -> list[str]:
    files = broker.identities[user]
    return ["--cafile", str(files.ca), "--cert", str(files.cert), "--key", str(files.key)]


async def _mosquitto_pub(broker: Broker, user: str, topic: str, payload: bytes) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(broker.port),
        *_tls_args(broker, user),
        "-q",
        "1",
        "-t",
        topic,
        "-s",
        stdin=asyncio.subprocess.PIPE,
    )
    await proc.communicate(payload)
    assert proc.returncode == 0


async def test_invalid_payloads_are_reported_and_never_break_the_stream(broker: Broker) -> None:
    reported: list[tuple[str, Rejection]] = []

    def on_invalid(topic: str, payload: bytes, error: SchemaError) -> None:
        reported.append((topic, error.reason))

    good = _status("gw1").model_dump_json().encode()
    bad: list[tuple[str, bytes, Rejection]] = [
        (topics.status("gw1"), b"{not json", Rejection.MALFORMED),
        (topics.status("gw1"), b"x" * (64 * 1024 + 1), Rejection.OVERSIZE),
        (
            topics.status("gw1"),
            good.replace(b'"version":1', b'"version":2'),
            Rejection.UNKNOWN_VERSION,
        ),
        (topics.events("gw1"), b'{"version":1,"kind":"reboot"}', Rejection.UNKNOWN_KIND),
        (topics.status("gw2"), good, Rejection.TOPIC_MISMATCH),
        (
            topics.status("gw1"),
            good.replace(b'"peer":"gw2"', b'"peer":"gw9"'),
            Rejection.UNKNOWN_NODE,
        ),
    ]
    async with (
        broker.bus("gw2", known_nodes=set(NODES), on_invalid=on_invalid) as bus,
        bus.subscribe(topics.everything()) as sub,
    ):
        for topic, payload, _ in bad:
            await _mosquitto_pub(broker, "controller", topic, payload)
        await _mosquitto_pub(broker, "controller", topics.status("gw1"), good)
        got = await _next(sub)  # the only valid one, after all the invalid ones
        assert got.message == NodeStatus.model_validate_json(good)
        assert bus.invalid == len(bad)
    assert reported == [(topic, reason) for topic, _, reason in bad]


async def test_a_client_without_a_certificate_of_the_site_ca_is_refused(
    broker: Broker, tmp_path: Path
) -> None:
    plain = Bus(host="127.0.0.1", port=broker.port, client_id="gw1-plain", connect_timeout=1.5)
    with pytest.raises(BusError):
        async with plain:
            pass
    # A certificate for the same name, from another CA.
    other = create_ca(name="not the site CA")
    save_ca(other, tmp_path)
    forged = save_identity(issue(other, Identity.controller()), tmp_path)
    forged = IdentityFiles(
        identity=forged.identity, cert=forged.cert, key=forged.key, ca=broker.identities["gw1"].ca
    )
    outsider = Bus(
        host="127.0.0.1",
        port=broker.port,
        tls=broker_client_context(forged),
        client_id="controller-forged",
        connect_timeout=1.5,
    )
    with pytest.raises(BusError):
        async with outsider:
            pass
    # Neither got anywhere: the broker's retained store has nothing from them.
    async with broker.bus("gw1") as bus:
        assert bus.connected


async def test_a_missing_broker_fails_after_the_timeout(broker: Broker) -> None:
    await broker.kill()
    started = time.monotonic()
    with pytest.raises(BusError, match="cannot reach"):
        async with broker.bus("gw1", connect_timeout=0.6):
            pass
    assert 0.5 < time.monotonic() - started < 4


async def test_a_certificate_is_the_identity_the_acl_names(broker: Broker) -> None:
    # gw1's certificate with another user name: the broker takes the certificate's name, so
    # gw1 still cannot publish under gw2's topics.
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(broker.port),
        *_tls_args(broker, "gw1"),
        "-u",
        "gw2",
        "-i",
        "gw2-agent",
        "-q",
        "1",
        "-t",
        topics.status("gw2"),
        "-r",
        "-m",
        _status("gw2").model_dump_json(),
    )
    await proc.wait()
    async with broker.bus("controller") as bus, bus.subscribe(topics.status("gw2")) as sub:
        with pytest.raises(TimeoutError):
            await _next(sub, timeout=1.0)


async def test_retained_state_survives_a_broker_restart(broker: Broker) -> None:
    async with broker.bus("gw1") as gw1:
        await gw1.publish(topics.status("gw1"), _status("gw1"), retain=True)
        presence = ServicePresence(
            service="sensor",
            node="gw1",
            data_ip="10.10.0.1",
            port=5683,
            present=True,
            at=time.time(),
            seq=3,
        )
        await gw1.publish(topics.service("gw1", "sensor"), presence, retain=True)
    await broker.stop()
    await broker.start()
    async with broker.bus("controller") as ctl, ctl.subscribe(topics.everything()) as sub:
        got = {(await _next(sub)).topic for _ in range(2)}
    assert got == {topics.status("gw1"), topics.service("gw1", "sensor")}


async def test_publishing_a_model_on_the_wrong_topic_is_refused_before_sending(
    broker: Broker,
) -> None:
    async with broker.bus("controller", known_nodes=set(NODES)) as bus:
        with pytest.raises(SchemaError) as info:
            await bus.publish(topics.status("gw2"), _status("gw1"))
        assert info.value.reason is Rejection.TOPIC_MISMATCH
        with pytest.raises(SchemaError) as info:
            await bus.publish(topics.cmd("gw1"), _status("gw1"))
        assert info.value.reason is Rejection.TOPIC_MISMATCH


async def test_streams_end_when_the_bus_closes(broker: Broker) -> None:
    async with broker.bus("gw1") as bus:
        sub = bus.subscribe(topics.status())
        await sub.open()
        reader = asyncio.create_task(anext(sub))
        await asyncio.sleep(0.1)
        assert not reader.done()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reader, 2)
    with pytest.raises(BusError, match="not open"):
        bus.subscribe(topics.status())
    with pytest.raises(BusError, match="closed"):
        await bus.publish(topics.status("gw1"), _status("gw1"))


# --- client ids bound to certificates ----------------------------------------------------------


async def _mosquitto_pub_as(
    broker: Broker, user: str, client_id: str, topic: str, payload: bytes
) -> None:
    """``mosquitto_pub`` with ``user``'s certificate asking for ``client_id``."""
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *("-h", "127.0.0.1", "-p", str(broker.port)),
        *_tls_args(broker, user),
        *("-i", client_id, "-q", "1", "-t", topic, "-s"),
        stdin=asyncio.subprocess.PIPE,
    )
    await proc.communicate(payload)
    assert proc.returncode == 0


async def test_another_principal_cannot_take_over_a_session_by_its_client_id(
    broker: Broker,
) -> None:
    seen: list[str] = []
    async with _agent(broker, "gw1", seen), broker.bus("controller") as ctl:
        agent_id = "gw1"
        # gw2's certificate asking for gw1's ids, the one the broker gives gw1 included.
        for asked in (agent_id, "gw1-agent", "controller"):
            await _mosquitto_pub_as(
                broker,
                "gw2",
                asked,
                topics.status("gw2"),
                _status("gw2").model_dump_json().encode(),
            )
        await asyncio.sleep(0.5)
        # gw1's agent and the controller kept their sessions: no reconnect, commands still work.
        ack = await ctl.request("gw1", _migrate("after"), timeout=5)
        assert ack.accepted
        assert ctl.connections == 1
    assert seen == ["after"]
    log = broker.log_path.read_text()
    assert "gw1 already connected" not in log
    assert "controller already connected" not in log
    # Each of gw2's connections went in as gw2, whatever id it asked for.
    assert "New client connected from 127.0.0.1" in log
    assert " as gw1-agent " not in log


async def test_one_connection_per_principal(broker: Broker) -> None:
    # The price of binding ids to certificates: a second client of one principal closes the
    # first (which reconnects), so every concurrent role needs its own principal.
    async with broker.bus("gw1", backoff_initial=0.05, backoff_max=0.2) as first:
        await _mosquitto_pub_as(
            broker,
            "gw1",
            "another",
            topics.status("gw1"),
            _status("gw1").model_dump_json().encode(),
        )
        for _ in range(100):
            if first.connections >= 2:
                break
            await asyncio.sleep(0.05)
        assert first.connections == 2
    assert "Client gw1 already connected, closing old connection." in broker.log_path.read_text()
    # The operator and the controller are two principals: connected side by side.
    async with broker.bus("controller") as ctl, broker.bus(OPERATOR_USER) as op:
        await asyncio.sleep(0.5)
        assert (ctl.connections, op.connections) == (1, 1)


async def test_two_clients_of_one_principal_are_told_why_they_keep_losing_the_broker(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    def told() -> bool:
        return any("same certificate" in r.getMessage() for r in caplog.records)

    fast = {"backoff_initial": 0.05, "backoff_max": 0.4}
    with caplog.at_level(logging.ERROR, logger="fogmig.platform.bus.client"):
        async with broker.bus("gw2", **fast) as a, broker.bus("gw2", **fast) as b:
            for _ in range(200):
                if told():
                    break
                await asyncio.sleep(0.05)
            # Each closed the other's connection in turn, with a growing pause between.
            assert a.connections + b.connections < 40
    assert told()


async def test_a_plaintext_client_cannot_take_over_a_session(broker: Broker) -> None:
    async with broker.bus("gw1") as gw1:
        plain = Bus(host="127.0.0.1", port=broker.port, client_id="gw1", connect_timeout=1.5)
        with pytest.raises(BusError):
            async with plain:
                pass
        await asyncio.sleep(0.3)
        assert gw1.connected
        assert gw1.connections == 1


# --- devices -----------------------------------------------------------------------------------


def _attach(device: str, service: str) -> DeviceAttach:
    return DeviceAttach(device=device, gateway="gw1", at=time.time(), service=service)


async def test_a_device_publishes_only_its_own_attachment(broker: Broker) -> None:
    async with (
        broker.bus("controller") as ctl,
        ctl.subscribe(topics.everything()) as sub,
        broker.bus("d1") as d1,
    ):
        # For another device, on another's topic or on a node's: acknowledged and dropped.
        await d1.publish(topics.attach("d2"), _attach("d2", "s2"))
        presence = ServicePresence(
            service="s2", node="gw1", data_ip="10.10.0.1", port=5683, present=True, at=time.time()
        )
        await d1.publish(topics.service("gw1", "s2"), presence)
        await d1.publish(topics.status("gw1"), _status("gw1"))
        await d1.publish(topics.cmd("gw1"), _migrate("from-d1"))
        # Its own attachment goes through (and is the only message that does).
        await d1.publish(topics.attach("d1"), _attach("d1", "s1"))
        got = await _next(sub)
        assert got.topic == topics.attach("d1")
        assert isinstance(got.message, DeviceAttach)
        assert (got.message.device, got.message.service) == ("d1", "s1")
        with pytest.raises(TimeoutError):
            await _next(sub, timeout=0.5)
        # It reads what a device host needs: the nodes' events and the services' presence.
        async with d1.subscribe(topics.events()) as events, d1.subscribe(topics.service()) as svc:
            ack = CommandAck(node="gw1", command_id="c1", accepted=True)
            await ctl.publish(topics.events("gw1"), ack)
            await ctl.publish(topics.service("gw1", "s2"), presence)
            assert (await _next(events)).message == ack
            assert (await _next(svc)).message == presence
    denied = [line for line in broker.log_path.read_text().splitlines() if "Denied PUBLISH" in line]
    assert len(denied) == 4
    assert all("Denied PUBLISH from d1 " in line for line in denied)
