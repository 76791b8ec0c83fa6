"""Deploying, finding and removing service containers on the fog nodes of this machine.

A service runs as a runc container from the shared image, in its node's network namespace and
runc root. Deploying refuses a second copy of a service anywhere on the machine and a second
service on the same node and port: aiocoap binds with SO_REUSEPORT, so two copies would
silently split the requests between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogmig.platform.agent.launcher import poke_agent
from fogmig.platform.base import paths
from fogmig.platform.base.errors import (
    ConfigError,
    ContainerNotFoundError,
    FogmigError,
    ServiceError,
    TestbedError,
    UnknownNodeError,
)
from fogmig.platform.base.nodes import check_node_name, check_service_name, netns_name, runc_root
from fogmig.platform.base.proc import NETNS_DIR, run
from fogmig.platform.runtime.bundle import make_bundle, read_config
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.runtime.results import ContainerState
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.platform.testbed.state import load_state
from fogmig.services.client import ServiceState, ServiceUnreachableError
from fogmig.services.image import SENSOR_IN_IMAGE, ensure_image
from fogmig.services.sensor import DEFAULT_DIRTY_KBPS, DEFAULT_PORT, DEFAULT_STATE_MB

log = logging.getLogger(__name__)

SERVICE_KINDS = ("sensor",)
LIVE = frozenset({"created", "running", "paused"})
IN_CONTAINER_LOG = "tmp/sensor.log"
# Runs inside a node's network namespace: one GET /state through the service client.
PROBE = (
    "import asyncio, sys\n"
    "from fogmig.services.client import get_state\n"
    "s = asyncio.run(get_state(sys.argv[1], port=int(sys.argv[2]), timeout=float(sys.argv[3])))\n"
    "print(s.model_dump_json())\n"
)

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What to run: the kind of service, its name and its load parameters."""

    name: str
    kind: str = "sensor"
    state_mb: int = DEFAULT_STATE_MB
    dirty_kbps: float = DEFAULT_DIRTY_KBPS
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        check_service_name(self.name)
        if self.kind not in SERVICE_KINDS:
            raise ConfigError(
                f"unknown service kind {self.kind!r}: known kinds are {', '.join(SERVICE_KINDS)}"
            )
        if self.state_mb < 0 or self.dirty_kbps < 0:
            raise ConfigError("--state-mb and --dirty-kbps must not be negative")
        if not 0 < self.port < 65536:
            raise ConfigError(f"invalid port {self.port}")

    def args(self) -> list[str]:
        # IPv4 explicitly: the nodes' namespaces carry only IPv4 addresses, and binding "::"
        # needs a global IPv6 address to resolve.
        return [
            "python3",
            SENSOR_IN_IMAGE,
            "--state-mb",
            str(self.state_mb),
            "--dirty-kbps",
            f"{self.dirty_kbps:g}",
            "--port",
            str(self.port),
            "--host",
            "0.0.0.0",
        ]


@dataclass(frozen=True, slots=True)
class Placement:
    """One service container found on one node."""

    node: str
    container: ContainerState

    @property
    def name(self) -> str:
        return self.container.id

    @property
    def live(self) -> bool:
        return self.container.status in LIVE

    @property
    def port(self) -> int | None:
        """The service's CoAP port, read from its bundle (None if unreadable)."""
        return _service_port(self.container)


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where a deployed service runs and what it answered first."""

    name: str
    node: str
    netns: str
    addresses: list[str]
    port: int
    pid: int
    bundle: Path
    startup_s: float
    state: ServiceState


def node_runtime(node: str, *, netns: str | None = None) -> NodeRuntime:
    """The runtime of a node of this machine: its own runc root, and its namespace
    (``fm-<node>`` unless ``netns`` names another)."""
    return NodeRuntime(node=node, netns=netns or netns_name(node), runc_root=runc_root(node))


def bundle_dir(node: str, name: str) -> Path:
    return paths.node_dir(check_node_name(node)) / "bundles" / check_service_name(name)


def netns_path(netns: str) -> Path:
    return NETNS_DIR / netns


def known_nodes() -> list[str]:
    """The testbed's fog nodes (when it is up) and every node with a runc root, sorted."""
    names: set[str] = set()
    nodes_root = paths.run_dir() / "nodes"
    if nodes_root.is_dir():
        names.update(p.parent.name for p in nodes_root.glob("*/runc") if p.is_dir())
    with contextlib.suppress(TestbedError):
        names.update(load_state().node_names)
    valid = []
    for name in names:
        with contextlib.suppress(ConfigError):
            valid.append(check_node_name(name))
    return sorted(valid)


async def list_services() -> dict[str, list[ContainerState]]:
    """Every service container of every node of this machine, by node."""
    out: dict[str, list[ContainerState]] = {}
    for node in known_nodes():
        # Listing needs no network namespace, and a node's containers stay visible even
        # when its namespace is already gone.
        scan = NodeRuntime(node=node, netns=None, runc_root=runc_root(node))
        out[node] = await scan.list()
    return out


async def find_service(name: str) -> list[Placement]:
    """Every container called ``name`` on any node (normally at most one is live)."""
    found: list[Placement] = []
    for node, containers in (await list_services()).items():
        found.extend(Placement(node, c) for c in containers if c.id == name)
    return found


def _bundle_config(container: ContainerState) -> dict[str, Any]:
    if container.bundle is None:
        return {}
    try:
        return read_config(container.bundle)
    except ConfigError:
        return {}


def _service_port(container: ContainerState) -> int | None:
    try:
        args = _bundle_config(container)["process"]["args"]
        return int(args[args.index("--port") + 1])
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def _container_netns(container: ContainerState) -> str | None:
    """The name of the namespace the container's bundle joined, if it still exists."""
    try:
        spaces = _bundle_config(container)["linux"]["namespaces"]
    except (KeyError, TypeError):
        return None
    for ns in spaces:
        path = Path(ns.get("path", ""))
        if ns.get("type") == "network" and path.parent == NETNS_DIR and path.exists():
            return path.name
    return None


async def node_addresses(netns: str) -> list[str]:
    """The IPv4 addresses of a namespace other than loopback."""
    done = await run(["ip", "-j", "-4", "addr", "show"], netns=netns, what="ip addr")
    out = []
    for link in json.loads(done.stdout or "[]"):
        for addr in link.get("addr_info", []):
            local = addr.get("local", "")
            # A node's data IP sits on each of its point-to-point links: list it once.
            if local and not local.startswith("127.") and local not in out:
                out.append(local)
    return out


async def probe_state(
    netns: str | None, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, timeout: float = 2.0
) -> ServiceState:
    """``GET /state`` from inside a namespace; :class:`ServiceUnreachableError` if silent."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    done = await run(
        [sys.executable, "-c", PROBE, host, str(port), str(timeout)],
        netns=netns,
        check=False,
        timeout=timeout + 10.0,
        env=env,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ServiceUnreachableError(f"no CoAP answer from {host}:{port} in {netns}: {last}")
    return ServiceState.model_validate_json(done.stdout)


def _container_log_tail(pid: int, lines: int = 5) -> str:
    # The service logs inside its own tmpfs; while it lives, /proc/PID/root reaches it.
    try:
        text = (Path(f"/proc/{pid}/root") / IN_CONTAINER_LOG).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


async def wait_for_service(
    runtime: NodeRuntime, name: str, *, port: int, timeout: float
) -> ServiceState:
    """Poll ``GET /state`` in the node until the service answers or stops."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        state = await runtime.state(name)
        if state.status != "running":
            raise ServiceError(f"service {name} on {runtime.node} stopped while starting")
        try:
            return await probe_state(runtime.netns, port=port, timeout=1.0)
        except ServiceUnreachableError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            tail = _container_log_tail(state.pid)
            raise ServiceError(
                f"service {name} on {runtime.node} did not answer within {timeout:g} s: {last}"
                + (f"\nits log ends with:\n{tail}" if tail else "")
            )
        await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def _deploy_lock() -> AsyncIterator[None]:
    # Two deploys of one name at once would both pass the "not running anywhere" check.
    lock_path = paths.run_dir() / "deploy.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


async def _check_free(spec: ServiceSpec, node: str, runtime: NodeRuntime) -> None:
    for placement in await find_service(spec.name):
        if placement.live:
            raise ServiceError(
                f"service {spec.name} already runs on node {placement.node} "
                f"(status {placement.container.status}): two copies would split its requests",
                hint=f"`fogmig undeploy {spec.name}` first, or choose another --name",
            )
    for other in await runtime.list():
        if other.status in LIVE and _service_port(other) == spec.port:
            raise ServiceError(
                f"node {node} already runs service {other.id} on port {spec.port}: "
                "two services on one port would split its requests",
                hint=f"`fogmig undeploy {other.id}` first",
            )


async def deploy(
    spec: ServiceSpec,
    *,
    node: str,
    netns: str | None = None,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> Deployment:
    """Run ``spec`` on ``node`` and wait until it answers ``GET /state``.

    The node's namespace is ``fm-<node>`` (the testbed's) unless ``netns`` names another.
    """
    say = progress or (lambda _msg: None)
    runtime = node_runtime(node, netns=netns)
    netns = runtime.netns
    assert netns is not None
    if not netns_path(netns).exists():
        hint = "`fogmig testbed up` creates the nodes"
        with contextlib.suppress(TestbedError):
            hint = f"the testbed's fog nodes are {', '.join(load_state().node_names)}"
        raise UnknownNodeError(
            f"node {node} has no network namespace {netns} on this machine", hint=hint
        )
    rootfs = await ensure_image(progress=say)
    async with _deploy_lock():
        await _check_free(spec, node, runtime)
        with contextlib.suppress(ContainerNotFoundError):
            await runtime.delete(spec.name, force=True)  # a stopped leftover of the same name
        bundle = make_bundle(
            bundle_dir(node, spec.name),
            rootfs=rootfs,
            args=spec.args(),
            netns_path=netns_path(netns),
            restore_conf=True,
            cgroups_path=f"/fogmig/{node}/{spec.name}",
            hostname=spec.name,
        )
        say(f"starting {spec.name} on {node} ({spec.state_mb} MB state, {spec.dirty_kbps:g} KB/s)")
        t0 = time.monotonic()
        started = await runtime.run(spec.name, bundle)
    try:
        state = await wait_for_service(runtime, spec.name, port=spec.port, timeout=timeout)
    except FogmigError:
        await runtime.stop(spec.name, grace=1.0)
        raise
    poke_agent(node)  # its agent announces the service now, not at its next report
    return Deployment(
        name=spec.name,
        node=node,
        netns=netns,
        addresses=await node_addresses(netns),
        port=spec.port,
        pid=started.pid,
        bundle=bundle,
        startup_s=time.monotonic() - t0,
        state=state,
    )


async def undeploy(name: str, *, node: str | None = None, grace: float = 5.0) -> list[str]:
    """Stop and delete service ``name`` on ``node`` (None: wherever it is on this machine);
    return the nodes it was on."""
    check_service_name(name)
    placements = [p for p in await find_service(name) if node is None or p.node == node]
    if not placements:
        where = "any node of this machine" if node is None else f"node {node}"
        raise ServiceError(f"no service {name} on {where}")
    nodes = []
    for placement in placements:
        netns = _container_netns(placement.container)
        runtime = NodeRuntime(node=placement.node, netns=netns, runc_root=runc_root(placement.node))
        await runtime.stop(name, grace=grace)
        remove_tree(bundle_dir(placement.node, name))
        # Its agent withdraws the presence now: until it does, every gateway forwards the
        # port here, the port of a service deployed next elsewhere included.
        poke_agent(placement.node)
        nodes.append(placement.node)
    return nodes
