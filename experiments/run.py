"""Running the grid on the testbed: one bring-up per link (and MTU), a fresh service per run.

For each (link profile, MTU) group of configurations the testbed comes up with two fog nodes,
the link is measured (RTT by UDP echo, throughput by iperf3), and every remaining cell runs:
the service is deployed anew on the first node with the configuration's dirty rate, migrated
to the second while a probe device asks it, and removed, so no run finds state or images of an
earlier one. Each run's record is stored as soon as it ends (see :mod:`fogmig.experiments.store`),
which is what lets an interrupted grid resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fogmig.device_sim.probe import ProbeSettings, write_csv
from fogmig.experiments.baseline import ENGINE as BASELINE_ENGINE
from fogmig.experiments.baseline import run_baseline
from fogmig.experiments.eta import Eta
from fogmig.experiments.grid import (
    CONFIGURATIONS,
    ENGINE,
    Cell,
    GridSpec,
    base_configuration,
    remaining,
)
from fogmig.experiments.store import RunRecord, done_cells, load_runs, probe_path, save_run
from fogmig.platform.agent.launcher import agents_down, agents_up
from fogmig.platform.agent.remote import request_migration
from fogmig.platform.apps.probed import migrate_probed
from fogmig.platform.base import paths
from fogmig.platform.base.errors import FogmigError, ServiceError
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.testbed import lifecycle, topology
from fogmig.platform.testbed.links import set_data_mtu
from fogmig.platform.testbed.probe import probe_link
from fogmig.platform.testbed.profiles import LinkProfile, load_profile
from fogmig.platform.testbed.state import TestbedState, exclusive_use
from fogmig.services.deploy import ServiceSpec, deploy, find_service, undeploy

Say = Callable[[str], None]
LINK_PROBE_S = 3.0
CLEAN_WAIT_S = 10.0
"""How long a run waits for the agents to remove an earlier migration's directories."""
CLEAN_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class MeasuredLink:
    rate_mbit: float | None
    rtt_ms: float | None


@dataclass(slots=True)
class GridResult:
    ran: list[RunRecord] = field(default_factory=list)
    skipped: int = 0
    """Cells already done (resumed grid)."""
    elapsed_s: float = 0.0


class LinkRunner(Protocol):
    """Runs the cells of one (link profile, MTU) group and stores each run as it ends."""

    async def __call__(
        self,
        spec: GridSpec,
        out: Path,
        *,
        link: LinkProfile,
        mtu: int | None,
        cells: Sequence[Cell],
        eta: Eta,
        result: GridResult,
        say: Say,
    ) -> None: ...


async def run_grid(
    spec: GridSpec, out: Path, *, say: Say = print, link_runner: LinkRunner | None = None
) -> GridResult:
    """Run every cell of ``spec`` that has no record in ``out`` yet (``link_runner``: how a
    group of cells on one link runs; the testbed's by default)."""
    runner = link_runner or _run_link
    started = time.monotonic()
    runs = load_runs(out)
    earlier = [r for r in runs if r.engine == ENGINE]
    done = {r.cell for r in earlier}
    if spec.baseline:
        # A cell is done when every engine has run it.
        done &= {r.cell for r in runs if r.engine == BASELINE_ENGINE}
    todo = remaining(spec, done)
    result = GridResult(skipped=len(spec.cells()) - len(todo))
    eta = Eta(spec, done_runs=[(r.cell, r.wall_s) for r in earlier if r.cell in set(spec.cells())])
    eta.skip(done)
    if result.skipped:
        say(f"resuming: {result.skipped} run(s) done, {len(todo)} to go")
    for profile_name, mtu, configurations in spec.by_link():
        cells = [c for c in todo if c.configuration in configurations]
        if not cells:
            continue
        link = load_profile(profile_name)
        await runner(spec, out, link=link, mtu=mtu, cells=cells, eta=eta, result=result, say=say)
    result.elapsed_s = time.monotonic() - started
    return result


async def _run_link(
    spec: GridSpec,
    out: Path,
    *,
    link: LinkProfile,
    mtu: int | None,
    cells: Sequence[Cell],
    eta: Eta,
    result: GridResult,
    say: Say,
) -> None:
    # One testbed per machine: wait for whoever holds it.
    with exclusive_use(timeout=3600):
        await _on_testbed(
            spec, out, link=link, mtu=mtu, cells=cells, eta=eta, result=result, say=say
        )


async def _on_testbed(
    spec: GridSpec,
    out: Path,
    *,
    link: LinkProfile,
    mtu: int | None,
    cells: Sequence[Cell],
    eta: Eta,
    result: GridResult,
    say: Say,
) -> None:
    shown_mtu = mtu or topology.DATA_MTU
    say(f"link {link.describe()}, MTU {shown_mtu}: {len(cells)} run(s)")
    up = await lifecycle.up(link, 2, progress=lambda m: say(f"  testbed: {m}"))
    try:
        # The agents' own link probes would share the link with the measured migrations.
        await agents_up(link_probe_interval_s=0)
        await set_data_mtu(shown_mtu, up.state)
        measured = await _measure(up.state)
        say(
            f"  link measured: {_num(measured.rate_mbit)} Mbit/s, {_num(measured.rtt_ms)} ms RTT "
            f"(asked {link.rate_mbit:g} Mbit/s, {link.rtt_ms:g} ms)"
        )
        nodes = up.state.node_names
        # Each engine runs the cells it has no record of; the baseline right after fogmig.
        engines: list[tuple[str, TestbedState | None, str]] = [(ENGINE, None, "")]
        if spec.baseline:
            engines.append((BASELINE_ENGINE, up.state, f"{BASELINE_ENGINE}: "))
        done = {engine: done_cells(out, engine) for engine, _, _ in engines}
        for cell in cells:
            say(f"  {cell.key}: {nodes[0]} -> {nodes[1]} ({eta.text()})")
            wall = 0.0
            for engine, baseline, label in engines:
                if cell in done[engine]:
                    continue
                run = await _one_run(
                    spec,
                    out,
                    cell=cell,
                    link=link,
                    mtu=shown_mtu,
                    measured=measured,
                    nodes=nodes,
                    baseline=baseline,
                )
                save_run(out, run)
                result.ran.append(run)
                wall += run.wall_s
                say(f"    {label}" + _line(run))
            eta.finished(cell, wall)
    finally:
        if mtu is not None:
            with contextlib.suppress(FogmigError, OSError):
                await set_data_mtu(topology.DATA_MTU, up.state)
        await agents_down()
        await lifecycle.down()


async def _measure(state: TestbedState) -> MeasuredLink:
    a, b = state.node_names[:2]
    link = next(x for x in state.links if {x.a, x.b} == {a, b})
    try:
        m = await probe_link(state, link, seconds=LINK_PROBE_S)
    except (TimeoutError, FogmigError, OSError):
        return MeasuredLink(rate_mbit=None, rtt_ms=None)
    return MeasuredLink(rate_mbit=m.rate_mbit, rtt_ms=m.rtt_ms)


def _leftovers(source: str, destination: str) -> int:
    """Migration directories of earlier runs still at either end."""
    dirs = [paths.node_dir(destination) / "incoming", paths.node_dir(source) / "outgoing"]
    return sum(len(list(d.iterdir())) for d in dirs if d.is_dir())


async def _fresh(service: str, source: str, destination: str) -> int:
    """Remove any copy of ``service`` and wait for the agents to clear old migration
    directories; return how many are still there."""
    if await find_service(service):
        with contextlib.suppress(ServiceError):
            await undeploy(service)
    for _ in range(int(CLEAN_WAIT_S / CLEAN_POLL_S)):
        if not _leftovers(source, destination):
            return 0
        await asyncio.sleep(CLEAN_POLL_S)
    return _leftovers(source, destination)


async def _one_run(
    spec: GridSpec,
    out: Path,
    *,
    cell: Cell,
    link: LinkProfile,
    mtu: int,
    measured: MeasuredLink,
    nodes: Sequence[str],
    baseline: TestbedState | None = None,
) -> RunRecord:
    """One fresh run of ``cell``: fogmig's engine, or (``baseline``: the testbed's state) the
    paper's toolchain, which runs without a probe device."""
    conf = CONFIGURATIONS[base_configuration(cell.configuration)]
    engine = ENGINE if baseline is None else BASELINE_ENGINE
    source, destination = nodes[0], nodes[1]
    technique = Technique(cell.technique)
    started = time.monotonic()
    leftover = await _fresh(spec.service, source, destination)
    service = ServiceSpec(
        name=spec.service, state_mb=spec.state_mb, dirty_kbps=conf.dirty_kbps, port=spec.port
    )
    try:
        await deploy(service, node=source)
        if baseline is not None:
            record = await run_baseline(spec.service, destination, technique, state=baseline)
        elif spec.probe_hz > 0:
            record, timeline = await migrate_probed(
                spec.service, destination, technique, settings=ProbeSettings(rate_hz=spec.probe_hz)
            )
            write_csv(timeline, probe_path(out, ENGINE, cell))
        else:
            record = await request_migration(spec.service, destination, technique)
    except FogmigError as exc:
        # The run is recorded as failed (not retried): a resumed grid does not repeat it.
        record = MigrationRecord(
            migration_id=f"{cell.configuration}-{cell.technique}-{cell.run}-failed",
            service=spec.service,
            source=source,
            destination=destination,
            technique=technique,
            outcome=Outcome.ROLLED_BACK,
            error=f"{type(exc).__name__}: {exc}",
            failed_phase="connect",
        )
    finally:
        with contextlib.suppress(FogmigError, OSError):
            if await find_service(spec.service):
                await undeploy(spec.service)
    if record.link_rate_bit_per_s <= 0:
        record.link_rate_bit_per_s = link.rate_mbit * 1e6
        record.link_rtt_s = link.rtt_ms / 1000
    record.dirty_rate_bytes_per_s = conf.dirty_kbps * 1024
    return RunRecord(
        engine=engine,
        configuration=cell.configuration,
        paper_configuration=conf.name,
        technique=cell.technique,
        run=cell.run,
        state_mb=spec.state_mb,
        dirty_kbps=conf.dirty_kbps,
        link_profile=link.name,
        mtu=mtu,
        link_rate_asked_mbit=link.rate_mbit,
        link_rtt_asked_ms=link.rtt_ms,
        link_rate_measured_mbit=measured.rate_mbit,
        link_rtt_measured_ms=measured.rtt_ms,
        leftover_images=leftover,
        wall_s=round(time.monotonic() - started, 3),
        record=record,
    )


def _num(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def _line(run: RunRecord) -> str:
    r = run.record
    device = "-" if r.device_downtime_s is None else f"{r.device_downtime_s:.2f}"
    text = (
        f"{r.outcome.value}: total {r.total_time_s:.2f} s, downtime {r.downtime_s:.2f} s "
        f"(device {device} s), moved {r.transferred_bytes / 1e6:.1f} MB, "
        f"run {run.wall_s:.0f} s"
    )
    return text + (f"; {r.error}" if r.error else "")
