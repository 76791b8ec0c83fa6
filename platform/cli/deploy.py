"""``fogmig deploy``, ``fogmig undeploy`` and ``fogmig services``: services on the fog nodes.

Thin argument handling over :mod:`fogmig.services.deploy`; results print as a short summary
(or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from fogmig.platform.base.aio import run_async
from fogmig.services import deploy as dep
from fogmig.services.sensor import DEFAULT_DIRTY_KBPS, DEFAULT_STATE_MB

console = Console()


def _say(message: str) -> None:
    console.print(message, highlight=False)


def _deploy(args: argparse.Namespace) -> int:
    spec = dep.ServiceSpec(
        name=args.name or args.kind,
        kind=args.kind,
        state_mb=args.state_mb,
        dirty_kbps=args.dirty_kbps,
    )

    async def main() -> dep.Deployment:
        return await dep.deploy(spec, node=args.node, timeout=args.timeout, progress=_say)

    d = run_async(main)
    if args.json:
        doc = {
            "name": d.name,
            "node": d.node,
            "netns": d.netns,
            "addresses": d.addresses,
            "port": d.port,
            "pid": d.pid,
            "bundle": str(d.bundle),
            "startup_s": round(d.startup_s, 3),
            "state": d.state.model_dump(),
        }
        print(json.dumps(doc, indent=2))
        return 0
    where = ", ".join(f"coap://{a}:{d.port}/" for a in d.addresses) or f"port {d.port}"
    console.print(
        f"[green]{d.name}[/] runs on node [bold]{d.node}[/] (netns {d.netns}, pid {d.pid}): "
        f"{where}",
        highlight=False,
    )
    console.print(
        f"answered GET /state after {d.startup_s:.1f} s: count {d.state.count}, "
        f"state {d.state.state_mb} MB, dirtying {d.state.dirty_kbps:g} KB/s",
        highlight=False,
    )
    return 0


def _undeploy(args: argparse.Namespace) -> int:
    nodes = run_async(lambda: dep.undeploy(args.name))
    console.print(f"removed {args.name} from {', '.join(nodes)}", highlight=False)
    return 0


def _services(args: argparse.Namespace) -> int:
    found = run_async(dep.list_services)
    if args.json:
        doc = {
            node: [
                {"name": c.id, "status": c.status, "pid": c.pid, "bundle": str(c.bundle)}
                for c in containers
            ]
            for node, containers in found.items()
        }
        print(json.dumps(doc, indent=2))
        return 0
    table = Table(title="services")
    for col in ("node", "service", "status", "pid", "bundle"):
        table.add_column(col)
    for node, containers in found.items():
        if not containers:
            table.add_row(node, "-", "", "", "")
        for c in containers:
            table.add_row(node, c.id, c.status, str(c.pid or ""), str(c.bundle or ""))
    if not found:
        console.print("no fog nodes on this machine (`fogmig testbed up` creates them)")
        return 0
    console.print(table)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("deploy", help="run a service on a fog node")
    p.add_argument("kind", choices=dep.SERVICE_KINDS, help="the service to run")
    p.add_argument("--node", required=True, help="the fog node (e.g. gw1)")
    p.add_argument("--name", help="the service's name (default: the kind)")
    p.add_argument("--state-mb", type=int, default=DEFAULT_STATE_MB, help="MiB of memory state")
    p.add_argument(
        "--dirty-kbps", type=float, default=DEFAULT_DIRTY_KBPS, help="KB/s of memory dirtied"
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the first answer"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_deploy)

    p = sub.add_parser("undeploy", help="stop and remove a service from whichever node runs it")
    p.add_argument("name")
    p.set_defaults(func=_undeploy)

    p = sub.add_parser("services", help="list the services of every fog node on this machine")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_services)
