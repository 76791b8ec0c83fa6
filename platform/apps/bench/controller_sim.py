"""Surroundings for exercising the controller alone: a private Mosquitto on loopback (own port,
passwords and ACL, stopped by its own PID) and scripted nodes that answer commands like agents.

The benchmark and the system tests use them where the controller, not a migration, is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fogmig.platform.agent.admission import Admission, CommandRefusedError
from fogmig.platform.base.errors import FogmigError, ServiceError, TestbedError
from fogmig.platform.base.proc import terminate
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import (
    Command,
    DrainCommand,
    MigrateCommand,
    MigrationDone,
    NodeStatus,
    ServiceInfo,
    ServicePresence,
    accept,
    reject,
)
from fogmig.platform.bus.topics import topics
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import (
    CertificateAuthority,
    IdentityFiles,
    create_ca,
    issue,
    save_ca,
    save_identity,
)
from fogmig.platform.security.tls import broker_client_context
from fogmig.platform.testbed.broker import (
    BROKER_USER,
    CONTROLLER_USER,
    OPERATOR_USER,
    Acl,
    AclRule,
    BrokerFiles,
    acl_rules,
    render_acl,
    render_config,
)
from fogmig.platform.testbed.state import BrokerInfo

DEVICE_HOST = "dev"
"""The benchmark's stand-in for a fleet: one connection that may announce any device (only with
``LocalBroker(fleet=True)``, on that private broker)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """Mosquitto on 127.0.0.1 configured as the testbed's broker (TLS with certificates, ACL).

    Users: ``controller``, ``operator``, one per node, and the devices :meth:`enroll` issues a
    certificate (the controller's device directory is :meth:`service_of`); with ``fleet`` also
    ``dev``, which may announce every device's attachment (a benchmark's thousand devices on
    one connection). Use as ``async with LocalBroker(nodes=[...]) as broker: broker.bus("gw1")``.
    """

    def __init__(self, *, nodes: Sequence[str], nodelay: bool = True, fleet: bool = False) -> None:
        self.nodes = tuple(nodes)
        self.fleet = fleet
        self.devices: dict[str, str] = {}
        """Each enrolled device's service."""
        self._ca: CertificateAuthority | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.identities: dict[str, IdentityFiles] = {}
        """Each user's certificate, key and the CA's certificate (made at start)."""
        self.folder: Path | None = None
        self._nodelay = nodelay
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def log_path(self) -> Path:
        assert self.folder is not None
        return self.folder / "mosquitto.log"

    async def __aenter__(self) -> Self:
        if shutil.which("mosquitto") is None:
            raise TestbedError("mosquitto is not installed")
        self.folder = Path(tempfile.mkdtemp(prefix="fmctl-broker-"))
        try:
            await self._write_files(self.folder)
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _write_files(self, folder: Path) -> None:
        """The testbed's broker configuration on loopback, with a CA of its own."""
        self.port = free_port()
        files = BrokerFiles.of(folder)
        files.data.mkdir(mode=0o700)
        pki = folder / "pki"
        ca = create_ca(name="fogmig bench CA")
        save_ca(ca, pki)
        broker = save_identity(issue(ca, Identity.broker(), ip_addresses=[self.host]), pki)
        for src, dst in ((broker.ca, files.ca), (broker.cert, files.cert), (broker.key, files.key)):
            shutil.copyfile(src, dst)
        self._ca = ca
        self.identities = {
            CONTROLLER_USER: save_identity(issue(ca, Identity.controller()), pki),
            OPERATOR_USER: save_identity(issue(ca, Identity.operator()), pki),
            **{n: save_identity(issue(ca, Identity.node(n)), pki) for n in self.nodes},
        }
        acl = acl_rules(self.nodes, controller=CONTROLLER_USER, operator=OPERATOR_USER)
        if self.fleet:
            self.identities[DEVICE_HOST] = save_identity(
                issue(ca, Identity.device(DEVICE_HOST)), pki
            )
            fleet = (AclRule("write", topics.attach()),)
            acl = Acl(users={**acl.users, DEVICE_HOST: fleet}, patterns=acl.patterns)
        files.acl.write_text(render_acl(acl))
        info = BrokerInfo(
            netns="-",
            ip=self.host,
            port=self.port,
            config_path=str(folder / "mosquitto.conf"),
            log_path=str(self.log_path),
        )
        lines = render_config(info, files).splitlines()
        if not self._nodelay:
            lines.remove("set_tcp_nodelay true")
        lines.append(f"log_dest file {self.log_path}")
        (folder / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        with contextlib.suppress(KeyError):
            # Started as root, Mosquitto drops to its own user and must still read its files.
            entry = pwd.getpwnam(BROKER_USER)
            for p in [folder, files.data, *folder.iterdir()]:
                os.chown(p, entry.pw_uid, entry.pw_gid)

    def enroll(self, device: str, service: str) -> None:
        """A certificate for ``device`` (its user name on this broker), bound to ``service``."""
        assert self._ca is not None
        assert self.folder is not None
        if device not in self.identities:
            identity = issue(self._ca, Identity.device(device))
            self.identities[device] = save_identity(identity, self.folder / "pki")
        self.devices[device] = service

    def service_of(self, device: str) -> str | None:
        """The controller's device directory on this broker."""
        return self.devices.get(device)

    def tls(self, user: str) -> ssl.SSLContext:
        """A client context with ``user``'s certificate."""
        return broker_client_context(self.identities[user])

    async def _start(self) -> None:
        assert self.folder is not None
        self._proc = await asyncio.create_subprocess_exec(
            "mosquitto",
            "-c",
            str(self.folder / "mosquitto.conf"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if self._proc.returncode is not None or time.monotonic() > deadline:
                    raise TestbedError(
                        f"mosquitto did not start on {self.host}:{self.port}",
                        hint=f"see {self.log_path}",
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await terminate(proc, grace=5.0)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def bus(self, user: str, **kwargs: Any) -> Bus:
        """A bus client of ``user`` on this broker; the broker names it ``user`` and keeps one
        connection per user (a second one closes the first)."""
        return Bus(
            host=self.host,
            port=self.port,
            tls=self.tls(user),
            client_id=user,
            **kwargs,
        )


@dataclass(frozen=True, slots=True)
class Received:
    """A command as a simulated node received it (``at``: monotonic clock)."""

    command: Command
    at: float


class SimulatedNode:
    """A node that answers commands like an agent, without containers.

    It acknowledges a MigrateCommand (or rejects the next ``reject`` of them), then hands the
    service to the destination node after ``migrate_delay_s`` and reports MigrationDone with a
    record; it acknowledges a DrainCommand and reports ``draining`` from then on. Every command
    is kept in ``received`` and offered on :meth:`next_command`.
    """

    def __init__(
        self,
        bus: Bus,
        node: str,
        *,
        data_ip: str = "127.0.0.1",
        load: float = 0.1,
        postcopy: bool = True,
        reject: int = 0,
        migrate_delay_s: float = 0.0,
        downtime_s: float = 0.3,
    ) -> None:
        self.bus = bus
        self.node = node
        self.data_ip = data_ip
        self.load = load
        self.postcopy = postcopy
        self.reject = reject
        self.migrate_delay_s = migrate_delay_s
        self.downtime_s = downtime_s
        self.draining = False
        self.admission = Admission()
        """Each command id taken once, as an agent does (a replay is refused)."""
        self.migrating: set[str] = set()
        self.services: dict[str, ServiceInfo] = {}
        self.peers: dict[str, SimulatedNode] = {}
        self.received: list[Received] = []
        self.done: asyncio.Queue[MigrationDone] = asyncio.Queue()
        self._commands: asyncio.Queue[Received] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def add_service(
        self, name: str, *, state_bytes: int = 4 << 20, dirty: float = 1e4, port: int = 5683
    ) -> None:
        self.services[name] = ServiceInfo(
            name=name,
            state_bytes=state_bytes,
            dirty_rate_bytes_per_s=dirty,
            data_ip=self.data_ip,
            port=port,
        )

    def status(self) -> NodeStatus:
        return NodeStatus(
            node=self.node,
            online=True,
            at=time.time(),
            load=self.load,
            mem_total_bytes=8 << 30,
            mem_free_bytes=4 << 30,
            services=list(self.services.values()),
            capabilities=NodeCapabilities(
                criu_version="4.2.1", postcopy=self.postcopy, native_predump=False
            ),
            draining=self.draining,
            migrating=sorted(self.migrating),
        )

    async def publish_status(self) -> None:
        await self.bus.publish(topics.status(self.node), self.status(), retain=True)

    async def withdraw(self, service: str, info: ServiceInfo, *, timeout: float = 10.0) -> None:
        """This node no longer runs ``service`` (a retained ``present=False``)."""
        gone = ServicePresence(
            service=service,
            node=self.node,
            data_ip=info.data_ip,
            port=info.port,
            present=False,
            at=time.time(),
        )
        await self.bus.publish(
            topics.service(self.node, service), gone, retain=True, timeout=timeout
        )

    async def announce(self, service: str) -> None:
        info = self.services[service]
        await self.bus.publish(
            topics.service(self.node, service),
            ServicePresence(
                service=service,
                node=self.node,
                data_ip=info.data_ip,
                port=info.port,
                present=True,
                at=time.time(),
            ),
            retain=True,
        )

    async def start(self, *, presence: bool = True) -> None:
        """Publish status (and presence of each service), then serve commands."""
        self._serving = asyncio.create_task(self._serve(), name=f"sim:{self.node}")
        await self._subscribed.wait()
        await self.publish_status()
        if presence:
            for service in list(self.services):
                await self.announce(service)

    async def stop(self) -> None:
        """Stop serving and clear what this node left retained on the broker."""
        tasks = [t for t in (self._serving, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        with contextlib.suppress(FogmigError):
            for s, info in self.services.items():
                await self.withdraw(s, info, timeout=2.0)
            await self.bus.clear(topics.status(self.node), timeout=2.0)

    async def next_command(self, timeout: float = 10.0) -> Received:
        return await asyncio.wait_for(self._commands.get(), timeout)

    async def _serve(self) -> None:
        async with self.bus.subscribe(topics.cmd(self.node)) as sub:
            self._subscribed.set()
            async for _, msg in sub:
                received = Received(msg, time.monotonic())  # type: ignore[arg-type]
                await self._handle(received)

    async def _handle(self, received: Received) -> None:
        cmd = received.command
        self.received.append(received)
        self._commands.put_nowait(received)
        events = topics.events(self.node)
        try:
            self.admission.admit(cmd.command_id, cmd.at, time.time())
        except CommandRefusedError as exc:
            await self.bus.publish(events, reject(self.node, cmd.command_id, exc))
            return
        match cmd:
            case MigrateCommand():
                if self.reject > 0:
                    self.reject -= 1
                    await self.bus.publish(events, reject(self.node, cmd.command_id, "busy"))
                elif cmd.service not in self.services:
                    error = ServiceError(f"{cmd.service} does not run on {self.node}")
                    await self.bus.publish(events, reject(self.node, cmd.command_id, error))
                else:
                    self.migrating.add(cmd.service)
                    await self.bus.publish(events, accept(self.node, cmd.command_id))
                    task = asyncio.create_task(self._migrate(cmd))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            case DrainCommand():
                await self.bus.publish(events, accept(self.node, cmd.command_id))
                self.draining = True
                await self.publish_status()
            case _:
                await self.bus.publish(
                    events, reject(self.node, cmd.command_id, f"{cmd.kind} is not simulated")
                )

    async def _migrate(self, cmd: MigrateCommand) -> None:
        await asyncio.sleep(self.migrate_delay_s)
        peer = self.peers[cmd.destination]
        info = self.services.pop(cmd.service)
        self.migrating.discard(cmd.service)
        started = time.time()
        peer.services[cmd.service] = info.model_copy(update={"data_ip": peer.data_ip})
        await peer.announce(cmd.service)
        await peer.publish_status()
        await self.withdraw(cmd.service, info)
        await self.publish_status()
        record = MigrationRecord(
            migration_id=f"sim-{cmd.command_id}",
            service=cmd.service,
            source=self.node,
            destination=cmd.destination,
            technique=cmd.technique,
            outcome=Outcome.COMPLETED,
            dump_time_s=self.downtime_s / 2,
            dump_transfer_time_s=self.downtime_s / 2,
            dump_bytes=info.state_bytes,
            state_bytes=info.state_bytes,
            started_at=started,
            finished_at=time.time(),
        )
        done = MigrationDone(
            node=self.node,
            command_id=cmd.command_id,
            migration_id=record.migration_id,
            service=cmd.service,
            outcome=Outcome.COMPLETED,
            record=record,
        )
        await self.bus.publish(topics.events(self.node), done)
        self.done.put_nowait(done)
