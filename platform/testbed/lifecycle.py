"""Bringing the testbed up and tearing it down.

``up`` builds what :func:`topology.plan` describes (namespaces, management bridge, data links,
secrets and certificates, broker, link daemon) and writes the state file last; if any step
fails it tears down what it made. ``down`` removes everything, with or without a state file,
so it also cleans up after a crashed run; running it twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError, FogmigError, SetupError, TestbedError
from fogmig.platform.base.mounts import mounts_below
from fogmig.platform.base.nodes import NETNS_PREFIX, check_node_name, runc_root
from fogmig.platform.base.proc import run
from fogmig.platform.runtime.capabilities import has_netem
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.platform.security.identity import Identity
from fogmig.platform.testbed import broker, netem, netns, pids, topology
from fogmig.platform.testbed.linkd import ControlRequest, LinkdConfig, LinkdLink, TunEnd
from fogmig.platform.testbed.links import linkd_request
from fogmig.platform.testbed.pki import create_pki, load_identity, pki_dir, remove_pki
from fogmig.platform.testbed.probe import measure_rtt
from fogmig.platform.testbed.profiles import LinkProfile
from fogmig.platform.testbed.state import (
    LinkInfo,
    NodeInfo,
    TestbedState,
    load_state,
    remove_state,
    save_state,
    state_path,
    testbed_run_dir,
)
from fogmig.platform.testbed.status import healthy

Progress = Callable[[str], None]

# Round-trip delay that the link daemon's own path adds (two TUN reads and writes, two
# wake-ups of the daemon, the echo that measures it): `up` measures it (see _calibrate) and
# takes it off every link. This figure (typical of the project's machine kind, 0.25-0.5 ms
# depending on load) is used until then, or for good when FOGMIG_LINK_OVERHEAD_MS fixes one.
LINKD_OVERHEAD_MS = 0.4
CALIBRATION_PINGS = 40
CALIBRATION_RTT_MS = 2.0
MAX_OVERHEAD_MS = 5.0
LINKD_READY_TIMEOUT = 10.0


def fixed_overhead_ms() -> float | None:
    """The overhead set by FOGMIG_LINK_OVERHEAD_MS, or None to measure it."""
    raw = os.environ.get("FOGMIG_LINK_OVERHEAD_MS")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"FOGMIG_LINK_OVERHEAD_MS must be a number of ms, not {raw!r}") from None
    if not 0 <= value < 100:
        raise ConfigError(f"FOGMIG_LINK_OVERHEAD_MS out of range: {value}")
    return value


def _quiet(_: str) -> None:
    pass


def _linkd_pidfile() -> Path:
    return testbed_run_dir() / "linkd.pid"


def _first_known(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def linkd_config(state: TestbedState, overhead_ms: float | None = None) -> LinkdConfig:
    assert state.linkd.socket_path is not None

    def end(host: str, link: LinkInfo) -> TunEnd:
        return TunEnd(host=host, netns=state.node(host).netns, ifname=link.devices[host])

    return LinkdConfig(
        socket_path=state.linkd.socket_path,
        overhead_ms=_first_known(overhead_ms, fixed_overhead_ms(), LINKD_OVERHEAD_MS),
        links=[
            LinkdLink(
                a=end(link.a, link),
                b=end(link.b, link),
                rate_mbit=link.rate_mbit,
                rtt_ms=link.rtt_ms,
            )
            for link in state.links
        ],
    )


# --- up ---------------------------------------------------------------------------------------


async def _mgmt_network(state: TestbedState, hosts: list[NodeInfo]) -> None:
    await netns.ip_batch(
        [
            f"link add {state.bridge} type bridge",
            f"addr add {state.bridge_ip}/{topology.MGMT_PREFIXLEN} dev {state.bridge}",
            f"link set {state.bridge} up",
        ]
    )
    for host in hosts:
        await netns.add_netns(host.netns)
        veth = topology.mgmt_veth(host.name)
        await netns.ip_batch(
            [
                f"link add {veth} type veth peer name {topology.MGMT_IFNAME} netns {host.netns}",
                f"link set {veth} master {state.bridge} up",
            ]
        )
        await netns.ip_batch(
            [
                f"addr add {host.mgmt_ip}/{topology.MGMT_PREFIXLEN} dev {topology.MGMT_IFNAME}",
                f"link set {topology.MGMT_IFNAME} up",
            ],
            netns=host.netns,
        )


async def _data_links(state: TestbedState) -> None:
    tun = state.linkd.backend == "tun"
    if not tun:
        for link in state.links:
            a, b = state.node(link.a), state.node(link.b)
            await netns.ip_batch(
                [
                    f"link add {link.devices[a.name]} netns {a.netns} type veth "
                    f"peer name {link.devices[b.name]} netns {b.netns}"
                ]
            )
    for host in state.hosts:
        commands: list[str] = []
        for link in state.links_of(host.name):
            ifname = link.devices[host.name]
            peer = state.node(link.peer_of(host.name))
            if tun:
                commands += [
                    f"tuntap add dev {ifname} mode tun",
                    f"link set {ifname} mtu {topology.DATA_MTU}",
                ]
            commands += [
                f"addr add {host.data_ip} peer {peer.data_ip} dev {ifname}",
                f"link set {ifname} up",
            ]
        await netns.ip_batch(commands, netns=host.netns)
    if not tun:
        for link in state.links:
            await netem.apply_link(state, link)


def _spawn_linkd(state: TestbedState) -> tuple[int, Path, Path]:
    """Write the daemon's configuration and start it; returns PID, socket and log paths."""
    linkd = state.linkd
    if linkd.config_path is None or linkd.socket_path is None or linkd.log_path is None:
        raise TestbedError("the link emulator's paths are missing from the testbed plan")
    config_path, socket_path = Path(linkd.config_path), Path(linkd.socket_path)
    config_path.write_text(linkd_config(state).model_dump_json(indent=2) + "\n")
    socket_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    argv = [sys.executable, "-m", "fogmig.platform.cli.main", "-v", "testbed", "linkd", "--config"]
    log_path = Path(linkd.log_path)
    pid = pids.spawn_detached([*argv, str(config_path)], log_path=log_path, env=env)
    pids.write_pidfile(_linkd_pidfile(), pid)
    return pid, socket_path, log_path


async def _start_linkd(state: TestbedState) -> int:
    pid, socket_path, log_path = _spawn_linkd(state)
    state.linkd.pid = pid
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINKD_READY_TIMEOUT
    while True:
        if not pids.alive(pid):
            raise TestbedError(
                f"the link emulator exited at start: {pids.log_tail(log_path)} (log: {log_path})"
            )
        try:
            await linkd_request(socket_path, ControlRequest(op="ping"))
            return pid
        except TestbedError:
            pass  # not listening yet
        if loop.time() > deadline:
            raise TestbedError(f"the link emulator did not start (log: {log_path})")
        await asyncio.sleep(0.05)


async def _calibrate(state: TestbedState) -> float:
    """Measure the emulator's own round trip and take it off every link.

    The first link is set to a short known RTT with no correction (a real wait, as on every
    shaped link, rather than zero delay, which would also count the loop's turn that the
    daemon's timer correction already removes); what the echo measures beyond that RTT is the
    overhead. The link is put back before anything else uses the testbed.
    """
    assert state.linkd.socket_path is not None
    socket_path = state.linkd.socket_path
    link = state.links[0]
    await linkd_request(socket_path, ControlRequest(op="overhead", overhead_ms=0))
    await linkd_request(
        socket_path, ControlRequest(op="set", a=link.a, b=link.b, rtt_ms=CALIBRATION_RTT_MS)
    )
    try:
        rtt, _lost = await measure_rtt(
            state.node(link.a), state.node(link.b), count=CALIBRATION_PINGS, timeout=1.0
        )
    finally:
        await linkd_request(
            socket_path, ControlRequest(op="set", a=link.a, b=link.b, rtt_ms=link.rtt_ms)
        )
    if rtt is None:
        raise TestbedError(f"calibration failed: no echo crossed link {link.name}")
    overhead = min(max(rtt - CALIBRATION_RTT_MS, 0.0), MAX_OVERHEAD_MS)
    await linkd_request(socket_path, ControlRequest(op="overhead", overhead_ms=overhead))
    return overhead


@dataclass
class UpResult:
    state: TestbedState
    reused: bool


async def up(profile: LinkProfile, n_nodes: int, *, progress: Progress = _quiet) -> UpResult:
    """Bring the testbed up, or reuse the running one when it has the same shape."""
    if os.geteuid() != 0:
        raise SetupError("the testbed needs root (namespaces, TUN devices, bridge)")
    backend: Literal["tun", "netem"] = "netem" if has_netem() else "tun"
    wanted = topology.plan(profile, n_nodes, backend=backend)
    if state_path().exists():
        current = load_state()
        problems = await healthy(current)
        if topology.same_shape(current, wanted) and not problems:
            return UpResult(current, reused=True)
        why = (
            "; ".join(problems)
            if problems
            else (f"it runs {current.profile.describe()} with {len(current.nodes)} node(s)")
        )
        raise TestbedError(
            f"the testbed is already up and differs from what was asked: {why}",
            hint="fogmig testbed down, then up again",
        )
    leftovers = netns.testbed_namespaces() + (
        [topology.BRIDGE] if netns.link_exists(topology.BRIDGE) else []
    )
    if leftovers:
        raise TestbedError(
            f"leftovers of an earlier testbed exist: {', '.join(leftovers)}",
            hint="fogmig testbed down (it also cleans up after a crash)",
        )
    state = wanted
    testbed_run_dir().mkdir(parents=True, exist_ok=True)
    try:
        progress(f"management network {state.bridge} and {len(state.hosts) + 1} namespaces")
        broker_host = NodeInfo(
            name=topology.BROKER, netns=state.broker.netns, mgmt_ip=state.broker.ip, data_ip=""
        )
        await _mgmt_network(state, [broker_host, *state.hosts])
        kind = "userspace emulator (no netem)" if backend == "tun" else "tc netem"
        progress(f"{len(state.links)} data links by {kind}")
        await _data_links(state)
        progress(f"broker on {state.broker.ip}:{state.broker.port}")
        issued = create_pki(state)
        progress(f"site CA and {len(issued)} certificates in {pki_dir()}")
        await broker.write_broker_files(state, load_identity(Identity.broker()))
        state.broker.pid = await broker.start_broker(state.broker)
        if backend == "tun":
            progress("link emulator")
            await _start_linkd(state)
            fixed = fixed_overhead_ms()
            if fixed is None:
                state.linkd.overhead_ms = await _calibrate(state)
                progress(f"link emulator calibrated: {state.linkd.overhead_ms:.3f} ms own RTT")
            else:
                state.linkd.overhead_ms = fixed
        state.created_at = time.time()
        save_state(state)
    except BaseException:
        progress("failed: tearing down what was made")
        await down(state)
        raise
    return UpResult(state, reused=False)


# --- down -------------------------------------------------------------------------------------


@dataclass
class DownReport:
    containers: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def nothing(self) -> bool:
        return not any(
            (
                self.containers,
                self.processes,
                self.mounts,
                self.namespaces,
                self.interfaces,
                self.files,
            )
        )


def _known_state() -> TestbedState | None:
    try:
        return load_state()
    except TestbedError:
        return None


def _node_names(state: TestbedState | None) -> list[str]:
    names = {*state.node_names, state.device_host.name} if state else set()
    for ns in netns.testbed_namespaces():
        name = ns.removeprefix(NETNS_PREFIX)
        if name != topology.BROKER:
            names.add(name)
    return sorted(n for n in names if _valid_node(n))


def _valid_node(name: str) -> bool:
    try:
        check_node_name(name)
    except ConfigError:
        return False
    return True


async def _remove_containers(node: str, report: DownReport) -> None:
    root = runc_root(node)
    if not root.is_dir():
        return
    listed = await run(["runc", "--root", str(root), "list", "--format", "json"], check=False)
    if listed.returncode != 0:
        return
    for entry in json.loads(listed.stdout or "null") or []:
        cid = str(entry["id"])
        await run(["runc", "--root", str(root), "delete", "--force", cid], check=False)
        report.containers.append(f"{node}/{cid}")


def _mounts_below(prefix: Path) -> list[Path]:
    return [p for p in mounts_below(prefix) if p != prefix]


async def _unmount_criu(nodes: list[str], report: DownReport) -> None:
    """CRIU work directories of the testbed's nodes can hold a mounted cgroup yard."""
    state_root = paths.state_dir()
    node_roots = [paths.node_dir(n) for n in nodes] + [state_root / "testbed"]
    points = [
        p
        for p in _mounts_below(state_root)
        if ".criu" in str(p) or any(p.is_relative_to(r) for r in node_roots)
    ]
    # Deepest first, so a parent is never unmounted under a child.
    for point in sorted(set(points), key=lambda p: len(p.parts), reverse=True):
        done = await run(["umount", str(point)], check=False)
        if done.returncode != 0:
            await run(["umount", "-l", str(point)], check=False)
        report.mounts.append(str(point))


def _linkd_candidates(state: TestbedState | None, config_path: str) -> set[int]:
    """PIDs that may be our link daemon: recorded ones, and (when the records are gone) any
    process started with exactly our configuration file."""
    found = {pids.read_pidfile(_linkd_pidfile()), state.linkd.pid if state else None}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and config_path in pids.cmdline(int(entry.name)):
            found.add(int(entry.name))
    return {pid for pid in found if pid is not None}


async def _stop_daemons(state: TestbedState | None, report: DownReport) -> None:
    linkd = state.linkd if state and state.linkd.config_path else topology.linkd_info()
    assert linkd.config_path is not None
    for pid in _linkd_candidates(state, linkd.config_path):
        if await pids.stop_process(pid, ("linkd", linkd.config_path)):
            report.processes.append(f"link emulator (pid {pid})")
    if await broker.stop_broker(state.broker if state else topology.broker_info()):
        report.processes.append("mosquitto")


async def _empty_namespace(ns: str, report: DownReport) -> None:
    """Whatever still runs inside a testbed namespace belongs to the testbed (agents, tools)."""
    for pid in netns.namespace_pids(ns):
        if pid == os.getpid():
            continue
        what = " ".join(pids.cmdline(pid))[:60]
        if await pids.stop_process(pid, grace=2.0):
            report.processes.append(f"{what} (pid {pid}, in {ns})")


async def down(state: TestbedState | None = None, *, progress: Progress = _quiet) -> DownReport:
    """Remove the testbed and all it made; works without a state file and twice in a row."""
    if os.geteuid() != 0:
        raise SetupError("tearing down the testbed needs root")
    report = DownReport()
    state = state or _known_state()
    nodes = _node_names(state)
    progress("containers")
    if shutil.which("runc"):
        for node in nodes:
            await _remove_containers(node, report)
    progress("CRIU mounts")
    await _unmount_criu(nodes, report)
    progress("link emulator and broker")
    await _stop_daemons(state, report)
    progress("namespaces")
    for ns in netns.testbed_namespaces():
        await _empty_namespace(ns, report)
        await netns.del_netns(ns)
        report.namespaces.append(ns)
    progress("bridge and interfaces")
    for ifname in [topology.BRIDGE, *netns.root_links(topology.MGMT_VETH_PREFIX)]:
        if netns.link_exists(ifname):
            await netns.del_link(ifname)
            report.interfaces.append(ifname)
    progress("files")
    # The agents ran in the namespaces just emptied: their PID files must not outlive them
    # (a later check for running agents would read a recycled PID).
    agent_pids = paths.run_dir() / "agents"
    if agent_pids.is_dir():
        for pidfile in sorted(agent_pids.glob("*.pid")):
            pid = pids.read_pidfile(pidfile)
            if pid is None or not pids.alive(pid):
                pidfile.unlink(missing_ok=True)
                report.files.append(str(pidfile))
    run_dir = testbed_run_dir()
    if run_dir.is_dir():
        for entry in sorted(run_dir.iterdir()):
            if entry.suffix == ".log":
                continue  # kept for a post-mortem; the next `up` appends to them
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            report.files.append(str(entry))
    for node in nodes:
        # The nodes' migrations ended with their containers: their journals, images and
        # fences would make the next testbed's agents recover what no longer exists.
        node_dir = paths.node_dir(node)
        for entry in (
            node_dir / "handover.jsonl",
            node_dir / "agent-state.json",
            node_dir / "incoming",
            node_dir / "outgoing",
            paths.run_dir() / "nodes" / node / "fences",
        ):
            if entry.exists():
                with contextlib.suppress(OSError, FogmigError):
                    remove_tree(entry)  # never crosses into a mount CRIU may have left
                report.files.append(str(entry))
    # The controller's saved state names this testbed's migrations and drained nodes.
    controller_state = paths.controller_state_file()
    for entry in (
        controller_state,
        controller_state.with_name(controller_state.name + ".rejected"),
    ):
        if entry.exists():
            with contextlib.suppress(OSError):
                entry.unlink()
            report.files.append(str(entry))
    remove_state()
    if remove_pki():
        report.files.append(str(pki_dir()))
    return report
