"""The node's status and its services' presence, as the agent publishes them.

The status (retained, with the offline one as the agent's last will) carries the node's load,
memory, services, measured links, drain flag and CRIU capabilities; a presence message per
service says where it runs, so the other agents forward its traffic there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from pathlib import Path

from fogmig.platform.agent.state import AgentState
from fogmig.platform.base import fmt
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.vocabulary import NodeCapabilities
from fogmig.platform.bus.schemas import MAX_BYTES, MAX_RATE, NodeStatus, ServiceInfo
from fogmig.platform.bus.topics import topics
from fogmig.platform.runtime.bundle import read_config
from fogmig.platform.runtime.capabilities import criu_capabilities

log = logging.getLogger(__name__)


def meminfo() -> tuple[int, int]:
    """(total, available) memory of the machine in bytes."""
    fields: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) * 1024
    return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)


class StatusReporting(AgentState):
    """Publishing the node's status and the presence of the services it runs."""

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
        total, free = meminfo()
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
            migrating=sorted(self.migrating) if online else [],
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
                _, dirty_kbps, port = service_params(c.bundle)
                out.append(
                    ServiceInfo(
                        name=c.id,
                        # What a checkpoint holds: the process's memory, not just its data.
                        state_bytes=rss(c.pid),
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
        # Announced here before this agent started (its retained presence is still on the
        # bus) and not running now: removed while no agent watched. Left standing, every
        # gateway would go on forwarding its port here, the port of a service deployed after it
        # elsewhere included.
        leftovers = {
            p.service
            for p in self.follow.book
            if p.node == self.node and p.present and p.state == "running"
        }
        for service in sorted((self._published | leftovers) - running - set(self.migrating)):
            gone = self.follow.tombstone(service)
            await self.bus.publish(topics.service(self.node, service), gone, retain=True)
            self._published.discard(service)
            log.info(
                "agent %s: %s no longer runs here; its presence is withdrawn", self.node, service
            )

    async def _status_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._publish_status()
            except Exception as exc:
                # One unpublishable status (a figure out of bounds) must not end the reports.
                log.warning("agent %s: status not published: %s", self.node, fmt.error(exc))
            waits = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self.status_now.wait()),
            ]
            try:
                await asyncio.wait(
                    waits,
                    timeout=self.config.status_interval_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiting in waits:
                    waiting.cancel()
            self.status_now.clear()

    async def _owned(self, service: str) -> None:
        if self.bus is None:
            return
        port = await self._service_port(service)
        if port is None:
            return
        await self.follow.announce(service, port)
        self._published.add(service)

    async def _service_port(self, service: str) -> int | None:
        """The UDP port of a service that runs here (None if it does not)."""
        try:
            state = await self.runtime.state(service)
        except FogmigError:
            return None
        return service_params(state.bundle)[2]


def service_params(bundle: Path | None) -> tuple[int, float, int]:
    """(state MB, dirty KB/s, port) from a sensor service's command line; 0s if unknown."""
    try:
        args = read_config(bundle)["process"]["args"] if bundle is not None else []
    except (FogmigError, KeyError):
        args = []

    def value(flag: str, default: str) -> str:
        return args[args.index(flag) + 1] if flag in args[:-1] else default

    try:
        state_mb = int(value("--state-mb", "0"))
        dirty_kbps = float(value("--dirty-kbps", "0"))
        port = int(value("--port", "5683"))
    except ValueError:
        return 0, 0.0, 5683
    # What the bus can carry: a figure beyond its bounds would make every status unpublishable.
    if not (math.isfinite(dirty_kbps) and 0 <= dirty_kbps <= MAX_RATE / 1024):
        dirty_kbps = 0.0
    if not 0 <= state_mb <= MAX_BYTES >> 20:
        state_mb = 0
    if not 1 <= port <= 65535:
        port = 5683
    return state_mb, dirty_kbps, port


def rss(pid: int) -> int:
    """Resident memory of a service's process tree root (its state size, roughly)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
