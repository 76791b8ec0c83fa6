"""What runs on the testbed now: hosts, links (up or cut, counters), broker, services."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.netns import netns_path
from fogmig.platform.base.nodes import runc_root
from fogmig.platform.base.proc import run
from fogmig.platform.testbed import broker, netns, pids
from fogmig.platform.testbed.links import link_runtime
from fogmig.platform.testbed.pki import missing_identities
from fogmig.platform.testbed.state import TestbedState, load_state


def linkd_needles(state: TestbedState) -> tuple[str, ...]:
    """What the link daemon's command line must contain for a PID to be ours."""
    return ("linkd", state.linkd.config_path or "")


async def healthy(state: TestbedState) -> list[str]:
    """What is wrong with a running testbed (empty when everything is in place)."""
    problems: list[str] = []
    for host in [*state.hosts]:
        if not netns_path(host.netns).exists():
            problems.append(f"namespace {host.netns} is missing")
    if not netns.link_exists(state.bridge):
        problems.append(f"bridge {state.bridge} is missing")
    if not pids.is_ours(state.broker.pid, broker.broker_needles(state.broker)):
        problems.append(f"the broker (pid {state.broker.pid}) is not running")
    if state.linkd.backend == "tun" and not pids.is_ours(state.linkd.pid, linkd_needles(state)):
        problems.append(f"the link emulator (pid {state.linkd.pid}) is not running")
    # A testbed made by an earlier fogmig: its broker or principals are not the ones this
    # version's clients need (e.g. no operator certificate, client ids not bound).
    stale = broker.stale_files(state)
    if stale:
        problems.append(f"the broker's {' and '.join(stale)} differ from this fogmig's")
    missing = missing_identities(state)
    if missing:
        problems.append(f"no certificate for {', '.join(str(i) for i in missing)}")
    return problems


@dataclass
class TestbedStatus:
    __test__ = False  # not a pytest test class despite the name

    state: TestbedState
    broker_running: bool
    linkd_running: bool
    linkd_cpu_s: float | None = None
    linkd_uptime_s: float | None = None
    link_counters: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    services: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "profile": self.state.profile.model_dump(),
            "nodes": [n.model_dump() for n in self.state.nodes],
            "device_host": self.state.device_host.model_dump(),
            "broker": {**self.state.broker.model_dump(), "running": self.broker_running},
            "linkd": {
                **self.state.linkd.model_dump(),
                "running": self.linkd_running,
                "cpu_s": self.linkd_cpu_s,
                "uptime_s": self.linkd_uptime_s,
            },
            "links": [
                {**link.model_dump(), "counters": self.link_counters.get(link.name, {})}
                for link in self.state.links
            ],
            "services": self.services,
            "problems": self.problems,
        }


async def node_containers(node: str) -> list[dict[str, str]]:
    """The runc containers of one node (id, status, pid, bundle)."""
    root = runc_root(node)
    if not root.is_dir():
        return []
    done = await run(["runc", "--root", str(root), "list", "--format", "json"], check=False)
    if done.returncode != 0:
        return []
    return [
        {k: str(entry.get(k, "")) for k in ("id", "status", "pid", "bundle")}
        for entry in json.loads(done.stdout or "null") or []
    ]


async def collect_status() -> TestbedStatus:
    state = load_state()
    status = TestbedStatus(
        state=state,
        broker_running=pids.is_ours(state.broker.pid, broker.broker_needles(state.broker)),
        linkd_running=state.linkd.backend != "tun"
        or pids.is_ours(state.linkd.pid, linkd_needles(state)),
        problems=await healthy(state),
    )
    if state.linkd.backend == "tun" and status.linkd_running:
        try:
            runtime = await link_runtime(state)
        except FogmigError as exc:
            status.problems.append(str(exc))
            runtime = None
        if runtime is not None:
            status.linkd_cpu_s, status.linkd_uptime_s = runtime.cpu_s, runtime.uptime_s
            for lr in runtime.links:
                status.link_counters[f"{lr.a}-{lr.b}"] = {"a_to_b": lr.a_to_b, "b_to_a": lr.b_to_a}
                stored = state.link(lr.a, lr.b)
                # The daemon is the authority on what the links do right now.
                stored.up, stored.rate_mbit, stored.rtt_ms = lr.up, lr.rate_mbit, lr.rtt_ms
    for node in state.node_names:
        status.services[node] = await node_containers(node)
    return status
