"""``fogmig demo``: the whole platform at work on the embedded testbed, measured and reported.

It brings up the testbed and the node agents, deploys one sensor service per device on the
device's first gateway, runs the controller in-process and the device fleet in the device
host's namespace with a probe device per service beside them (pings through the device's
gateway, many a second: the downtime a device sees, finer than its readings show), lets the
devices roam so the controller migrates their services, and ends with a summary, the raw files
and an HTML report. It always cleans up what it started (also on an error or an interrupt); the
run passes only when every migration completed and every continuity check held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from fogmig.device_sim.coap import CoapThread
from fogmig.device_sim.device import DeviceConfig, RequestSettings
from fogmig.device_sim.events import (
    ContinuityCheck,
    FleetEvent,
    RequestRecord,
    Roam,
)
from fogmig.device_sim.fleet import DeviceFleet
from fogmig.device_sim.observed import ProbeTimeline
from fogmig.device_sim.probe import Probe, ProbeSettings, write_csv
from fogmig.platform.apps.demo import site
from fogmig.platform.apps.demo.plan import DemoOptions, DevicePlan, plan_devices
from fogmig.platform.apps.demo.report import ReportInput, write_report
from fogmig.platform.apps.demo.results import (
    DemoSummary,
    continuity_totals,
    decision_rows,
    migration_rows,
    problems,
    request_totals,
    write_migrations_csv,
)
from fogmig.platform.apps.demo.view import DemoModel, DemoView
from fogmig.platform.base import paths
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import MigrationDone
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.actions import ControllerEvent, EventKind
from fogmig.platform.controller.runner import Controller
from fogmig.platform.testbed.state import TestbedState
from fogmig.services.deploy import Deployment, ServiceSpec

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 15.0
SETTLE_POLL_S = 0.25
REFRESH_S = 0.25


class DemoInterruptedError(FogmigError):
    """The demo was interrupted before it ran; everything it had started is cleaned up."""


@dataclass(slots=True)
class _Collected:
    """What the run gathers for the summary and the raw files."""

    events: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, MigrationDone] = field(default_factory=dict)
    probes: dict[str, ProbeTimeline] = field(default_factory=dict)
    """Service -> what its probe recorded over the whole run."""


Phase = Literal["idle", "setup", "running", "cleanup", "finished"]


class Demo:
    """One run of the demo: ``summary = await Demo(options, console=...).run()``.

    :meth:`interrupt` (wired to SIGINT and SIGTERM by the CLI) ends a run early but still
    summarises it; during the set-up it abandons the set-up. Either way :meth:`run` cleans up
    everything it started before it returns or raises.
    """

    def __init__(
        self, options: DemoOptions, *, console: Console | None = None, live: bool | None = None
    ) -> None:
        self.options = options
        self.console = console or Console()
        self.phase: Phase = "idle"
        self.interrupted = False
        self.model = DemoModel(devices={}, duration_s=options.duration_s)
        self.view = DemoView(self.model, self.console, live=live)
        self.collected = _Collected()
        self.deployments: list[Deployment] = []
        self.plans: list[DevicePlan] = []
        self._services: list[str] = []
        self._probes: dict[str, Probe] = {}
        self._gateway_ips: dict[str, str] = {}
        self._agents = False
        self._testbed = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None

    def say(self, text: str) -> None:
        self.view.say(text)

    def interrupt(self) -> None:
        """Stop the run as soon as possible (and still clean up)."""
        if self.phase == "setup":
            self.interrupted = True
            self.say("interrupted: abandoning the set-up and cleaning up")
            if self._task is not None:
                self._task.cancel()
        elif self.phase == "running":
            if not self.interrupted:
                self.say("interrupted: ending the run (a second interrupt is not needed)")
            self.interrupted = True
            self._stop.set()
        elif self.phase == "cleanup":
            self.say("cleaning up, please wait")

    async def run(self) -> DemoSummary:
        self._task = asyncio.current_task()
        self.phase = "setup"
        try:
            state = await self._setup()
            self.phase = "running"
            return await self._run(state)
        except asyncio.CancelledError:
            if self._task is None or not self.interrupted:
                raise
            self._task.uncancel()
            raise DemoInterruptedError("the demo was interrupted during its set-up") from None
        finally:
            self.phase = "cleanup"
            await self._cleanup()
            self.phase = "finished"

    # --- set-up -------------------------------------------------------------------------------

    async def _setup(self) -> TestbedState:
        o = self.options

        def up() -> None:
            self._testbed = self._agents = True

        state = await site.bring_up(o.profile, o.nodes, say=self.say, what="the demo", on_up=up)
        plans = plan_devices(
            o.devices,
            state.node_names,
            o.duration_s,
            roams=o.roams,
            kind=o.roam,
            seed=o.seed,
            port_base=o.port_base,
        )
        self.plans = plans
        self._services = [p.service for p in plans]
        specs = [
            ServiceSpec(name=p.service, state_mb=o.state_mb, dirty_kbps=o.dirty_kbps, port=p.port)
            for p in plans
        ]
        self.say(
            f"deploying {', '.join(f'{p.service} on {p.start}:{p.port}' for p in plans)} "
            f"({o.state_mb} MB state, {o.dirty_kbps:g} KB/s dirtied)"
        )
        self.deployments = await site.deploy_services(
            [(spec, p.start) for spec, p in zip(specs, plans, strict=True)]
        )
        return state

    # --- the run ------------------------------------------------------------------------------

    def _on_controller_event(self, event: ControllerEvent) -> None:
        if event.kind is not EventKind.PROGRESS:
            self.collected.events.append(event.to_dict())
        self.view.controller_event(event)

    def _on_fleet_event(self, event: FleetEvent) -> None:
        if isinstance(event, Roam) and (probe := self._probes.get(event.service)) is not None:
            # The probe goes where the service's device goes, as the device's traffic does.
            probe.retarget(self._gateway_ips[event.to_gateway])
        self.view.fleet_event(event)

    @contextlib.asynccontextmanager
    async def _probing(self, state: TestbedState) -> AsyncIterator[None]:
        """A probe per service, from the device host through its device's gateway, for the
        block; their timelines end up in ``collected.probes``."""
        o = self.options
        if o.probe_hz <= 0:
            yield
            return
        settings = ProbeSettings(rate_hz=o.probe_hz)
        self._gateway_ips = {n.name: n.data_ip for n in state.nodes}
        try:
            async with contextlib.AsyncExitStack() as stack:
                thread = await stack.enter_async_context(
                    CoapThread.running(netns=state.device_host.netns)
                )
                for p in self.plans:
                    self._probes[p.service] = await stack.enter_async_context(
                        Probe.running(
                            address=self._gateway_ips[p.start],
                            port=p.port,
                            settings=settings,
                            thread=thread,
                        )
                    )
                self.say(f"probes: {len(self._probes)} at {o.probe_hz:g} Hz")
                yield
        finally:
            probes, self._probes = self._probes, {}
            for service, probe in probes.items():
                with contextlib.suppress(FogmigError):
                    self.collected.probes[service] = probe.timeline()

    async def _collect_done(self, bus: Bus) -> None:
        async with bus.subscribe(topics.events()) as events:
            async for _, msg in events:
                if isinstance(msg, MigrationDone):
                    self.collected.done.setdefault(msg.migration_id, msg)

    def _settled(self, controller: Controller, fleet: DeviceFleet) -> bool:
        core = controller.core
        reg = core.registry
        if core.inflight or core.pending:
            return False
        if not all(a.settled for a in reg.attachments.values()):
            return False
        return all(reg.location(d.service) == d.gateway for d in fleet.devices)

    async def _wait_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(0.0, seconds))

    async def _run(self, state: TestbedState) -> DemoSummary:
        from fogmig.platform.controller.config import config_for_testbed
        from fogmig.platform.controller.runner import single_instance
        from fogmig.platform.testbed.devices import TestbedDevices

        o = self.options
        out = o.out
        out.mkdir(parents=True, exist_ok=True)
        plans = self.plans
        devices = {p.name: p.service for p in plans}
        self.model.set_devices(devices)
        config = config_for_testbed(
            debounce_s=o.debounce_s,
            objective=o.objective,
            decision_log=out / "controller-events.jsonl",
        )
        started = time.time()
        with single_instance(paths.run_dir() / "controller.lock"):
            devices = {p.name: p.service for p in self.plans}
            async with site.open_buses(state, devices) as (controller_bus, buses):
                await site.announce(controller_bus, state, self.deployments)
                controller = Controller(
                    config,
                    controller_bus,
                    devices=TestbedDevices(),
                    on_event=self._on_controller_event,
                )
                registry = controller.core.registry
                self.model.nodes_source = lambda: registry.nodes
                self.model.location = registry.location
                fleet = DeviceFleet(
                    devices=[
                        DeviceConfig(
                            name=p.name,
                            service=p.service,
                            port=p.port,
                            gateway=p.start,
                            roaming=p.roaming,
                        )
                        for p in plans
                    ],
                    gateways={n.name: n.data_ip for n in state.nodes},
                    buses=buses,
                    out=out / "devices",
                    settings=RequestSettings(
                        interval_s=o.interval_s, check_every_s=o.check_every_s
                    ),
                    on_event=self._on_fleet_event,
                    netns=state.device_host.netns,
                    seed=o.seed,
                )
                async with self._probing(state):
                    settled = await self._drive(controller, controller_bus, fleet)
        finished = time.time()
        return self._finish(
            state=state,
            fleet=fleet,
            controller=controller,
            started=started,
            finished=finished,
            settled=settled,
        )

    async def _drive(self, controller: Controller, bus: Bus, fleet: DeviceFleet) -> bool:
        """Run the controller and the fleet for the duration, then until things settle."""
        o = self.options
        stop_controller = asyncio.Event()
        settled = False
        try:
            with self.view:
                async with asyncio.TaskGroup() as tg:
                    collector = tg.create_task(self._collect_done(bus), name="demo:done")
                    painter = tg.create_task(self.view.refresh_every(REFRESH_S), name="demo:view")
                    ctl = tg.create_task(controller.run(stop_controller), name="demo:controller")
                    async with asyncio.timeout(READY_TIMEOUT_S):
                        await controller.ready.wait()
                    self.model.start_clock()
                    self.view.set_phase("running")
                    devices = tg.create_task(fleet.run(None), name="demo:devices")
                    await self._wait_stop(o.duration_s)
                    self.view.set_phase("settling")
                    deadline = time.monotonic() + o.settle_timeout_s
                    since: float | None = None
                    while not self._stop.is_set() and time.monotonic() < deadline:
                        if not self._settled(controller, fleet):
                            since = None
                        elif since is None:
                            since = time.time()
                        elif site.answered_since(fleet, since):
                            settled = True
                            break
                        await self._wait_stop(SETTLE_POLL_S)
                    self.view.set_phase("final checks")
                    fleet.stop()
                    await devices
                    stop_controller.set()
                    await ctl
                    collector.cancel()
                    painter.cancel()
                self.view.refresh()
        except* FogmigError as group:
            raise group.exceptions[0] from None
        except* TimeoutError:
            raise FogmigError(
                f"the controller did not subscribe within {READY_TIMEOUT_S:g} s",
                hint="is the broker up? see the testbed's mosquitto.log",
            ) from None
        return settled

    # --- results ------------------------------------------------------------------------------

    def _finish(
        self,
        *,
        state: TestbedState,
        fleet: DeviceFleet,
        controller: Controller,
        started: float,
        finished: float,
        settled: bool,
    ) -> DemoSummary:
        o = self.options
        out = o.out
        devices = {d.name: d.service for d in fleet.devices}
        records: list[RequestRecord] = sorted(
            (r for d in fleet.devices for r in d.records), key=lambda r: r.sent_at
        )
        checks: list[ContinuityCheck] = [c for d in fleet.devices for c in d.checks]
        roams: list[Roam] = sorted((r for d in fleet.devices for r in d.roams), key=lambda r: r.at)
        events = self.collected.events
        decisions = decision_rows(events)
        done = list(self.collected.done.values())
        migrations = migration_rows(done, decisions, records, devices, probes=self.collected.probes)
        continuity = continuity_totals(checks, devices)
        found = problems(
            decisions=decisions,
            migrations=migrations,
            continuity=continuity,
            controller_events=events,
            interrupted=self.interrupted,
        )
        summary = DemoSummary(
            started_at=started,
            finished_at=finished,
            duration_s=round(finished - started, 3),
            profile=state.profile.describe(),
            nodes=state.node_names,
            devices=devices,
            options=o.to_dict(),
            decisions=decisions,
            migrations=migrations,
            requests=request_totals(records, checks),
            continuity=continuity,
            settled=settled,
            interrupted=self.interrupted,
            controller=controller.counters(),
            problems=found,
            ok=not found,
        )
        files = self._write_files(out, summary, done)
        write_report(
            out / "report.html",
            ReportInput(summary=summary, records=records, roams=roams, files=files),
        )
        return summary

    def _write_files(
        self, out: Path, summary: DemoSummary, done: Sequence[MigrationDone]
    ) -> dict[str, str]:
        (out / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n")
        with (out / "decisions.jsonl").open("w") as fh:
            for d in summary.decisions:
                fh.write(d.model_dump_json() + "\n")
        records = [m.record.model_dump(mode="json") for m in done]
        (out / "migrations.json").write_text(json.dumps(records, indent=2) + "\n")
        write_migrations_csv(out / "migrations.csv", summary.migrations)
        for service, timeline in self.collected.probes.items():
            write_csv(timeline, out / "probes" / f"{service}.csv")
        probes = {
            f"probes/{service}.csv": f"one row per request of {service}'s probe (monotonic times)"
            for service in sorted(self.collected.probes)
        }
        return {
            "summary.json": "this run's summary (the verdict and its reasons)",
            "decisions.jsonl": "the controller's decisions with the fate of each command",
            "controller-events.jsonl": "every controller event",
            "migrations.json": "the nodes' full migration records",
            "migrations.csv": "per migration: predicted, measured and observed figures",
            "devices/timeline.csv": "one row per device request",
            "devices/events.jsonl": "device roams, outages, continuity checks",
            "devices/summary.json": "the device simulator's own summary",
            **probes,
        }

    # --- clean-up -----------------------------------------------------------------------------

    async def _cleanup(self) -> None:
        await site.tear_down(
            self._services, agents=self._agents, testbed=self._testbed, say=self.say
        )
        self._services, self._agents, self._testbed = [], False, False


async def run_demo(options: DemoOptions, *, console: Console | None = None) -> DemoSummary:
    """Run the demo once (library entry point; no signal handling)."""
    return await Demo(options, console=console).run()
