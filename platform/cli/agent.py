"""CLI of the node agents and of migrations: ``fogmig agent``, ``agents up|down``, ``migrate``.

``agent`` runs one node's daemon in the foreground (re-entering the node's network namespace
on the testbed); ``agents up`` starts one detached agent per testbed node; ``migrate`` asks the
service's current node to move it and follows the migration's progress on the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError, FogmigError, MigrationError, ServiceError
from fogmig.platform.base.nodes import netns_name
from fogmig.platform.base.proc import NETNS_DIR, run

console = Console()


def _agents_dir() -> Path:
    return paths.run_dir() / "agents"


def _in_netns(netns: str) -> bool:
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(NETNS_DIR / netns).st_ino
    except OSError:
        return False


def _agent_argv(node: str, *, link_probe_interval_s: float | None = None) -> list[str]:
    # -P: never let the current directory (a checkout with its own `platform/`) shadow stdlib.
    return [
        "nsenter",
        f"--net={NETNS_DIR / netns_name(node)}",
        "--",
        sys.executable,
        "-P",
        "-m",
        "fogmig.platform.cli.main",
        "agent",
        "--node",
        node,
        *(
            ["--link-probe-interval", f"{link_probe_interval_s:g}"]
            if link_probe_interval_s is not None
            else []
        ),
    ]


def _cmd_agent(args: argparse.Namespace) -> int:
    from fogmig.platform.agent.app import AgentConfig, run_agent
    from fogmig.platform.base.aio import run_async

    if args.config is not None:
        # A real node: its own network, its configuration from the file.
        config = AgentConfig.from_file(args.config)
        if args.link_probe_interval is not None:
            config = dataclasses.replace(config, link_probe_interval_s=args.link_probe_interval)
        if args.node is not None and args.node != config.node:
            raise ConfigError(f"--node {args.node} but {args.config} configures {config.node}")
        run_async(lambda: run_agent(config))
        return 0
    if args.node is None:
        raise ConfigError("give --node NODE (on the testbed) or --config FILE (a real node)")
    netns = netns_name(args.node)
    if not _in_netns(netns):
        os.execvp("nsenter", _agent_argv(args.node, link_probe_interval_s=args.link_probe_interval))
    config = AgentConfig.from_testbed(args.node)
    if args.link_probe_interval is not None:
        config = dataclasses.replace(config, link_probe_interval_s=args.link_probe_interval)
    run_async(lambda: run_agent(config))
    return 0


async def agents_up(
    *, timeout: float = 20.0, link_probe_interval_s: float | None = None
) -> dict[str, int]:
    """Start an agent per testbed node (idempotent); return node -> PID.

    ``link_probe_interval_s=0`` turns the agents' link measurements off (benchmarks).
    """
    from fogmig.platform.agent.app import TRANSFER_PORT
    from fogmig.platform.testbed import pids
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    started: dict[str, int] = {}
    for node in state.nodes:
        pidfile = _agents_dir() / f"{node.name}.pid"
        pid = pids.read_pidfile(pidfile)
        if pid is not None and pids.is_ours(pid, ("agent", node.name)):
            started[node.name] = pid
            continue
        pid = pids.spawn_detached(
            _agent_argv(node.name, link_probe_interval_s=link_probe_interval_s),
            log_path=_agents_dir() / f"{node.name}.log",
        )
        pids.write_pidfile(pidfile, pid)
        started[node.name] = pid
    deadline = time.monotonic() + timeout
    for node in state.nodes:
        while True:
            out = await run(["ss", "-ltnH"], netns=node.netns, check=False)
            if f"{node.data_ip}:{TRANSFER_PORT}" in out.stdout:
                break
            if not pids.alive(started[node.name]) or time.monotonic() > deadline:
                log = _agents_dir() / f"{node.name}.log"
                raise FogmigError(
                    f"the agent of {node.name} did not come up: {pids.log_tail(log)}",
                    hint=f"see {log}",
                )
            await asyncio.sleep(0.2)
    return started


async def agents_down() -> list[str]:
    """Stop every agent this machine started (by its recorded PID)."""
    from fogmig.platform.testbed import pids

    stopped: list[str] = []
    directory = _agents_dir()
    if not directory.is_dir():
        return stopped
    for pidfile in sorted(directory.glob("*.pid")):
        node = pidfile.stem
        pid = pids.read_pidfile(pidfile)
        if pid is not None and await pids.stop_process(pid, ("agent", node), grace=10.0):
            stopped.append(node)
        pidfile.unlink(missing_ok=True)
    return stopped


def _cmd_agents(args: argparse.Namespace) -> int:
    from fogmig.platform.base.aio import run_async

    if args.action == "up":
        started = run_async(agents_up)
        for node, pid in started.items():
            console.print(f"agent {node}: pid {pid}")
    else:
        stopped = run_async(agents_down)
        console.print(f"stopped agents: {', '.join(stopped) or 'none'}")
    return 0


async def request_migration(
    service: str,
    destination: str,
    technique: str,
    *,
    compression: bool = False,
    max_rounds: int | None = None,
    on_progress: Any = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Ask the node running ``service`` to migrate it; wait for and return the done event."""
    from fogmig.platform.bus.client import Bus
    from fogmig.platform.bus.schemas import MigrateCommand, MigrationDone, MigrationProgress, topics
    from fogmig.platform.bus.schemas import PrecopyRules as BusPrecopyRules
    from fogmig.platform.testbed.broker import CONTROLLER_USER
    from fogmig.platform.testbed.credentials import load_credentials
    from fogmig.platform.testbed.state import load_state
    from fogmig.services.deploy import find_service

    state = load_state()
    placements = await find_service(service)
    running = [p for p in placements if p.container.running]
    if not running:
        raise ServiceError(
            f"service {service} runs on no node", hint="`fogmig services` lists what runs where"
        )
    source = running[0].node
    creds = load_credentials()
    rules = BusPrecopyRules() if max_rounds is None else BusPrecopyRules(max_rounds=max_rounds)
    command = MigrateCommand(
        command_id=uuid.uuid4().hex[:12],
        service=service,
        destination=destination,
        technique=technique,  # type: ignore[arg-type]
        compression=compression,
        precopy=rules,
        reason="requested on the command line",
    )
    async with (
        Bus(
            host=state.broker.ip,
            port=state.broker.port,
            username=CONTROLLER_USER,
            password=creds.mqtt[CONTROLLER_USER],
            client_id=f"cli-{uuid.uuid4().hex[:8]}",
            known_nodes=state.node_names,
        ) as bus,
        bus.subscribe(topics.events(source)) as events,
    ):
        await bus.request(source, command, timeout=15.0)
        async with asyncio.timeout(timeout):
            async for _, msg in events:
                if getattr(msg, "command_id", None) != command.command_id:
                    continue
                if isinstance(msg, MigrationProgress) and on_progress is not None:
                    on_progress(msg)
                if isinstance(msg, MigrationDone):
                    return dict(msg.record)
    raise MigrationError("the bus closed before the migration ended", phase="?", migration_id="?")


def _phase(record: dict[str, Any], name: str) -> str:
    return (
        f"{record[name + '_time_s']:.3f} s + transfer {record[name + '_transfer_time_s']:.3f} s,"
        f" {record[name + '_bytes']:,} B"
    )


def _summary(record: dict[str, Any]) -> str:
    rows = [
        ("technique", record["technique"]),
        ("outcome", record["outcome"]),
        ("total time", f"{record['total_time_s']:.3f} s"),
        ("downtime", f"{record['downtime_s']:.3f} s"),
        ("pre-dump", _phase(record, "pre_dump")),
        ("dump", _phase(record, "dump")),
        ("resume", f"{record['resume_time_s']:.3f} s"),
        (
            "faulted pages",
            f"{record['faulted_pages_transfer_time_s']:.3f} s, {record['faulted_pages_bytes']:,} B",
        ),
        ("rounds", str(len(record.get("rounds", [])))),
    ]
    if record.get("error"):
        rows.append(("error", f"{record['error']} (in {record.get('failed_phase')})"))
    return "\n".join(f"{k:>14}: {v}" for k, v in rows)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from fogmig.platform.base.aio import run_async

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=args.json,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def show(msg: Any) -> None:
            total = msg.bytes_total or None
            bar.update(task, description=msg.phase, completed=msg.bytes_done, total=total)

        record = run_async(
            lambda: request_migration(
                args.service,
                args.to,
                args.technique,
                compression=args.compression,
                max_rounds=args.max_rounds,
                on_progress=show,
            )
        )
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        console.print(_summary(record))
    return 0 if record["outcome"] == "completed" else 1


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run a node's agent in the foreground")
    p.add_argument("--node", help="a testbed node (the agent enters its namespace)")
    p.add_argument("--config", type=Path, metavar="FILE", help="a real node's TOML configuration")
    p.add_argument(
        "--link-probe-interval",
        type=float,
        default=None,
        metavar="S",
        help="seconds between link measurements to the peers (0: off)",
    )
    p.set_defaults(func=_cmd_agent)

    p = sub.add_parser("agents", help="start or stop the agents of every testbed node")
    p.add_argument("action", choices=["up", "down"])
    p.set_defaults(func=_cmd_agents)

    p = sub.add_parser("migrate", help="migrate a running service to another node")
    p.add_argument("service")
    p.add_argument("--to", required=True, metavar="NODE")
    p.add_argument("--technique", required=True, choices=["cold", "precopy", "postcopy", "hybrid"])
    p.add_argument("--compression", action="store_true", help="zlib on the state transfer")
    p.add_argument("--max-rounds", type=int, default=None, help="pre-copy rounds at most")
    p.add_argument("--json", action="store_true", help="print the migration record as JSON")
    p.set_defaults(func=_cmd_migrate)
