"""A series of baseline migrations on the testbed, for ``fogmig baseline`` and experiment grids.

Holds the testbed's lease, brings the testbed up for the link profile (or reuses the one that
runs with that shape), deploys its own copy of the sensor service unless one already runs,
migrates it back and forth ``repeat`` times with :func:`run_baseline`, and undeploys what it
deployed; a testbed it brought up it also takes down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fogmig.experiments.baseline import DEFAULT_PAGE_SERVER_PORT, DEFAULT_SSH_PORT, run_baseline
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord, save_record
from fogmig.platform.testbed import lifecycle
from fogmig.platform.testbed.profiles import load_profile
from fogmig.platform.testbed.state import exclusive_use
from fogmig.services.deploy import ServiceSpec, deploy, find_service, undeploy


@dataclass(slots=True)
class BaselineSeries:
    """What to run: one technique, one link profile, one service, ``repeat`` times."""

    technique: Technique
    profile: str = "orchestration"
    state_mb: int = 75
    dirty_kbps: float = 10.0
    service: str = "bench"
    port: int = 5690
    repeat: int = 1
    out: Path | None = None
    ssh_port: int = DEFAULT_SSH_PORT
    page_server_port: int = DEFAULT_PAGE_SERVER_PORT
    records: list[MigrationRecord] = field(default_factory=list)


async def run_series(
    series: BaselineSeries, *, say: Callable[[str], None] = lambda _m: None
) -> list[MigrationRecord]:
    with exclusive_use(timeout=3600):
        up = await lifecycle.up(load_profile(series.profile), 2, progress=say)
        try:
            await _run(series, [n.name for n in up.state.nodes], say)
        finally:
            if not up.reused:
                await lifecycle.down()
    return series.records


async def _run(series: BaselineSeries, nodes: list[str], say: Callable[[str], None]) -> None:
    running = [p.node for p in await find_service(series.service) if p.container.running]
    own = not running
    if own:
        spec = ServiceSpec(
            name=series.service,
            state_mb=series.state_mb,
            dirty_kbps=series.dirty_kbps,
            port=series.port,
        )
        await deploy(spec, node=nodes[0], progress=say)
        here = nodes[0]
    else:
        here = running[0]
        say(f"{series.service} already runs on {here}: migrating that copy")
    try:
        for _ in range(series.repeat):
            there = nodes[1] if here == nodes[0] else nodes[0]
            say(f"baseline {series.technique}: {series.service} {here} -> {there}")
            record = await run_baseline(
                series.service,
                there,
                series.technique,
                ssh_port=series.ssh_port,
                page_server_port=series.page_server_port,
            )
            series.records.append(record)
            if series.out is not None:
                save_record(record, series.out)
            if record.outcome is Outcome.COMPLETED:
                here = there
            elif record.outcome is not Outcome.ROLLED_BACK:
                break  # the service is gone: nothing left to migrate
    finally:
        if own and await find_service(series.service):
            await undeploy(series.service)
