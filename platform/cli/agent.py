"""CLI of the node agents and of migrations: ``fogmig agent``, ``agents up|down``, ``migrate``.

``agent`` runs one node's daemon in the foreground (re-entering the node's network namespace
on the testbed); ``agents up`` starts one detached agent per testbed node; ``migrate`` asks the
service's current node to move it and follows the migration's progress on the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from fogmig.platform.agent.launcher import agent_argv, agents_down, agents_up
from fogmig.platform.agent.remote import request_migration
from fogmig.platform.base import fmt
from fogmig.platform.base.aio import run_async
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.netns import running_in_netns
from fogmig.platform.base.nodes import netns_name
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord

console = Console()


def _cmd_agent(args: argparse.Namespace) -> int:
    from fogmig.platform.agent.app import run_agent
    from fogmig.platform.agent.config import AgentConfig

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
    if not running_in_netns(netns):
        os.execvp("nsenter", agent_argv(args.node, link_probe_interval_s=args.link_probe_interval))
    config = AgentConfig.from_testbed(args.node)
    if args.link_probe_interval is not None:
        config = dataclasses.replace(config, link_probe_interval_s=args.link_probe_interval)
    run_async(lambda: run_agent(config))
    return 0


def _cmd_agents(args: argparse.Namespace) -> int:
    if args.action == "up":
        started = run_async(agents_up)
        for node, pid in started.items():
            console.print(f"agent {node}: pid {pid}")
    else:
        stopped = run_async(agents_down)
        console.print(f"stopped agents: {', '.join(stopped) or 'none'}")
    return 0


def _phase(time_s: float, transfer_time_s: float, nbytes: int) -> str:
    return (
        f"{fmt.seconds(time_s)} + transfer {fmt.seconds(transfer_time_s)}, {fmt.byte_count(nbytes)}"
    )


def _summary(record: MigrationRecord) -> str:
    r = record
    rows = [
        ("technique", r.technique.value),
        ("outcome", r.outcome.value),
        ("total time", fmt.seconds(r.total_time_s)),
        ("downtime", fmt.seconds(r.downtime_s)),
        ("pre-dump", _phase(r.pre_dump_time_s, r.pre_dump_transfer_time_s, r.pre_dump_bytes)),
        ("dump", _phase(r.dump_time_s, r.dump_transfer_time_s, r.dump_bytes)),
        ("resume", fmt.seconds(r.resume_time_s)),
        (
            "faulted pages",
            f"{fmt.seconds(r.faulted_pages_transfer_time_s)}, "
            f"{fmt.byte_count(r.faulted_pages_bytes)}",
        ),
        ("rounds", str(len(r.rounds))),
    ]
    if r.probe_rate_hz is not None:
        rows.append(("device downtime", fmt.seconds(r.device_downtime_s)))
        rows.append(
            (
                "probe",
                f"{r.probe_sent} sent, {r.probe_answered} answered, "
                f"{r.probe_lost} lost at {r.probe_rate_hz:g} Hz",
            )
        )
    if r.error:
        rows.append(("error", f"{r.error} (in {r.failed_phase})"))
    return "\n".join(f"{k:>15}: {v}" for k, v in rows)


async def _migrate_probed(args: argparse.Namespace, request: dict[str, Any]) -> MigrationRecord:
    from fogmig.device_sim.probe import ProbeSettings
    from fogmig.platform.apps.probed import migrate_probed

    record, _ = await migrate_probed(
        args.service,
        args.to,
        args.technique,
        settings=ProbeSettings(rate_hz=args.probe_hz),
        csv_path=args.probe_csv,
        **request,
    )
    return record


def _cmd_migrate(args: argparse.Namespace) -> int:
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

        request: dict[str, Any] = {
            "compression": args.compression,
            "max_rounds": args.max_rounds,
            "on_progress": show,
        }
        if args.probe:
            record = run_async(lambda: _migrate_probed(args, request))
        else:
            record = run_async(
                lambda: request_migration(args.service, args.to, args.technique, **request)
            )
    if args.json:
        print(record.model_dump_json(indent=2))
    else:
        console.print(_summary(record))
    return 0 if record.outcome is Outcome.COMPLETED else 1


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
    p.add_argument("--technique", required=True, type=Technique, choices=list(Technique))
    p.add_argument(
        "--no-compression",
        dest="compression",
        action="store_false",
        help="never compress the state transfer (by default zstd where it pays)",
    )
    p.add_argument("--max-rounds", type=int, default=None, help="pre-copy rounds at most")
    p.add_argument("--json", action="store_true", help="print the migration record as JSON")
    p.add_argument(
        "--probe",
        action="store_true",
        help="ping the service from the device host through a gateway during the migration "
        "and report the downtime a device sees",
    )
    p.add_argument("--probe-hz", type=float, default=20.0, metavar="HZ", help="probe rate")
    p.add_argument("--probe-csv", type=Path, metavar="FILE", help="write the probe's requests")
    p.set_defaults(func=_cmd_migrate)
