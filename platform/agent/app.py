"""``fogmig agent``: the daemon of one fog node.

It runs inside the node's network namespace, publishes the node's status (retained, with a
last-will), takes migration commands for its services over MQTT (acknowledging each end to end,
refusing malformed or impossible ones with a typed rejection), drives outgoing migrations, and
serves incoming ones and lazy page requests over the authenticated transfer channel.

Log levels: INFO for commands, migrations and their outcome; WARNING for rejected commands,
rollbacks and lost connections; DEBUG for every call and page request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogmig.platform.agent.forwarding import Forwarder, Location
from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError, FogmigError, MigrationError, UnknownNodeError
from fogmig.platform.base.nodes import check_node_name, runc_root
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import (
    Cleared,
    Command,
    DeployCommand,
    DrainCommand,
    LinkMeasurement,
    MigrateCommand,
    MigrationDone,
    MigrationProgress,
    NodeCapabilities,
    NodeStatus,
    SchemaError,
    ServiceInfo,
    ServicePresence,
    UndeployCommand,
    accept,
    command_id_of,
    reject,
    topics,
)
from fogmig.platform.migration.destination import Destination, Fetch
from fogmig.platform.migration.record import save_record
from fogmig.platform.migration.source import migrate_service
from fogmig.platform.runtime.bundle import read_config
from fogmig.platform.runtime.capabilities import criu_capabilities
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.transfer.client import TransferClient
from fogmig.platform.transfer.server import (
    CallReply,
    TransferServer,
    TransferSession,
    remove_migration_dir,
)
from fogmig.policies.conditions import PrecopyStopRules
from fogmig.services.image import find_image

log = logging.getLogger(__name__)

TRANSFER_PORT = 7700
MAX_PAGES_PER_CALL = 256  # 1 MiB: the transfer channel's limit for binary call results


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything one node's agent needs to know about itself and its peers."""

    node: str
    data_ip: str
    peers: dict[str, str]  # node -> data IP
    broker_host: str
    broker_port: int
    mqtt_username: str
    mqtt_password: str
    secret: bytes
    transfer_port: int = TRANSFER_PORT
    status_interval_s: float = 5.0
    fence_timeout_s: float = 20.0
    link_probe_interval_s: float = 60.0
    link_probe_bytes: int = 2 * 1024 * 1024

    @classmethod
    def from_file(cls, path: Path) -> AgentConfig:
        """The configuration of a real node from a TOML file (see ``compose/``)."""
        from fogmig.platform.agent.config import load_agent_config

        s = load_agent_config(path)
        return cls(
            node=s.node,
            data_ip=s.data_ip,
            peers=dict(s.peers),
            broker_host=s.broker_host,
            broker_port=s.broker_port,
            mqtt_username=s.mqtt_username,
            mqtt_password=s.mqtt_password,
            secret=s.secret,
            transfer_port=s.transfer_port,
            status_interval_s=s.status_interval_s,
            fence_timeout_s=s.fence_timeout_s,
        )

    @classmethod
    def from_testbed(cls, node: str) -> AgentConfig:
        """The configuration of ``node`` on the embedded testbed."""
        from fogmig.platform.testbed.credentials import load_credentials
        from fogmig.platform.testbed.state import load_state

        state = load_state()
        creds = load_credentials()
        nodes = {n.name: n for n in state.nodes}
        if node not in nodes:
            raise UnknownNodeError(
                f"the testbed has no node {node!r}; nodes: {', '.join(sorted(nodes))}"
            )
        if node not in creds.mqtt:
            raise ConfigError(f"no MQTT credential for {node} in the testbed's credentials")
        return cls(
            node=node,
            data_ip=nodes[node].data_ip,
            peers={n: info.data_ip for n, info in nodes.items() if n != node},
            broker_host=state.broker.ip,
            broker_port=state.broker.port,
            mqtt_username=node,
            mqtt_password=creds.mqtt[node],
            secret=bytes.fromhex(creds.transfer_secret_hex),
        )


def _meminfo() -> tuple[int, int]:
    fields: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) * 1024
    return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)


class Agent:
    """One node's agent; use :meth:`run` inside the node's network namespace."""

    def __init__(self, config: AgentConfig) -> None:
        check_node_name(config.node)
        self.config = config
        self.node = config.node
        self.runtime = NodeRuntime(node=config.node, netns=None, runc_root=runc_root(config.node))
        self.pages: dict[str, Any] = {}  # migration id -> LocalImagePages offered to a peer
        self.migrating: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self.draining = False
        self.forwarder = Forwarder(node=config.node, data_ip=config.data_ip)
        self._presence: dict[tuple[str, str], Location] = {}  # (node, service) -> location
        self.links: dict[str, LinkMeasurement] = {}
        self._published: set[str] = set()  # services whose presence this node announced
        self._cpu_sample: tuple[float, int] | None = None  # (monotonic s, cpuacct ns)
        self.bus: Bus | None = None
        self.destination = Destination(
            node=config.node,
            runtime=self.runtime,
            rootfs=self._rootfs,
            bundles=paths.node_dir(config.node) / "bundles",
            fetch_factory=self._fetch_from,
            fence_timeout_s=config.fence_timeout_s,
            on_owned=self._owned,
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        cfg = self.config
        will = self._status(online=False)
        for sub in ("incoming", "outgoing", "bundles"):
            (paths.node_dir(self.node) / sub).mkdir(parents=True, exist_ok=True)
        async with (
            TransferServer(
                host=cfg.data_ip,
                port=cfg.transfer_port,
                secret=cfg.secret,
                node=self.node,
                root=paths.node_dir(self.node) / "incoming",
                handler=self,
            ),
            Bus(
                host=cfg.broker_host,
                port=cfg.broker_port,
                username=cfg.mqtt_username,
                password=cfg.mqtt_password,
                client_id=f"agent-{self.node}",
                will=will,
                on_invalid=self._on_invalid,
            ) as bus,
        ):
            self.bus = bus
            log.info("agent %s: serving on %s:%d", self.node, cfg.data_ip, cfg.transfer_port)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._status_loop(stop), name="status")
                tg.create_task(self._command_loop(stop), name="commands")
                tg.create_task(self._presence_loop(), name="presence")
                tg.create_task(self._links_loop(stop), name="links")
                await stop.wait()
                raise _Stopped
        # unreachable: the TaskGroup always ends in _Stopped

    async def close(self) -> None:
        for task in list(self.migrating.values()):
            task.cancel()
        await self.destination.close()
        with contextlib.suppress(FogmigError):
            await self.forwarder.remove()

    # ------------------------------------------------------------------ status

    def _load(self) -> float:
        """The CPU share this node's services used since the last status (0..1 of the machine).

        Read from the node's cpuacct cgroup, which holds exactly its containers: on a machine
        that hosts several nodes (the testbed) the load average would be the same for all.
        """
        cpuacct = Path("/sys/fs/cgroup/cpuacct")
        if not cpuacct.is_dir():
            return os.getloadavg()[0] / (os.cpu_count() or 1)
        try:
            usage_ns = int((cpuacct / "fogmig" / self.node / "cpuacct.usage").read_text())
        except (OSError, ValueError):
            usage_ns = 0  # no container here (yet): no load
        now = time.monotonic()
        last = self._cpu_sample
        self._cpu_sample = (now, usage_ns)
        if last is None or now <= last[0] or usage_ns < last[1]:
            return 0.0
        return (usage_ns - last[1]) / 1e9 / (now - last[0]) / (os.cpu_count() or 1)

    def _status(self, *, online: bool, services: list[ServiceInfo] | None = None) -> NodeStatus:
        total, free = _meminfo()
        caps = criu_capabilities()
        return NodeStatus(
            node=self.node,
            online=online,
            at=time.time(),
            load=self._load() if online else 0.0,
            mem_total_bytes=total,
            mem_free_bytes=free,
            services=services or [],
            links=list(self.links.values()),
            draining=self.draining,
            capabilities=NodeCapabilities(
                criu_version=caps.version,
                postcopy=caps.postcopy,
                native_predump=caps.native_predump,
            ),
        )

    async def _services(self) -> list[ServiceInfo]:
        out = []
        for c in await self.runtime.list():
            if c.running and c.id not in self.migrating:
                _, dirty_kbps, port = _service_params(c.bundle)
                out.append(
                    ServiceInfo(
                        name=c.id,
                        # What a checkpoint holds: the process's memory, not just its data.
                        state_bytes=_rss(c.pid),
                        dirty_rate_bytes_per_s=dirty_kbps * 1024,
                        data_ip=self.config.data_ip,
                        port=port,
                    )
                )
        return out

    async def _publish_status(self) -> None:
        assert self.bus is not None
        try:
            services = await self._services()
            status = self._status(online=True, services=services)
            await self.bus.publish(topics.status(self.node), status, retain=True)
            await self._reconcile_presence({s.name for s in services})
        except FogmigError as exc:
            log.warning("agent %s: status not published: %s", self.node, exc)

    async def _reconcile_presence(self, running: set[str]) -> None:
        """Say where services run: deployed here, or gone (undeployed, crashed) from here."""
        assert self.bus is not None
        for service in sorted(running - self._published):
            await self._owned(service)
        for service in sorted(self._published - running - set(self.migrating)):
            await self.bus.clear(topics.service(self.node, service))
            self._published.discard(service)

    async def _status_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._publish_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.status_interval_s)

    # ------------------------------------------------------------------ commands

    async def _command_loop(self, stop: asyncio.Event) -> None:
        assert self.bus is not None
        async with self.bus.subscribe(topics.cmd(self.node)) as commands:
            async for _, command in commands:
                await self._on_command(command)  # type: ignore[arg-type]

    def _on_invalid(self, topic: str, payload: bytes, error: SchemaError) -> None:
        """A malformed command gets a typed rejection when it names its id; the agent goes on."""
        if topic != topics.cmd(self.node) or self.bus is None:
            return
        command_id = command_id_of(payload)
        log.warning("agent %s: invalid command %s: %s", self.node, command_id, error)
        if command_id is None:
            return
        task = asyncio.ensure_future(
            self.bus.publish(topics.events(self.node), reject(self.node, command_id, error))
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_command(self, command: Command) -> None:
        assert self.bus is not None
        try:
            if isinstance(command, DrainCommand):
                # From now on the node reports draining; the controller moves its services
                # off and never onto it, and the node reports empty when they are gone.
                self.draining = True
                await self.bus.publish(
                    topics.events(self.node), accept(self.node, command.command_id)
                )
                await self._publish_status()
                return
            if isinstance(command, DeployCommand | UndeployCommand):
                await self._deploy_command(command)
                return
            await self._check_migrate(command)
        except FogmigError as exc:
            log.warning("agent %s: rejected %s: %s", self.node, command.command_id, exc)
            await self.bus.publish(
                topics.events(self.node), reject(self.node, command.command_id, exc)
            )
            return
        await self.bus.publish(topics.events(self.node), accept(self.node, command.command_id))
        self.migrating[command.service] = asyncio.create_task(
            self._migrate(command), name=f"migrate-{command.service}"
        )

    async def _deploy_command(self, cmd: DeployCommand | UndeployCommand) -> None:
        """Start or stop a service on this node; acknowledged once it answers (or is gone)."""
        from fogmig.services.deploy import ServiceSpec, deploy, undeploy

        assert self.bus is not None
        if cmd.service in self.migrating:
            raise MigrationError(f"{cmd.service} is migrating", phase="pending", migration_id="-")
        if isinstance(cmd, DeployCommand):
            spec = ServiceSpec(
                name=cmd.service, state_mb=int(cmd.state_mb), dirty_kbps=cmd.dirty_kbps
            )
            await deploy(spec, node=self.node)
        else:
            await undeploy(cmd.service)
        await self.bus.publish(topics.events(self.node), accept(self.node, cmd.command_id))
        await self._publish_status()

    async def _check_migrate(self, cmd: MigrateCommand) -> None:
        if cmd.destination == self.node:
            raise ConfigError(f"{cmd.service} already runs on {self.node}")
        if cmd.destination not in self.config.peers:
            raise UnknownNodeError(f"{self.node} has no data link to node {cmd.destination!r}")
        if cmd.service in self.migrating:
            raise MigrationError(
                f"{cmd.service} is already migrating", phase="pending", migration_id="-"
            )
        if not await self.runtime.exists(cmd.service):
            raise MigrationError(
                f"{cmd.service} does not run on {self.node}", phase="pending", migration_id="-"
            )
        if cmd.technique in ("postcopy", "hybrid") and not criu_capabilities().postcopy:
            raise ConfigError(f"{self.node} cannot do {cmd.technique}: no userfaultfd")

    async def _migrate(self, cmd: MigrateCommand) -> None:
        assert self.bus is not None
        bus = self.bus
        last = 0.0
        mid_holder: dict[str, str] = {}

        def progress(phase: str, done: int, total: int, rate: float) -> None:
            nonlocal last
            now = time.monotonic()
            if done and now - last < 0.5:
                return  # at most two progress events a second
            last = now
            event = MigrationProgress(
                node=self.node,
                command_id=cmd.command_id,
                migration_id=mid_holder.get("id", cmd.command_id),
                service=cmd.service,
                phase=phase,  # type: ignore[arg-type]
                bytes_done=done,
                bytes_total=total,
                rate_bytes_per_s=rate,
                at=time.time(),
            )
            task = asyncio.ensure_future(bus.publish(topics.events(self.node), event))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        from fogmig.platform.migration.source import new_migration_id

        mid = new_migration_id(cmd.service)
        mid_holder["id"] = mid
        try:
            state = await self.runtime.state(cmd.service)
            _, dirty_kbps, _ = _service_params(state.bundle)
            record = await migrate_service(
                runtime=self.runtime,
                service=cmd.service,
                destination=cmd.destination,
                destination_ip=self.config.peers[cmd.destination],
                transfer_port=self.config.transfer_port,
                secret=self.config.secret,
                technique=cmd.technique,
                workdir_root=paths.node_dir(self.node) / "outgoing",
                pages_registry=self.pages,
                rules=PrecopyStopRules(
                    max_rounds=cmd.precopy.max_rounds,
                    min_changed_bytes=cmd.precopy.min_changed_bytes,
                    stop_when_not_shrinking=cmd.precopy.stop_when_not_shrinking,
                ),
                compression=cmd.compression,
                on_progress=progress,
                migration_id=mid,
                fence_timeout_s=self.config.fence_timeout_s,
                record_extra={
                    "state_bytes": _rss(state.pid),
                    "dirty_rate_bytes_per_s": dirty_kbps * 1024,
                    **self._link_conditions(cmd.destination),
                },
            )
            save_record(record, paths.records_dir())
            log.info(
                "agent %s: migration %s of %s to %s: %s",
                self.node,
                mid,
                cmd.service,
                cmd.destination,
                record.outcome.value,
            )
            if record.outcome.value == "rolled_back":
                await self._owned(cmd.service)
            else:
                await bus.clear(topics.service(self.node, cmd.service))
                self._published.discard(cmd.service)
            await bus.publish(
                topics.events(self.node),
                MigrationDone(
                    node=self.node,
                    command_id=cmd.command_id,
                    migration_id=mid,
                    service=cmd.service,
                    outcome=record.outcome.value,  # type: ignore[arg-type]
                    record=record.model_dump(mode="json"),
                    error=record.error,
                ),
            )
        except FogmigError as exc:
            log.warning("agent %s: migration of %s failed: %s", self.node, cmd.service, exc)
        finally:
            self.migrating.pop(cmd.service, None)

    async def _links_loop(self, stop: asyncio.Event) -> None:
        """Measure the data link to every peer: RTT by ping, throughput by a timed transfer.

        Skipped while a migration runs here: it would compete with it for the link.
        """
        if self.config.link_probe_interval_s <= 0:
            return  # measurement off (benchmarks: it would share the link)
        while not stop.is_set():
            for peer in sorted(self.config.peers):
                if self.migrating or self.destination.incoming:
                    break
                try:
                    self.links[peer] = await self._measure_link(peer)
                except (FogmigError, OSError) as exc:
                    log.warning("agent %s: link to %s not measured: %s", self.node, peer, exc)
                except Exception:
                    # A measurement must never take the agent down with it.
                    log.exception("agent %s: link measurement to %s failed", self.node, peer)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.link_probe_interval_s)

    async def _measure_link(self, peer: str) -> LinkMeasurement:
        import statistics
        import tempfile

        cfg = self.config
        async with TransferClient.connect(
            cfg.peers[peer], cfg.transfer_port, secret=cfg.secret, node=self.node, peer=peer
        ) as client:
            rtt = statistics.median([await client.ping() for _ in range(5)])
            probe_id = f"probe-{self.node}"
            with tempfile.NamedTemporaryFile(dir=paths.node_dir(self.node)) as fh:
                fh.write(os.urandom(cfg.link_probe_bytes))
                fh.flush()
                sent = await client.send_file(probe_id, Path(fh.name), "probe")
            await client.call("drop_probe", {"migration_id": probe_id})
        # A one-shot transfer includes TCP's slow start: a conservative estimate.
        rate = sent.bytes / max(sent.seconds - rtt, 1e-6)
        return LinkMeasurement(peer=peer, rtt_s=rtt, throughput_bytes_per_s=rate, at=time.time())

    async def _presence_loop(self) -> None:
        """Follow where every service runs and forward their traffic accordingly."""
        assert self.bus is not None
        await self.forwarder.install()
        async with self.bus.subscribe(topics.service()) as presences:
            async for _, msg in presences:
                if isinstance(msg, Cleared):
                    if msg.topic.node is not None and msg.topic.service is not None:
                        self._presence.pop((msg.topic.node, msg.topic.service), None)
                elif isinstance(msg, ServicePresence):
                    key = (msg.node, msg.service)
                    if msg.present:
                        self._presence[key] = Location(msg.service, msg.node, msg.data_ip, msg.port)
                    else:
                        self._presence.pop(key, None)
                else:
                    continue
                latest: dict[str, Location] = {}
                for loc in self._presence.values():
                    latest[loc.service] = loc
                try:
                    await self.forwarder.update(latest)
                except FogmigError as exc:
                    log.error("agent %s: forwarding not updated: %s", self.node, exc)

    def _link_conditions(self, peer: str) -> dict[str, float]:
        """The last measurement of the link to ``peer`` for the record, if there is one."""
        link = self.links.get(peer)
        if link is None:
            return {}
        return {
            "link_rate_bit_per_s": link.throughput_bytes_per_s * 8,
            "link_rtt_s": link.rtt_s,
        }

    async def _owned(self, service: str) -> None:
        if self.bus is None:
            return
        try:
            state = await self.runtime.state(service)
        except FogmigError:
            return
        _, _, port = _service_params(state.bundle)
        await self.bus.publish(
            topics.service(self.node, service),
            ServicePresence(
                service=service,
                node=self.node,
                data_ip=self.config.data_ip,
                port=port,
                present=True,
                at=time.time(),
            ),
            retain=True,
        )
        self._published.add(service)

    # ------------------------------------------------------------------ transfer calls

    async def on_call(
        self, session: TransferSession, op: str, params: dict[str, Any]
    ) -> dict[str, Any] | CallReply:
        if op == "get_pages":
            return await self._get_pages(params)
        if op == "drop_probe":
            remove_migration_dir(session.root, f"probe-{session.peer}")
            return {}
        mid = str(params.get("migration_id", ""))
        return await self.destination.handle(op, params, session.migration_dir(mid), session.peer)

    async def _get_pages(self, params: dict[str, Any]) -> CallReply:
        mid = str(params.get("migration_id", ""))
        pages = self.pages.get(mid)
        if pages is None:
            raise MigrationError(
                f"{self.node} serves no pages for {mid}", phase="lazy_pages", migration_id=mid
            )
        nr = min(int(params["nr_pages"]), MAX_PAGES_PER_CALL)
        data = await pages.read(int(params["pid"]), int(params["vaddr"]), nr)
        return CallReply({}, bytes(data))

    async def _fetch_from(
        self, source: str, migration_id: str
    ) -> tuple[Fetch, Fetch, Callable[[], Awaitable[None]]]:
        """Two channels back to the source for the pages of ``migration_id``: one for
        faults, one for fetching ahead, so a fault never waits behind a large prefetch."""
        ip = self.config.peers.get(source)
        if ip is None:
            raise UnknownNodeError(f"{self.node} has no data link to {source}")
        stack = contextlib.AsyncExitStack()
        try:
            fetchers = []
            for _ in range(2):
                client = await stack.enter_async_context(
                    TransferClient.connect(
                        ip,
                        self.config.transfer_port,
                        secret=self.config.secret,
                        node=self.node,
                        peer=source,
                    )
                )
                fetchers.append(self._page_fetcher(client, migration_id))
        except BaseException:
            await stack.aclose()
            raise
        return fetchers[0], fetchers[1], stack.aclose

    def _page_fetcher(self, client: TransferClient, migration_id: str) -> Fetch:
        async def fetch(pid: int, vaddr: int, nr_pages: int) -> bytes:
            # A reply carries at most 1 MiB; the daemon accepts a prefix and asks again.
            nr = min(nr_pages, MAX_PAGES_PER_CALL)
            _, data = await client.call_data(
                "get_pages",
                {"migration_id": migration_id, "pid": pid, "vaddr": vaddr, "nr_pages": nr},
                timeout=self.config.fence_timeout_s,
            )
            return data

        return fetch

    def _rootfs(self) -> Path:
        found = find_image()
        if found is None:
            raise ConfigError(
                f"no service image on {self.node}", hint="run `fogmig image build` on the node"
            )
        return found


class _Stopped(Exception):
    """Ends the agent's task group on a requested stop."""


def _service_params(bundle: Path | None) -> tuple[int, float, int]:
    """(state MB, dirty KB/s, port) from a sensor service's command line; 0s if unknown."""
    try:
        args = read_config(bundle)["process"]["args"] if bundle is not None else []
    except (FogmigError, KeyError):
        args = []

    def value(flag: str, default: str) -> str:
        return args[args.index(flag) + 1] if flag in args[:-1] else default

    try:
        return (
            int(value("--state-mb", "0")),
            float(value("--dirty-kbps", "0")),
            int(value("--port", "5683")),
        )
    except ValueError:
        return 0, 0.0, 5683


def _rss(pid: int) -> int:
    """Resident memory of a service's process tree root (its state size, roughly)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def run_agent(config: AgentConfig) -> None:
    """Run an agent until SIGTERM/SIGINT; exit cleanly, leaving no copy half-arrived."""
    import signal

    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.run(stop)
    except* _Stopped:
        pass
    finally:
        await agent.close()
