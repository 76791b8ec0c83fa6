"""``fogmig testbed``: up, down, status, probe, and cut/restore/set of a data link at run time.

``testbed linkd`` is the link emulator daemon that ``up`` starts; it is not meant to be typed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fogmig.platform.base.aio import run_async
from fogmig.platform.testbed.profiles import DEFAULT_PROFILE, load_profile

console = Console()

DEFAULT_NODES = 2


def register(sub: Any) -> None:
    tb = sub.add_parser("testbed", help="the embedded testbed: the whole fog on this machine")
    tsub = tb.add_subparsers(
        dest="testbed_command", metavar="{up,down,status,probe,cut,restore,set}"
    )

    def usage(_args: argparse.Namespace) -> int:
        tb.print_help()
        return 2

    tb.set_defaults(func=usage)

    p = tsub.add_parser("up", help="create namespaces, data links, broker and link emulator")
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help="built-in profile (mobility, orchestration, lan) or a .toml file",
    )
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="number of fog nodes")
    p.set_defaults(func=cmd_up)

    p = tsub.add_parser("down", help="remove everything the testbed made (also after a crash)")
    p.set_defaults(func=cmd_down)

    p = tsub.add_parser("status", help="nodes, links, broker and services of each node")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = tsub.add_parser("probe", help="measure RTT and throughput of every data link")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--seconds", type=float, default=3.0, help="iperf3 time per link (after warm-up)"
    )
    p.add_argument("--pings", type=int, default=15, help="UDP echoes per link for the RTT")
    p.set_defaults(func=cmd_probe)

    for name, text in (("cut", "drop all traffic on a link"), ("restore", "restore a cut link")):
        p = tsub.add_parser(name, help=text)
        p.add_argument("a")
        p.add_argument("b")
        p.set_defaults(func=cmd_cut if name == "cut" else cmd_restore)

    p = tsub.add_parser("set", help="change a link's rate and/or RTT")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rate", type=float, dest="rate_mbit", help="Mbit/s")
    p.add_argument("--rtt", type=float, dest="rtt_ms", help="round-trip time, ms")
    p.set_defaults(func=cmd_set)

    p = tsub.add_parser("linkd")
    p.add_argument("--config", required=True, type=Path)
    p.set_defaults(func=cmd_linkd)


def cmd_up(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.lifecycle import up

    profile = load_profile(args.profile)

    async def main() -> int:
        with console.status("bringing the testbed up") as spinner:

            def progress(step: str) -> None:
                spinner.update(step)
                console.print(f"  [dim]{step}[/]")

            result = await up(profile, args.nodes, progress=progress)
        st = result.state
        if result.reused:
            console.print(
                f"[yellow]the testbed is already up with the same shape: reusing it[/] "
                f"({st.profile.describe()}, {len(st.nodes)} nodes)"
            )
        else:
            console.print(
                f"[green]testbed up[/]: {', '.join(st.node_names)} + {st.device_host.name}, "
                f"{len(st.links)} links at {st.profile.describe()}, "
                f"broker {st.broker.ip}:{st.broker.port}, links by {st.linkd.backend}"
            )
        return 0

    return run_async(main)


def cmd_down(_args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.lifecycle import down

    async def main() -> int:
        with console.status("tearing the testbed down") as spinner:
            report = await down(progress=lambda step: spinner.update(f"removing {step}"))
        if report.nothing:
            console.print("nothing to remove: the testbed is down")
            return 0
        for label, items in (
            ("containers", report.containers),
            ("processes", report.processes),
            ("mounts", report.mounts),
            ("namespaces", report.namespaces),
            ("interfaces", report.interfaces),
        ):
            if items:
                console.print(f"  removed {label}: {', '.join(items)}")
        console.print("[green]testbed down[/]")
        return 0

    return run_async(main)


def cmd_status(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.status import collect_status

    status = run_async(collect_status)
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
        return 0 if not status.problems else 1
    st = status.state
    console.print(
        f"profile {st.profile.describe()}; links by {st.linkd.backend}"
        + (f", emulator pid {st.linkd.pid}" if st.linkd.pid else "")
        + (f" ({status.linkd_cpu_s:.2f} s CPU)" if status.linkd_cpu_s is not None else "")
        + (
            f", own RTT {st.linkd.overhead_ms:.3f} ms taken off every link"
            if st.linkd.overhead_ms is not None
            else ""
        )
    )
    hosts = Table("host", "namespace", "management", "data", "services", title="hosts")
    for host in st.hosts:
        services = status.services.get(host.name, [])
        hosts.add_row(
            host.name,
            host.netns,
            host.mgmt_ip,
            host.data_ip,
            ", ".join(f"{s['id']} ({s['status']})" for s in services) or "-",
        )
    console.print(hosts)
    links = Table("link", "state", "rate Mbit/s", "RTT ms", "packets a>b / b>a", title="links")
    for link in st.links:
        c = status.link_counters.get(link.name, {})
        counts = f"{c['a_to_b']['packets']} / {c['b_to_a']['packets']}" if c else "-"
        links.add_row(
            link.name,
            "[green]up[/]" if link.up else "[red]cut[/]",
            f"{link.rate_mbit:g}",
            f"{link.rtt_ms:g}",
            counts,
        )
    console.print(links)
    b = st.broker
    console.print(
        f"broker {b.ip}:{b.port} in {b.netns}: "
        + ("[green]running[/]" if status.broker_running else "[red]not running[/]")
        + f" (pid {b.pid}, log {b.log_path})"
    )
    for problem in status.problems:
        console.print(f"[red]problem:[/] {problem}")
    return 0 if not status.problems else 1


def cmd_probe(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.probe import RATE_TOLERANCE, RTT_TOLERANCE, probe
    from fogmig.platform.testbed.state import load_state

    state = load_state()

    async def main() -> list[Any]:
        with console.status(f"probing {len(state.links)} links"):
            return await probe(state, seconds=args.seconds, pings=args.pings)

    results = run_async(main)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        table = Table(
            "link",
            "RTT asked",
            "RTT measured",
            "rate asked",
            "rate measured",
            "within",
            title=f"data links (tolerance: RTT {RTT_TOLERANCE:.0%}, rate {RATE_TOLERANCE:.0%})",
        )

        def fmt(v: float | None, unit: str) -> str:
            return "-" if v is None else f"{v:.2f} {unit}"

        for r in results:
            table.add_row(
                f"{r.a}->{r.b}",
                fmt(r.rtt_asked_ms, "ms"),
                fmt(r.rtt_ms, "ms"),
                fmt(r.rate_asked_mbit, "Mbit/s"),
                fmt(r.rate_mbit, "Mbit/s"),
                "[green]yes[/]" if r.ok else "[red]no[/]",
            )
        console.print(table)
    return 0 if all(r.ok for r in results) else 1


def cmd_cut(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.links import cut_link

    run_async(lambda: cut_link(args.a, args.b))
    console.print(f"link {args.a}-{args.b} [red]cut[/]")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.links import restore_link

    run_async(lambda: restore_link(args.a, args.b))
    console.print(f"link {args.a}-{args.b} [green]restored[/]")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.links import set_link

    run_async(lambda: set_link(args.a, args.b, rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms))
    console.print(f"link {args.a}-{args.b} set")
    return 0


def cmd_linkd(args: argparse.Namespace) -> int:
    from fogmig.platform.testbed.linkd import run_linkd

    return run_linkd(args.config)
