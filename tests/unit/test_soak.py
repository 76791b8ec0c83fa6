"""``fogmig soak`` without the testbed: its options, its seeded plan (services, devices,
migrations, restarts), its figures from the devices' records and checks, its verdict, the
reading of a process's memory and descriptors and the verdict on their samples over a run."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import pytest

from fogmig.device_sim.events import ContinuityCheck, RequestKind, RequestOutcome, RequestRecord
from fogmig.platform.apps.soak.figures import (
    ContinuityFigures,
    MigrationTotals,
    ProcessUsage,
    RequestFigures,
    continuity_figures,
    growth,
    problems,
    process_usage,
    request_figures,
    usage,
)
from fogmig.platform.apps.soak.memory import Sample, due, sample_every, take, verdict, verdicts
from fogmig.platform.apps.soak.plan import SoakOptions, plan_soak
from fogmig.platform.apps.soak.run import Soak
from fogmig.platform.base.errors import BusError, ConfigError
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Technique
from fogmig.platform.bus.client import CommandRejectedError
from fogmig.platform.bus.schemas import CommandAck, MigrateCommand, MigrationDone, NodeStatus
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.runtime.results import ContainerState
from fogmig.services.deploy import Placement

GATEWAYS = ["gw1", "gw2"]


def options(**kw: object) -> SoakOptions:
    return SoakOptions(out=Path("/tmp/soak"), **kw)  # type: ignore[arg-type]


def test_the_plan_is_seeded_and_moves_each_service_back_and_forth() -> None:
    o = options(migrations=12, devices=4, broker_restarts=2, agent_restarts=1, seed=7)
    plan = plan_soak(o, GATEWAYS, list(Technique))
    assert plan == plan_soak(o, GATEWAYS, list(Technique))
    assert plan != plan_soak(options(migrations=12, devices=4, seed=8), GATEWAYS, list(Technique))
    assert [s.name for s in plan.services] == ["k0", "k1"]
    assert {d.service for d in plan.devices} == {"k0", "k1"}
    where = {s.name: s.start for s in plan.services}
    for step in plan.steps:
        assert step.destination != where[step.service]
        where[step.service] = step.destination
    kinds = [s.disruption for s in plan.steps if s.disruption is not None]
    assert sorted(kinds) == ["agent", "broker", "broker"]
    assert plan.steps[0].disruption is None  # the first migration warms up
    [agent] = [s for s in plan.steps if s.disruption == "agent"]
    assert agent.target in GATEWAYS
    assert all(0 <= s.delay_s <= 3 for s in plan.steps)


def test_techniques_are_drawn_only_from_those_the_nodes_can_do() -> None:
    o = options(migrations=40, broker_restarts=0, agent_restarts=0)
    plan = plan_soak(o, GATEWAYS, [Technique.COLD, Technique.PRECOPY])
    assert {s.technique for s in plan.steps} == {Technique.COLD, Technique.PRECOPY}
    every = plan_soak(o, GATEWAYS, list(Technique))
    assert {s.technique for s in every.steps} == set(Technique)


@pytest.mark.parametrize(
    "bad",
    [
        {"migrations": 0},
        {"devices": 0},
        {"nodes": 1},
        {"migrations": 2, "broker_restarts": 2, "agent_restarts": 1},
        {"services": 5, "devices": 3},
        {"interval_s": 0.0},
        {"sample_every": 0},
    ],
)
def test_options_out_of_range_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        options(**bad)


def _post(device: str, seq: int, ok: bool = True) -> RequestRecord:
    return RequestRecord(
        device=device,
        request=RequestKind.POST,
        seq=seq,
        attempt=1,
        service="k0",
        gateway="gw1",
        address="10.0.0.1",
        port=5800,
        sent_at=float(seq),
        latency_s=0.01,
        outcome=RequestOutcome.OK if ok else RequestOutcome.TIMEOUT,
    )


def _check(device: str, at: float, **kw: object) -> ContinuityCheck:
    return ContinuityCheck(device, "k0", "gw1", at, "periodic", **kw)  # type: ignore[arg-type]


def test_figures_count_requests_losses_and_mismatches_per_device() -> None:
    records = [_post("d0", 1), _post("d0", 2, ok=False), _post("d1", 1)]
    checks = [
        _check("d0", 1.0, verified=True, matches=True),
        _check("d0", 2.0, verified=True, matches=False, lost=2, doubled=1, detail="gap"),
        _check("d0", 3.0, verified=True, matches=False, lost=1),
        _check("d1", 3.0, verified=False),
    ]
    r = request_figures(records, checks)
    assert (r.sent, r.acknowledged, r.failed, r.lost, r.doubled) == (3, 2, 1, 2, 1)
    c = continuity_figures(checks, ["d0", "d1"])
    assert (c.checks, c.passed, c.mismatched, c.unverified) == (4, 1, 2, 1)
    assert c.final_unverified == ["d1"]
    found = problems(MigrationTotals(asked=2, completed=1, failed=1), r, c, ["boom"])
    assert found[0] == "boom"
    assert any("failed" in p for p in found)
    assert any("lost" in p for p in found)
    assert any("twice" in p for p in found)
    assert any("d1" in p for p in found)


def test_a_clean_run_with_a_rollback_passes() -> None:
    records = [_post("d0", 1)]
    checks = [_check("d0", 1.0, verified=True, matches=True)]
    totals = MigrationTotals(asked=2, completed=1, rolled_back=1)
    found = problems(
        totals, request_figures(records, checks), continuity_figures(checks, ["d0"]), []
    )
    assert found == []


def test_usage_reads_this_process_and_growth_compares_start_and_end() -> None:
    me = usage(os.getpid())
    assert me.rss_bytes is not None
    assert me.rss_bytes > 0
    assert me.open_fds is not None
    assert me.open_fds >= 3
    gone = usage(2**22 + 17)  # beyond pid_max: no such process
    assert (gone.rss_bytes, gone.open_fds) == (None, None)
    later = me.model_copy(update={"rss_bytes": me.rss_bytes + 4096, "open_fds": me.open_fds + 1})
    restarted = later.model_copy(update={"pid": me.pid + 1})
    assert growth(
        {"x": ProcessUsage(start=me, end=later), "y": ProcessUsage(start=me, end=restarted)}
    ) == {"x": {"rss_bytes": 4096, "open_fds": 1}}


# --- the processes' samples and the verdict on them -------------------------------------------

MB = 1024 * 1024


def _series(
    rss_mb: object, fds: object, *, every: int = 10, last: int = 200, pid: object = None
) -> list[Sample]:
    """Samples after migration 1, every ``every`` and at ``last``; each figure a function of
    the migration index."""
    f_rss, f_fds = rss_mb, fds
    f_pid = pid if pid is not None else (lambda _m: 100)
    out: list[Sample] = []
    for m in [1, *range(every, last + 1, every)]:
        out.append(
            take(
                out[-1] if out else None,
                migration=m,
                at=1000.0 + m,
                pid=f_pid(m),  # type: ignore[operator]
                rss_bytes=int(f_rss(m) * MB),  # type: ignore[operator]
                open_fds=f_fds(m),  # type: ignore[operator]
            )
        )
    return out


def test_sampling_every_k_migrations_gives_about_twenty_samples() -> None:
    assert sample_every(200) == 10
    assert sample_every(6) == 1
    assert sample_every(200, 7) == 7
    assert [n for n in range(1, 31) if due(n, 10)] == [1, 10, 20, 30]
    assert len(_series(lambda _m: 90, lambda _m: 20)) == 21


def test_warm_up_growth_that_levels_off_is_flat() -> None:
    # The 200-migration run's agent: 90 -> 125 MB and 20 -> 39 fds, then level.
    samples = _series(lambda m: min(90 + m, 125), lambda m: min(20 + m, 39))
    v = verdict(samples)
    assert v.verdict == "flat", v.detail
    assert (v.since_migration, v.until_migration) == (60, 200)
    assert v.rss_start == v.rss_end == v.rss_max == 125 * MB
    assert (v.fds_start, v.fds_end, v.fds_growth) == (39, 39, 0)
    assert problems(MigrationTotals(asked=1, completed=1), _clean(), _ledgers(), [], {"a": v}) == []


def test_a_small_wobble_after_warm_up_is_flat() -> None:
    v = verdict(_series(lambda m: 125 + (m % 20) / 4, lambda m: 39 + m % 3))
    assert v.verdict == "flat", v.detail


def test_memory_growing_linearly_is_growing_and_fails_the_run() -> None:
    samples = _series(lambda m: 90 + m / 10, lambda _m: 20)  # 1 MB per 10 migrations
    found = verdicts({"agent@gw1": samples, "controller": _series(lambda _m: 84, lambda _m: 19)})
    v = found["agent@gw1"]
    assert v.verdict == "growing"
    # From the lowest after the warm-up (migration 60) to the lowest of the last three (180).
    assert v.rss_growth == int(108 * MB) - int(96 * MB)
    assert "memory" in v.detail
    assert found["controller"].verdict == "flat"
    listed = problems(MigrationTotals(asked=1, completed=1), _clean(), _ledgers(), [], found)
    assert len(listed) == 1
    assert "agent@gw1" in listed[0]


def test_a_sample_that_catches_a_migration_s_memory_is_not_growth() -> None:
    # The 200-migration soak's agent: a floor of 89-92 MB, and samples that land before the
    # heap was trimmed at 97-105 MB, the last judged one among them.
    def rss(m: int) -> float:
        return 105 if m in (70, 130, 200) else 89 + m / 100

    v = verdict(_series(rss, lambda _m: 19))
    assert v.verdict == "flat", v.detail
    assert v.rss_end == 105 * MB  # the last sample is still reported as it was
    assert v.rss_growth is not None
    assert v.rss_growth < 2 * MB


def test_a_leak_raises_the_floor_and_is_growing_despite_the_spikes() -> None:
    def rss(m: int) -> float:
        return 89 + m / 10 + (15 if m % 30 == 0 else 0)  # 1 MB per 10 migrations, spikes

    v = verdict(_series(rss, lambda _m: 19))
    assert v.verdict == "growing", v.detail


def test_descriptors_growing_is_growing() -> None:
    v = verdict(_series(lambda _m: 90, lambda m: 20 + m // 20))  # one more every 20
    assert v.verdict == "growing"
    assert v.fds_growth == 30 - 23
    assert "descriptors" in v.detail
    assert "memory" not in v.detail


def test_a_restart_starts_a_new_warm_up() -> None:
    # Flat at 125 MB, restarted after migration 100, the new agent warms up from 60 MB again.
    def rss(m: int) -> float:
        return 125 if m <= 100 or m >= 120 else 60

    def pid(m: int) -> int:
        return 100 if m <= 100 else 200

    samples = _series(rss, lambda _m: 30, pid=pid)
    assert [s.migration for s in samples if s.restarted] == [110]
    v = verdict(samples)
    assert v.verdict == "flat", v.detail
    assert (v.pid, v.restarts, v.since_migration) == (200, 1, 140)
    # The same figures from one process: its memory halved and doubled again after warm-up.
    assert verdict(_series(rss, lambda _m: 30)).verdict == "growing"
    usage_ = process_usage({"agent@gw2": samples})["agent@gw2"]
    assert usage_.start is not None
    assert usage_.end is not None
    assert (usage_.start.pid, usage_.end.pid) == (100, 200)


def test_a_process_growing_before_its_restart_is_growing() -> None:
    def pid(m: int) -> int:
        return 100 if m <= 150 else 200

    v = verdict(_series(lambda m: 90 + m / 10 if m <= 150 else 90, lambda _m: 20, pid=pid))
    assert (v.verdict, v.pid, v.restarts) == ("growing", 100, 1)


def test_too_few_samples_after_warm_up_is_unknown_not_flat() -> None:
    short = _series(lambda m: 90 + m, lambda _m: 20, every=1, last=6)  # a 6-migration run
    v = verdict(short)
    assert v.verdict == "unknown"
    assert "needed" in v.detail
    assert verdict([]).verdict == "unknown"
    unreadable = [
        s.model_copy(update={"rss_bytes": None}) for s in _series(lambda _m: 90, lambda _m: 20)
    ]
    assert verdict(unreadable).verdict == "unknown"
    # Unknown does not fail the run.
    assert problems(MigrationTotals(asked=1, completed=1), _clean(), _ledgers(), [], {"a": v}) == []


def _clean() -> RequestFigures:
    return request_figures([_post("d0", 1)], [])


def _ledgers() -> ContinuityFigures:
    return continuity_figures([_check("d0", 1.0, verified=True, matches=True)], ["d0"])


# --- how the run learns a migration's end (no testbed: a scripted bus and runc) ---------------


class _ScriptedBus:
    """Answers each request with the next of ``answers`` (an exception or an ack)."""

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.sent: list[str] = []

    async def request(self, node: str, command: object, timeout: float) -> object:
        self.sent.append(command.command_id)  # type: ignore[attr-defined]
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _soak() -> Soak:
    soak = Soak(options(migrations=2, broker_restarts=0, agent_restarts=0), say=lambda _l: None)
    soak.options = dataclasses.replace(soak.options, migration_timeout_s=5.0)
    return soak


def _status(node: str, at: float, migrating: list[str]) -> NodeStatus:
    return NodeStatus(
        node=node, online=True, at=at, load=0.1, mem_total_bytes=1, mem_free_bytes=1,
        capabilities=NodeCapabilities(criu_version="4", postcopy=True, native_predump=False),
        migrating=migrating,
    )  # fmt: skip


def _command() -> MigrateCommand:
    return MigrateCommand(
        command_id="c1", service="k0", destination="gw2", technique=Technique.COLD
    )


async def test_a_lost_acknowledgement_is_sent_again_and_a_replay_means_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    soak = _soak()
    replay = CommandAck(
        node="gw1", command_id="c1", accepted=False, reason="a replay",
        error_type="CommandReplayedError",
    )  # fmt: skip
    bus = _ScriptedBus([BusError("the broker went away"), CommandRejectedError("gw1", replay)])
    monkeypatch.setattr("fogmig.platform.apps.soak.run.asyncio.sleep", _no_sleep)
    record = MigrationRecord(
        migration_id="m1", service="k0", source="gw1", destination="gw2",
        technique=Technique.COLD, outcome=Outcome.COMPLETED,
    )  # fmt: skip
    soak._watch.done["c1"] = MigrationDone(
        node="gw1", command_id="c1", migration_id="m1", service="k0",
        outcome=Outcome.COMPLETED, record=record,
    )  # fmt: skip
    ended = await soak._command_and_wait(bus, "gw1", _command())  # type: ignore[arg-type]
    assert bus.sent == ["c1", "c1"]  # the same id both times
    assert ended.outcome is Outcome.COMPLETED
    assert not ended.learned


async def _no_sleep(_s: float) -> None:
    return None


async def test_an_end_that_went_by_unseen_is_read_from_status_and_runc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    soak = _soak()
    running = ContainerState(id="k0", status="running", pid=1)

    async def found(_name: str) -> list[Placement]:
        return [Placement("gw2", running)]

    monkeypatch.setattr("fogmig.services.deploy.find_service", found)
    monkeypatch.setattr("fogmig.platform.apps.soak.run.SETTLE_S", 0.0)
    taken = time.time()
    soak._watch.status["gw1"] = _status("gw1", taken - 1, [])  # from before: says nothing
    task = asyncio.create_task(soak._wait_end("gw1", _command(), taken))
    await asyncio.sleep(0.05)
    assert not task.done()
    soak._watch.status["gw1"] = _status("gw1", taken + 1, ["k0"])  # still under way
    soak._watch.changed.set()
    await asyncio.sleep(0.05)
    assert not task.done()
    soak._watch.status["gw1"] = _status("gw1", taken + 2, [])
    soak._watch.changed.set()
    await asyncio.sleep(0.05)
    soak._watch.changed.set()  # the settle is judged on the next wake
    ended = await asyncio.wait_for(task, 3.0)
    assert ended.outcome is Outcome.COMPLETED
    assert ended.learned


def test_the_run_samples_every_process_and_follows_a_restarted_agent() -> None:
    said: list[str] = []
    soak = Soak(options(migrations=40, agent_restarts=0, broker_restarts=0), say=said.append)
    assert soak.every == 2
    current = {"controller": os.getpid(), "agent@gw1": os.getpid()}
    soak._pids = lambda: dict(current)  # type: ignore[method-assign]
    asked: list[int] = []
    soak.ask_report = asked.append
    soak._sample(1)
    current["agent@gw1"] = os.getppid()  # killed and started again
    soak._sample(2)
    assert asked == [os.getpid(), os.getppid()]  # the agents' reports, not the controller's
    agent = soak.samples["agent@gw1"]
    assert [(s.migration, s.pid, s.restarted) for s in agent] == [
        (1, os.getpid(), False),
        (2, os.getppid(), True),
    ]
    assert all(s.rss_bytes and s.open_fds for s in agent)
    assert [s.restarted for s in soak.samples["controller"]] == [False, False]
    assert said == [f"agent@gw1: restarted (pid {os.getpid()} -> {os.getppid()})"]


def test_the_samples_table_has_a_row_per_sampling_and_marks_a_restart() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from fogmig.platform.cli.soak import _samples_table

    def pid(m: int) -> int:
        return 100 if m <= 10 else 200

    summary = SimpleNamespace(
        sample_every=10,
        samples={
            "agent@gw1": _series(lambda _m: 90, lambda _m: 20, last=30, pid=pid),
            "controller": _series(lambda _m: 84, lambda _m: 19, last=30),
        },
    )
    table = _samples_table(summary)
    assert table.row_count == 4
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "restarted, pid 200" in text
    assert "94.4 MB, 20 fds" in text
