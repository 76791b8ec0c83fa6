"""``fogmig soak``: a long run of migrations on the embedded testbed, checked for loss.

It brings up the testbed and its agents (the demo's pieces, ``apps/demo/site``), deploys the
plan's services, starts ``fogmig controller`` as a process of its own, and runs the devices in
the device host's namespace: they post readings through the gateways they roam between and
keep a ledger of what each service acknowledged. Meanwhile it migrates the services back and
forth, one at a time, by techniques drawn from the seeded plan, and restarts the broker and
agents (by PID) at the plan's moments. At the end every device checks its service's state
against its ledger, and the summary counts migrations, requests, losses, doublings,
mismatches, and samples the processes' memory and descriptors every few migrations
(``apps/soak/memory``: flat or growing). It always cleans up what it started.

Log levels: INFO each migration's end and each restart; WARNING a migration that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fogmig.device_sim.device import DeviceConfig, RequestSettings
from fogmig.device_sim.fleet import DeviceFleet
from fogmig.platform.apps.demo import site
from fogmig.platform.apps.soak.figures import (
    MigrationTotals,
    SoakSummary,
    continuity_figures,
    growth,
    problems,
    process_usage,
    request_figures,
    usage,
)
from fogmig.platform.apps.soak.memory import Sample, due, sample_every, take, verdicts
from fogmig.platform.apps.soak.plan import SoakOptions, SoakPlan, Step, plan_soak
from fogmig.platform.base.errors import BusError, FogmigError
from fogmig.platform.base.heap import LOOK_INTERVAL_S
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.bus.client import Bus, CommandRejectedError
from fogmig.platform.bus.schemas import MigrateCommand, MigrationDone, NodeStatus
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.access import open_testbed_bus
from fogmig.platform.testbed.state import TestbedState
from fogmig.services.deploy import Deployment, ServiceSpec

log = logging.getLogger(__name__)

SEND_ATTEMPTS = 4
"""A command whose acknowledgement a broker restart swallowed goes again under its own id
(refused as a replay when it was taken the first time)."""
ACK_TIMEOUT_S = 15.0
SETTLE_S = 2.0
"""After a source's status shows a migration over, the wait before reading where the service
runs: its MigrationDone, when the bus carries it, comes first."""

SETTLE_DEVICES_S = 30.0
QUIET_S = LOOK_INTERVAL_S + 1.0
"""Wait before a sample: the agents have given the last migration's memory back by then."""
"""After the last migration: how long the devices may take to be answered again."""

Say = Callable[[str], None]


@dataclass(slots=True)
class _Watch:
    """What the soak hears on the bus: the ends of migrations and the nodes' status."""

    done: dict[str, MigrationDone] = field(default_factory=dict)
    """Command id -> its MigrationDone."""
    status: dict[str, NodeStatus] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Ended:
    outcome: Outcome | None
    """``None``: refused by the agent, or no end seen in time."""
    learned: bool = False
    detail: str = ""


class Soak:
    """One soak run: ``summary = await Soak(options, say=...).run()``."""

    def __init__(
        self,
        options: SoakOptions,
        *,
        say: Say,
        on_step: Callable[[int, str], None] | None = None,
        techniques: list[Technique] | None = None,
    ) -> None:
        self.options = options
        self.say = say
        self.on_step = on_step or (lambda _n, _line: None)
        self.techniques = techniques
        self.totals = MigrationTotals()
        self.restarts: dict[str, int] = {"broker": 0, "agent": 0}
        self.every = sample_every(options.migrations, options.sample_every)
        """Migrations between two samples of the processes."""
        self.samples: dict[str, list[Sample]] = {}
        self.errors: list[str] = []
        self._services: list[str] = []
        self._testbed = False
        self._controller: int | None = None
        self._watch = _Watch()
        self._where: dict[str, str] = {}
        self.interrupted = False
        self.plan: SoakPlan | None = None
        """The run's services, devices and migrations (drawn once the testbed is up)."""
        self.deployments: list[Deployment] = []
        self.ask_report: Callable[[int], None] = _ask_memory_report
        """Asks an agent (by PID) to log what its memory is made of, at every sample."""

    def interrupt(self) -> None:
        """End the run after the migration under way (the final checks and clean-up still run)."""
        if not self.interrupted:
            self.say("interrupted: ending after the migration under way")
        self.interrupted = True

    async def run(self) -> SoakSummary:
        started = time.time()
        try:
            state, plan = await self._setup()
            fleet = await self._run(state, plan)
        finally:
            await self._cleanup()
        finished = time.time()
        records = [r for d in fleet.devices for r in d.records]
        checks = [c for d in fleet.devices for c in d.checks]
        requests = request_figures(records, checks)
        continuity = continuity_figures(checks, [d.name for d in fleet.devices])
        memory = verdicts(self.samples)
        found = problems(self.totals, requests, continuity, self.errors, memory)
        processes = process_usage(self.samples)
        return SoakSummary(
            started_at=started,
            finished_at=finished,
            duration_s=round(finished - started, 3),
            options=self.options.to_dict(),
            techniques=[t.value for t in self.techniques or []],
            migrations=self.totals,
            requests=requests,
            continuity=continuity,
            restarts=self.restarts,
            processes=processes,
            growth=growth(processes),
            sample_every=self.every,
            samples=self.samples,
            memory=memory,
            errors=self.errors,
            problems=found,
            ok=not found,
        )

    # --- set-up --------------------------------------------------------------------------------

    async def _setup(self) -> tuple[TestbedState, SoakPlan]:
        from fogmig.platform.runtime.capabilities import criu_capabilities

        o = self.options
        if self.techniques is None:
            lazy = criu_capabilities().postcopy
            self.techniques = [t for t in Technique if lazy or not t.lazy]
            if not lazy:
                self.say("no userfaultfd here: post-copy and hybrid are left out")

        def up() -> None:
            self._testbed = True

        state = await site.bring_up(o.profile, o.nodes, say=self.say, what="the soak", on_up=up)
        plan = self.plan = plan_soak(o, state.node_names, self.techniques)
        self._services = [s.name for s in plan.services]
        self.say(
            f"deploying {', '.join(f'{s.name} on {s.start}' for s in plan.services)} "
            f"({o.state_mb} MB state, {o.dirty_kbps:g} KB/s dirtied)"
        )
        self.deployments = await site.deploy_services(
            [
                (
                    ServiceSpec(
                        name=s.name, state_mb=o.state_mb, dirty_kbps=o.dirty_kbps, port=s.port
                    ),
                    s.start,
                )
                for s in plan.services
            ]
        )
        self._where = {s.name: s.start for s in plan.services}
        # Announced as the controller principal before the controller runs: the broker keeps
        # one connection per principal, and the soak itself speaks as the operator.
        async with open_testbed_bus("controller") as bus:
            await site.announce(bus, state, self.deployments)
        self._controller = self._start_controller()
        return state, plan

    def _start_controller(self) -> int:
        """``fogmig controller`` as its own process: the soak reads its memory and descriptors.
        Without attachments from the devices it only follows the nodes (the soak commands the
        migrations itself), and a load threshold out of reach keeps it from moving services."""
        from fogmig.platform.testbed import pids

        out = self.options.out
        argv = [
            sys.executable,
            "-P",
            "-m",
            "fogmig.platform.cli.main",
            "controller",
            "--load-threshold",
            "1000000",
            "--decision-log",
            str(out / "controller-events.jsonl"),
            "--state-file",
            str(out / "controller-state.json"),
        ]
        pid = pids.spawn_detached(argv, log_path=out / "controller.log")
        self.say(f"controller: pid {pid}")
        return pid

    # --- the run -------------------------------------------------------------------------------

    async def _run(self, state: TestbedState, plan: SoakPlan) -> DeviceFleet:
        o = self.options
        fleet = DeviceFleet(
            devices=[
                DeviceConfig(
                    name=d.name, service=d.service, port=d.port, gateway=d.start, roaming=d.roaming
                )
                for d in plan.devices
            ],
            gateways={n.name: n.data_ip for n in state.nodes},
            buses=None,  # no attachments: the controller must not move the services itself
            out=o.out / "devices",
            settings=RequestSettings(interval_s=o.interval_s, check_every_s=30.0),
            netns=state.device_host.netns,
            seed=o.seed,
        )
        try:
            async with (
                open_testbed_bus("operator") as bus,
                asyncio.TaskGroup() as tg,
            ):
                listeners = [
                    tg.create_task(self._listen(bus, topics.events())),
                    tg.create_task(self._listen(bus, topics.status())),
                ]
                running = tg.create_task(fleet.run(None), name="soak:devices")
                try:
                    await self._migrate_all(bus, plan, fleet)
                    await self._settle(fleet)
                finally:
                    if not self.interrupted:
                        await asyncio.sleep(QUIET_S)
                    self._sample(self.totals.asked)
                    fleet.stop()
                    await running
                    for task in listeners:
                        task.cancel()
        except* FogmigError as group:
            raise group.exceptions[0] from None
        return fleet

    async def _settle(self, fleet: DeviceFleet) -> None:
        """Before the final checks: every device's readings are answered again."""
        since = time.time()
        deadline = time.monotonic() + SETTLE_DEVICES_S
        while not site.answered_since(fleet, since):
            if time.monotonic() > deadline:
                self.say(f"devices not all answered within {SETTLE_DEVICES_S:g} s; checking")
                return
            await asyncio.sleep(0.25)

    async def _listen(self, bus: Bus, pattern: str) -> None:
        watch = self._watch
        async with bus.subscribe(pattern) as sub:
            async for _, msg in sub:
                if isinstance(msg, MigrationDone):
                    watch.done.setdefault(msg.command_id, msg)
                elif isinstance(msg, NodeStatus):
                    known = watch.status.get(msg.node)
                    if known is None or msg.at >= known.at:
                        watch.status[msg.node] = msg
                else:
                    continue
                watch.changed.set()

    async def _migrate_all(self, bus: Bus, plan: SoakPlan, fleet: DeviceFleet) -> None:
        for step in plan.steps:
            if self.interrupted:
                self.errors.append(f"interrupted after {step.index} migration(s)")
                return
            ended = await self._migrate(bus, step)
            # After the first migration every process has done its part once.
            if due(step.index + 1, self.every) and step.index + 1 < len(plan.steps):
                # At rest: an agent gives a migration's buffers back once idle (base/heap.py);
                # read right after the migration, the figures would be those of the burst.
                await asyncio.sleep(QUIET_S)
                self._sample(step.index + 1)
            if ended.outcome is Outcome.COMPLETED:
                for device in fleet.devices:
                    if device.service == step.service:
                        device.migration_seen()
            await asyncio.sleep(self.options.pause_s)

    async def _migrate(self, bus: Bus, step: Step) -> _Ended:
        source = self._where[step.service]
        gateways = sorted(self._watch.status) or [step.destination]
        destination = step.destination
        if destination == source:  # an earlier migration of this service rolled back
            destination = next((g for g in gateways if g != source), step.destination)
        command = MigrateCommand(
            command_id=uuid.uuid4().hex[:12],
            service=step.service,
            destination=destination,
            technique=step.technique,
            reason=f"soak {step.index + 1}/{self.options.migrations}",
        )
        self.totals.asked += 1
        by = self.totals.by_technique
        by[step.technique.value] = by.get(step.technique.value, 0) + 1
        what = f"{step.service} {source} -> {destination} by {step.technique.value}"
        disruption = None
        if step.disruption is not None:
            disruption = asyncio.create_task(self._disrupt(step))
        try:
            ended = await self._command_and_wait(bus, source, command)
        finally:
            if disruption is not None:
                await disruption
        self._count(ended, what)
        if ended.outcome is Outcome.COMPLETED:
            self._where[step.service] = destination
        elif ended.outcome is not Outcome.ROLLED_BACK:
            await self._locate(step.service)
        line = f"{step.index + 1}/{self.options.migrations} {what}: " + (
            ended.outcome.value if ended.outcome is not None else "failed"
        )
        if ended.learned:
            line += " (from status)"
        if ended.detail:
            line += f"; {ended.detail}"
        self.on_step(step.index + 1, line)
        return ended

    def _count(self, ended: _Ended, what: str) -> None:
        t = self.totals
        t.learned += int(ended.learned)
        if ended.outcome is Outcome.COMPLETED:
            t.completed += 1
        elif ended.outcome is Outcome.ROLLED_BACK:
            t.rolled_back += 1
        else:
            t.failed += 1
            outcome = ended.outcome.value if ended.outcome is not None else "no end"
            self.errors.append(f"{what}: {outcome}: {ended.detail}")
            log.warning("soak: %s failed: %s", what, ended.detail)

    async def _command_and_wait(self, bus: Bus, source: str, command: MigrateCommand) -> _Ended:
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                await bus.request(source, command, ACK_TIMEOUT_S)
                break
            except CommandRejectedError as exc:
                if exc.ack.error_type == "CommandReplayedError":
                    break  # taken the first time: its answer was lost to a restart
                return _Ended(None, detail=f"refused: {exc.ack.reason}")
            except BusError as exc:
                if attempt == SEND_ATTEMPTS:
                    return _Ended(None, detail=f"no answer from {source}: {exc}")
                await asyncio.sleep(2.0)
        return await self._wait_end(source, command, time.time())

    async def _wait_end(self, source: str, command: MigrateCommand, taken: float) -> _Ended:
        """Its MigrationDone, or (when that went by while the bus was away) the source's
        status, stamped after the command was taken, no longer migrating it."""
        from fogmig.services.deploy import find_service

        watch = self._watch
        deadline = time.monotonic() + self.options.migration_timeout_s
        over_since: float | None = None
        while time.monotonic() < deadline:
            done = watch.done.get(command.command_id)
            if done is not None:
                return _Ended(done.outcome, detail=done.error or "")
            status = watch.status.get(source)
            over = (
                status is not None
                and status.online
                and status.at > taken
                and command.service not in status.migrating
            )
            if not over:
                over_since = None
            elif over_since is None:
                over_since = time.monotonic()
            elif time.monotonic() - over_since >= SETTLE_S:
                running = [
                    p.node for p in await find_service(command.service) if p.container.running
                ]
                if running == [command.destination]:
                    return _Ended(Outcome.COMPLETED, learned=True)
                if running == [source]:
                    return _Ended(Outcome.ROLLED_BACK, learned=True)
                return _Ended(None, learned=True, detail=f"runs on {running or 'no node'}")
            watch.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.changed.wait(), 1.0)
        return _Ended(None, detail=f"no end within {self.options.migration_timeout_s:g} s")

    async def _locate(self, service: str) -> None:
        """After an end that does not say where the service is: ask runc on every node."""
        from fogmig.services.deploy import find_service

        try:
            running = [p.node for p in await find_service(service) if p.container.running]
        except FogmigError as exc:
            self.errors.append(f"where {service} runs is unknown: {exc}")
            return
        if len(running) == 1:
            self._where[service] = running[0]
        else:
            self.errors.append(f"{service} runs on {running or 'no node'}")

    # --- disruptions ---------------------------------------------------------------------------

    async def _disrupt(self, step: Step) -> None:
        await asyncio.sleep(step.delay_s)
        try:
            if step.disruption == "broker":
                from fogmig.platform.testbed.broker import restart_broker

                pid = await restart_broker()
                self.say(
                    f"broker restarted {step.delay_s:g} s into migration {step.index + 1} "
                    f"(pid {pid})"
                )
                self.restarts["broker"] += 1
            elif step.disruption == "agent" and step.target is not None:
                await self._restart_agent(step.target)
                self.say(
                    f"agent of {step.target} killed and restarted {step.delay_s:g} s into "
                    f"migration {step.index + 1}"
                )
                self.restarts["agent"] += 1
        except FogmigError as exc:
            self.errors.append(f"restart of the {step.disruption} failed: {exc}")

    async def _restart_agent(self, node: str) -> None:
        """SIGKILL the agent of ``node`` by its recorded PID, then start it again."""
        from fogmig.platform.agent.launcher import agents_dir, agents_up
        from fogmig.platform.testbed import pids

        pid = pids.read_pidfile(agents_dir() / f"{node}.pid")
        if pid is None or not pids.is_ours(pid, ("agent", node)):
            raise FogmigError(f"no agent of {node} to restart")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await pids.wait_gone(pid, 10.0)
        await agents_up(timeout=60.0)

    # --- figures -------------------------------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        from fogmig.platform.agent.launcher import agents_dir
        from fogmig.platform.testbed import pids

        out: dict[str, int] = {}
        if self._controller is not None:
            out["controller"] = self._controller
        for pidfile in sorted(agents_dir().glob("*.pid")):
            pid = pids.read_pidfile(pidfile)
            if pid is not None:
                out[f"agent@{pidfile.stem}"] = pid
        return out

    def _sample(self, ended: int) -> None:
        """Every process's memory and descriptors after ``ended`` migrations (an agent's PID
        read again each time: a restarted agent is followed)."""
        at = time.time()
        for name, pid in self._pids().items():
            seen = usage(pid)
            if name.startswith("agent@"):
                self.ask_report(pid)
            taken = self.samples.setdefault(name, [])
            sample = take(
                taken[-1] if taken else None,
                migration=ended,
                at=at,
                pid=pid,
                rss_bytes=seen.rss_bytes,
                open_fds=seen.open_fds,
            )
            if sample.restarted:
                self.say(f"{name}: restarted (pid {taken[-1].pid} -> {pid})")
            taken.append(sample)

    # --- clean-up ------------------------------------------------------------------------------

    async def _cleanup(self) -> None:
        from fogmig.platform.testbed import pids

        if self._controller is not None:
            if not await pids.stop_process(self._controller, ("controller",), grace=10.0):
                self.errors.append("the controller had exited before the end of the run")
            self._controller = None
        await site.tear_down(
            self._services, agents=self._testbed, testbed=self._testbed, say=self.say
        )
        self._services, self._testbed = [], False


def write_summary(path: Path, summary: SoakSummary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary.model_dump_json(indent=2) + "\n")


def _ask_memory_report(pid: int) -> None:
    # The agent logs what its memory is made of (base/memreport.py): its log then tells a leak
    # (objects and bytes in use grow) from memory the allocator keeps.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR2)
