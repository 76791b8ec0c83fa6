"""The paper's evaluation on the embedded testbed: four techniques, two links, two dirty rates.

For each link profile (Table 2) the testbed is brought up with two fog nodes, the sensor service
is deployed with the configured state and each dirty rate, and each technique moves it between
the nodes (alternating direction) while it keeps dirtying memory; every record is printed and
appended to a CSV. A probe device pings the service through a gateway during every migration
(``probe_hz``, 0: none), so each record also holds the downtime a device saw, and its requests go
to ``<migration id>.probe.csv`` beside the records. Cold migration is also compared with its
physical floor: the time the link needs for the bytes moved (state bytes / link rate).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fogmig.device_sim.probe import ProbeSettings, write_csv
from fogmig.platform.agent.launcher import agents_down, agents_up
from fogmig.platform.agent.remote import request_migration
from fogmig.platform.apps.probed import migrate_probed
from fogmig.platform.base import fmt
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord, save_record
from fogmig.platform.testbed import lifecycle
from fogmig.platform.testbed.profiles import LinkProfile, load_profile
from fogmig.platform.testbed.state import exclusive_use
from fogmig.services.deploy import ServiceSpec, deploy, undeploy

console = Console()

PAPER_CONFIGURATIONS = {
    # The paper's Table 3: use case (link) x page dirtying rate (KB/s).
    "A": ("mobility", 10.0),
    "B": ("mobility", 500.0),
    "C": ("orchestration", 10.0),
    "D": ("orchestration", 500.0),
}


@dataclass(slots=True)
class ExperimentPlan:
    configurations: Sequence[str] = ("A", "B", "C", "D")
    techniques: Sequence[Technique] = tuple(Technique)
    state_mb: int = 75
    repeat: int = 1
    out: Path = Path("results/paper")
    service: str = "bench"
    port: int = 5690
    probe_hz: float = 20.0
    """Rate of the probe device during every migration; 0: no probe."""
    records: list[MigrationRecord] = field(default_factory=list)


def link_floor_s(record: MigrationRecord) -> float:
    """The time the link needs for the bytes that had to move (the physical floor)."""
    if record.link_rate_bit_per_s <= 0:
        return 0.0
    return record.transferred_bytes * 8 / record.link_rate_bit_per_s


async def run_plan(plan: ExperimentPlan) -> list[MigrationRecord]:
    plan.out.mkdir(parents=True, exist_ok=True)
    by_profile: dict[str, list[str]] = {}
    for name in plan.configurations:
        profile_name, _ = PAPER_CONFIGURATIONS[name]
        by_profile.setdefault(profile_name, []).append(name)
    for profile_name, configs in by_profile.items():
        link = load_profile(profile_name)
        # One testbed per machine: wait for whoever holds it.
        with exclusive_use(timeout=3600):
            await _run_profile(plan, link, configs)
    return plan.records


async def _run_profile(plan: ExperimentPlan, link: LinkProfile, configs: list[str]) -> None:
    console.rule(f"profile {link.name}: {link.rate_mbit} Mbit/s, {link.rtt_ms} ms RTT")
    up = await lifecycle.up(link, 2, progress=lambda m: console.print(f"  testbed: {m}"))
    try:
        # The agents' own link probes would share the link with the measured migrations.
        await agents_up(link_probe_interval_s=0)
        nodes = [n.name for n in up.state.nodes]
        for config in configs:
            _, dirty = PAPER_CONFIGURATIONS[config]
            await _run_configuration(plan, config, dirty, nodes, link)
    finally:
        await agents_down()
        await lifecycle.down()


async def _run_configuration(
    plan: ExperimentPlan, config: str, dirty_kbps: float, nodes: list[str], link: LinkProfile
) -> None:
    spec = ServiceSpec(
        name=plan.service, state_mb=plan.state_mb, dirty_kbps=dirty_kbps, port=plan.port
    )
    here = nodes[0]
    await deploy(spec, node=here)
    try:
        for technique in plan.techniques:
            for _ in range(plan.repeat):
                there = nodes[1] if here == nodes[0] else nodes[0]
                console.print(f"[bold]{config}[/] {technique}: {here} -> {there}")
                started = time.monotonic()
                if plan.probe_hz > 0:
                    settings = ProbeSettings(rate_hz=plan.probe_hz)
                    record, timeline = await migrate_probed(
                        plan.service, there, technique, settings=settings
                    )
                    write_csv(timeline, plan.out / config / f"{record.migration_id}.probe.csv")
                else:
                    record = await request_migration(plan.service, there, technique)
                record.link_rate_bit_per_s = link.rate_mbit * 1e6
                record.link_rtt_s = link.rtt_ms / 1000
                record.dirty_rate_bytes_per_s = dirty_kbps * 1024
                plan.records.append(record)
                save_record(record, plan.out / config)
                _print_record(config, record, time.monotonic() - started)
                if record.outcome is Outcome.COMPLETED:
                    here = there
    finally:
        await undeploy(plan.service)


def _print_record(config: str, r: MigrationRecord, wall: float) -> None:
    floor = link_floor_s(r)
    console.print(
        f"  {r.outcome.value}: total {fmt.seconds(r.total_time_s, digits=2)}, "
        f"downtime {fmt.seconds(r.downtime_s, digits=2)} "
        f"(device {fmt.seconds(r.device_downtime_s, digits=2, missing='-')}), "
        f"pre-dump {fmt.megabytes(r.pre_dump_bytes, digits=2)}, "
        f"dump {fmt.megabytes(r.dump_bytes, digits=2)}, "
        f"faulted {fmt.megabytes(r.faulted_pages_bytes, digits=2)}, rounds {len(r.rounds)}, "
        f"wall {fmt.seconds(wall, digits=1)}"
        + (
            f", cold/floor {r.total_time_s / floor:.2f}"
            if r.technique is Technique.COLD and floor
            else ""
        )
    )
    if r.error:
        console.print(f"  [red]{r.error}[/]")


def device_downtime(r: MigrationRecord) -> str:
    """The probe's downtime and how many of its requests the window lost (``-``: no probe,
    ``?``: the probe did not see the service on both sides of the migration)."""
    if r.probe_rate_hz is None:
        return "-"
    seen = "?" if r.device_downtime_s is None else f"{r.device_downtime_s:.2f}"
    return f"{seen} ({r.probe_lost}/{r.probe_sent} lost)"


def summary_table(records: Sequence[MigrationRecord]) -> Table:
    table = Table(title="migrations")
    for col in (
        "technique",
        "total s",
        "downtime s",
        "device downtime s",
        "pre-dump MB",
        "dump MB",
        "faulted MB",
        "floor s",
        "outcome",
    ):
        table.add_column(col)
    for r in records:
        floor = link_floor_s(r)
        table.add_row(
            r.technique,
            f"{r.total_time_s:.2f}",
            f"{r.downtime_s:.2f}",
            device_downtime(r),
            f"{r.pre_dump_bytes / 1e6:.2f}",
            f"{r.dump_bytes / 1e6:.2f}",
            f"{r.faulted_pages_bytes / 1e6:.2f}",
            f"{floor:.2f}",
            r.outcome.value,
        )
    return table
