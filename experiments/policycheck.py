"""The policy check on the testbed: measure every technique at every point, fit, validate.

One testbed of two fog nodes is brought up once; before each point its data links are reshaped
to the point's rate and RTT and the sensor service is deployed with the point's state and dirty
rate, then each technique moves it (alternating direction) ``runs`` times. Each record is saved
as ``records/<point>/<technique>-<run>.json`` at once, so ``resume`` skips what was measured.
The constants are then fitted on the fit points' records and the policy and the model judged on
the held-out points (``policycheck_score``); ``policycheck_report`` writes the results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogmig.experiments.policycheck_fit import Calibration, calibrate, load_records
from fogmig.experiments.policycheck_points import Point, Role, split
from fogmig.experiments.policycheck_report import write_outputs
from fogmig.experiments.policycheck_score import PointResult, Verdict, score_all, verdict
from fogmig.platform.base.errors import ConfigError, FogmigError
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Technique
from fogmig.platform.migration.record import MigrationRecord

Say = Callable[[str], None]

RECORDS = "records"
PLAN = "plan.json"


@dataclass(slots=True, kw_only=True)
class CheckPlan:
    """What to measure and where the results go."""

    out: Path
    points: tuple[Point, ...]
    techniques: tuple[Technique, ...] = tuple(Technique)
    runs: int = 3
    quick: bool = False
    resume: bool = False
    score_only: bool = False
    """Judge the records saved so far without measuring (implies ``resume``)."""
    service: str = "pcheck"
    port: int = 5691
    nodes: tuple[str, str] = ("gw1", "gw2")
    extra: dict[str, Any] = field(default_factory=dict)

    def record_path(self, point: Point, technique: Technique, run: int) -> Path:
        return self.out / RECORDS / point.name / f"{technique.value}-{run}.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [p.to_dict() for p in self.points],
            "techniques": [t.value for t in self.techniques],
            "runs": self.runs,
            "quick": self.quick,
            "service": self.service,
        }


def prepare_out(plan: CheckPlan) -> None:
    """Create the output folder; refuse to mix a new run into an old one unless resuming the
    same plan."""
    plan.out.mkdir(parents=True, exist_ok=True)
    plan_file = plan.out / PLAN
    old = list((plan.out / RECORDS).rglob("*.json")) if (plan.out / RECORDS).exists() else []
    if old and not (plan.resume or plan.score_only):
        raise ConfigError(
            f"{plan.out} already holds {len(old)} records",
            hint="add --resume to continue that run, or give another --out",
        )
    if (plan.resume or plan.score_only) and plan_file.exists():
        before = json.loads(plan_file.read_text())
        mine = plan.to_dict()
        if before.get("points") != mine["points"] or before.get("techniques") != mine["techniques"]:
            raise ConfigError(
                f"{plan.out} was measured with other points or techniques",
                hint="resume with the same options (--quick or not), or give another --out",
            )
    plan_file.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")


def missing_runs(plan: CheckPlan, point: Point) -> list[tuple[Technique, int]]:
    """The (technique, run) of ``point`` that have no saved record yet."""
    return [
        (t, run)
        for t in plan.techniques
        for run in range(1, plan.runs + 1)
        if not plan.record_path(point, t, run).exists()
    ]


async def measure(plan: CheckPlan, say: Say) -> None:
    """Run every missing migration of the plan on the testbed (holding its lease)."""
    from fogmig.platform.agent.launcher import agents_down, agents_up
    from fogmig.platform.testbed import lifecycle
    from fogmig.platform.testbed.state import exclusive_use

    todo = [p for p in plan.points if missing_runs(plan, p)]
    if not todo:
        say("every migration of the plan is measured already")
        return
    with exclusive_use(timeout=3600):
        await lifecycle.down()  # leftovers of an earlier, interrupted run
        await lifecycle.up(todo[0].profile(), 2, progress=lambda m: say(f"  testbed: {m}"))
        try:
            # the agents' own link probes would share the link with the measured migrations
            await agents_up(link_probe_interval_s=0)
            for point in todo:
                await _measure_point(plan, point, say)
        finally:
            await agents_down()
            await lifecycle.down()


async def _shape_links(point: Point) -> None:
    from fogmig.platform.testbed.links import set_link
    from fogmig.platform.testbed.state import load_state

    for link in load_state().links:
        await set_link(link.a, link.b, rate_mbit=point.rate_mbit, rtt_ms=point.rtt_ms)


async def _measure_point(plan: CheckPlan, point: Point, say: Say) -> None:
    from fogmig.platform.agent.remote import request_migration
    from fogmig.services.deploy import ServiceSpec, deploy, undeploy

    say(
        f"point {point.name} ({point.role.value}): {point.state_mb} MiB, "
        f"{point.rate_mbit:g} Mbit/s, {point.rtt_ms:g} ms, {point.dirty_kbps:g} KB/s "
        f"- {point.note}"
    )
    await _shape_links(point)
    spec = ServiceSpec(
        name=plan.service, state_mb=point.state_mb, dirty_kbps=point.dirty_kbps, port=plan.port
    )
    here, there = plan.nodes
    await deploy(spec, node=here)
    try:
        for technique, run in missing_runs(plan, point):
            started = time.monotonic()
            try:
                record = await request_migration(plan.service, there, technique)
            except FogmigError as exc:
                # No record came back: where the service runs now is unknown, so the point's
                # remaining runs wait for a --resume.
                say(f"  {technique.value} #{run}: {here} -> {there} gave no record: {exc}")
                break
            record.link_rate_bit_per_s = point.rate_mbit * 1e6
            record.link_rtt_s = point.rtt_ms / 1000
            record.dirty_rate_bytes_per_s = point.dirty_rate_bytes_per_s
            path = plan.record_path(point, technique, run)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(record.to_json())
            say(
                f"  {technique.value} #{run}: {here} -> {there} {record.outcome.value}, "
                f"total {record.total_time_s:.2f} s, downtime {record.downtime_s:.2f} s "
                f"(wall {time.monotonic() - started:.1f} s)"
            )
            if record.outcome is Outcome.COMPLETED:
                here, there = there, here
    finally:
        await undeploy(plan.service)


def saved_records(plan: CheckPlan) -> dict[str, list[tuple[Path, MigrationRecord]]]:
    """The records of each point measured so far, with their files."""
    out: dict[str, list[tuple[Path, MigrationRecord]]] = {}
    for p in plan.points:
        folder = plan.out / RECORDS / p.name
        if folder.exists():
            out[p.name] = load_records([folder]).records
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """What the check found: the fit, every point judged, and the goals on each role."""

    calibration: Calibration
    results: list[PointResult]
    held_out: Verdict
    fitted_on: Verdict
    files: dict[str, Path]


def evaluate(plan: CheckPlan, caps: NodeCapabilities) -> CheckResult:
    """Fit on the fit points' records, judge every point, write the outputs."""
    fit_points, _ = split(plan.points)
    saved = saved_records(plan)
    fit_records: list[tuple[Path | None, MigrationRecord]] = [
        item for p in fit_points for item in saved.get(p.name, [])
    ]
    cal = calibrate(fit_records, native_predump=caps.native_predump)
    records = {name: [r for _, r in items] for name, items in saved.items() if items}
    # a point not measured yet (an interrupted run scored as it is) is left out, not a miss
    measured_points = [p for p in plan.points if p.name in records]
    results = score_all(
        measured_points, records, constants=cal.constants, caps=caps, techniques=plan.techniques
    )
    held, fitted = verdict(results, Role.VALIDATE), verdict(results, Role.FIT)
    files = write_outputs(
        plan.out,
        plan=plan.to_dict(),
        caps=caps,
        calibration=cal,
        saved=saved,
        results=results,
        verdicts=(held, fitted),
    )
    return CheckResult(
        calibration=cal, results=results, held_out=held, fitted_on=fitted, files=files
    )


def node_capabilities() -> NodeCapabilities:
    """What this machine's CRIU can do (both testbed nodes share it)."""
    from fogmig.platform.runtime.capabilities import criu_capabilities

    c = criu_capabilities()
    return NodeCapabilities(postcopy=c.postcopy, native_predump=c.native_predump)


async def run_check(plan: CheckPlan, say: Say) -> CheckResult:
    """Measure what is missing, then fit and validate."""
    split(plan.points)
    caps = node_capabilities()
    techniques = tuple(t for t in plan.techniques if caps.postcopy or not t.lazy)
    if techniques != plan.techniques:
        say("this machine has no lazy restore: post-copy and hybrid are left out")
        plan.techniques = techniques
    prepare_out(plan)
    if plan.score_only:
        left = sum(len(missing_runs(plan, p)) for p in plan.points)
        say(f"scoring what is saved; {left} migration(s) of the plan are not measured")
    else:
        await measure(plan, say)
    return evaluate(plan, caps)


def summary_lines(result: CheckResult) -> Sequence[str]:
    return [*result.held_out.lines(), *result.fitted_on.lines()]
