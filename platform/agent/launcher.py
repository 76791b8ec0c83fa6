"""Starting and stopping the testbed's agents: one detached agent per node, in its namespace.

Each agent runs ``fogmig agent --node NODE`` under ``nsenter``; its PID file and log live in
:func:`agents_dir`, and it is stopped by that recorded PID only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from fogmig.platform.agent.config import DEFAULT_TRANSFER_PORT
from fogmig.platform.base import paths
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.nodes import netns_name
from fogmig.platform.base.proc import NETNS_DIR, run


def agents_dir() -> Path:
    """Where the agents' PID files and logs are."""
    return paths.run_dir() / "agents"


def agent_argv(node: str, *, link_probe_interval_s: float | None = None) -> list[str]:
    """The command line that runs the agent of ``node`` in its namespace."""
    # -P: never let the current directory (a checkout with its own `platform/`) shadow stdlib.
    return [
        "nsenter",
        f"--net={NETNS_DIR / netns_name(node)}",
        "--",
        sys.executable,
        "-P",
        "-m",
        "fogmig.platform.cli.main",
        # A daemon's log is read after the fact: what each migration did, at INFO.
        "-v",
        "agent",
        "--node",
        node,
        *(
            ["--link-probe-interval", f"{link_probe_interval_s:g}"]
            if link_probe_interval_s is not None
            else []
        ),
    ]


async def agents_up(
    *, timeout: float = 20.0, link_probe_interval_s: float | None = None
) -> dict[str, int]:
    """Start an agent per testbed node (idempotent); return node -> PID.

    ``link_probe_interval_s=0`` turns the agents' link measurements off (benchmarks).
    """
    from fogmig.platform.testbed import pids
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    started: dict[str, int] = {}
    for node in state.nodes:
        pidfile = agents_dir() / f"{node.name}.pid"
        pid = pids.read_pidfile(pidfile)
        if pid is not None and pids.is_ours(pid, ("agent", node.name)):
            started[node.name] = pid
            continue
        pid = pids.spawn_detached(
            agent_argv(node.name, link_probe_interval_s=link_probe_interval_s),
            log_path=agents_dir() / f"{node.name}.log",
        )
        pids.write_pidfile(pidfile, pid)
        started[node.name] = pid
    deadline = time.monotonic() + timeout
    for node in state.nodes:
        while True:
            out = await run(["ss", "-ltnH"], netns=node.netns, check=False)
            if f"{node.data_ip}:{DEFAULT_TRANSFER_PORT}" in out.stdout:
                break
            if not pids.alive(started[node.name]) or time.monotonic() > deadline:
                log = agents_dir() / f"{node.name}.log"
                raise FogmigError(
                    f"the agent of {node.name} did not come up: {pids.log_tail(log)}",
                    hint=f"see {log}",
                )
            await asyncio.sleep(0.2)
    return started


def poke_agent(node: str) -> bool:
    """Ask the agent of ``node`` (started here) to report its services at once (SIGHUP);
    whether one was asked. Without it the agent notices a service started or removed by
    hand at its next status report, seconds later."""
    from fogmig.platform.testbed import pids

    pid = pids.read_pidfile(agents_dir() / f"{node}.pid")
    if pid is None or not pids.is_ours(pid, ("agent", node)):
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return False
    return True


async def agents_down() -> list[str]:
    """Stop every agent this machine started (by its recorded PID)."""
    from fogmig.platform.testbed import pids

    stopped: list[str] = []
    directory = agents_dir()
    if not directory.is_dir():
        return stopped
    for pidfile in sorted(directory.glob("*.pid")):
        node = pidfile.stem
        pid = pids.read_pidfile(pidfile)
        if pid is not None and await pids.stop_process(pid, ("agent", node), grace=10.0):
            stopped.append(node)
        pidfile.unlink(missing_ok=True)
    return stopped
