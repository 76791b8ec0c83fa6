"""What a ``fogmig soak`` run reports, and its verdict.

:class:`SoakSummary` (the ``--json`` output): migrations asked and how they ended, the
devices' requests (sent, acknowledged, lost, doubled) and the continuity checks of their
ledgers against the services' state, the restarts, and the resident memory and open file
descriptors of the controller and the agents, sampled over the run, with a verdict per process
(``memory``). :func:`usage` reads those from ``/proc``; the rest is computed from values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fogmig.device_sim.events import ContinuityCheck, RequestKind, RequestRecord
from fogmig.platform.apps.soak.memory import MemoryVerdict, Sample, memory_problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Model):
    """One process as ``/proc`` showed it."""

    pid: int
    rss_bytes: int | None
    open_fds: int | None


class ProcessUsage(_Model):
    start: Usage | None = None
    end: Usage | None = None


class MigrationTotals(_Model):
    asked: int = 0
    completed: int = 0
    rolled_back: int = 0
    failed: int = 0
    """Ended ``failed_after_commit``, refused by the agent, or with no end seen in time."""
    learned: int = 0
    """Ends not seen as a MigrationDone (published while the bus was away) but read from the
    source's status and where the service runs."""
    by_technique: dict[str, int] = {}


class RequestFigures(_Model):
    sent: int
    acknowledged: int
    failed: int
    lost: int
    """Readings acknowledged to a device that its service does not hold (all devices)."""
    doubled: int
    """Readings its service applied twice (all devices)."""


class ContinuityFigures(_Model):
    checks: int
    passed: int
    mismatched: int
    unverified: int
    final_unverified: list[str]
    """Devices whose last check could not read the service's state."""
    failures: list[str]


class SoakSummary(_Model):
    started_at: float
    finished_at: float
    duration_s: float
    options: dict[str, Any]
    techniques: list[str]
    migrations: MigrationTotals
    requests: RequestFigures
    continuity: ContinuityFigures
    restarts: dict[str, int]
    processes: dict[str, ProcessUsage]
    """``controller`` and ``agent@<node>`` -> their usage after the first migration (all
    warm) and after the last."""
    growth: dict[str, dict[str, int | None]]
    """Per process not restarted during the run: how much its memory and descriptors grew
    from the start to the end."""
    sample_every: int
    """Migrations between two samples."""
    samples: dict[str, list[Sample]]
    """Per process: its memory and descriptors after the first migration, every
    ``sample_every`` migrations, and at the end."""
    memory: dict[str, MemoryVerdict]
    """Per process: ``flat``, ``growing`` or ``unknown`` after its warm-up."""
    errors: list[str]
    problems: list[str]
    ok: bool


def usage(pid: int, proc: Path = Path("/proc")) -> Usage:
    """Resident memory and open descriptors of ``pid`` (``None`` where it cannot be read)."""
    rss: int | None = None
    fds: int | None = None
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        rss = None
    try:
        fds = len(os.listdir(proc / str(pid) / "fd"))
    except OSError:
        fds = None
    return Usage(pid=pid, rss_bytes=rss, open_fds=fds)


def request_figures(
    records: Iterable[RequestRecord], checks: Iterable[ContinuityCheck]
) -> RequestFigures:
    """The readings posted, and per device the worst loss and doubling its checks found."""
    posts = [r for r in records if r.request is RequestKind.POST]
    ok = sum(1 for r in posts if r.ok)
    lost: dict[str, int] = {}
    doubled: dict[str, int] = {}
    for c in checks:
        if c.verified:
            lost[c.device] = max(lost.get(c.device, 0), c.lost)
            doubled[c.device] = max(doubled.get(c.device, 0), c.doubled)
    return RequestFigures(
        sent=len(posts),
        acknowledged=ok,
        failed=len(posts) - ok,
        lost=sum(lost.values()),
        doubled=sum(doubled.values()),
    )


def continuity_figures(
    checks: Iterable[ContinuityCheck], devices: Iterable[str]
) -> ContinuityFigures:
    ordered = sorted(checks, key=lambda c: c.at)
    last: dict[str, ContinuityCheck] = {}
    for c in ordered:
        last[c.device] = c
    verified = [c for c in ordered if c.verified]
    bad = [c for c in verified if not c.matches]
    return ContinuityFigures(
        checks=len(ordered),
        passed=len(verified) - len(bad),
        mismatched=len(bad),
        unverified=len(ordered) - len(verified),
        final_unverified=sorted(d for d in devices if d not in last or not last[d].verified),
        failures=[
            f"{c.device}@{c.gateway} ({c.reason}): {c.detail or 'mismatch'}; expected "
            f"{c.expected_count}, service {c.service_count}, lost {c.lost}, doubled {c.doubled}"
            for c in bad
        ][:50],
    )


def problems(
    migrations: MigrationTotals,
    requests: RequestFigures,
    continuity: ContinuityFigures,
    errors: Iterable[str],
    memory: Mapping[str, MemoryVerdict] | None = None,
) -> list[str]:
    """Why the run fails (empty: it passes): anything lost, doubled or mismatched, a failed
    migration, a device whose final check could not verify, a process whose memory or
    descriptors kept growing after its warm-up, or an error of the run itself. A migration
    rolled back is no failure: the service kept running where it was."""
    out = list(errors)
    if migrations.failed:
        out.append(f"{migrations.failed} migration(s) failed")
    if migrations.completed == 0:
        out.append("no migration completed")
    if requests.lost:
        out.append(f"{requests.lost} acknowledged reading(s) lost")
    if requests.doubled:
        out.append(f"{requests.doubled} reading(s) applied twice")
    if continuity.mismatched:
        out.append(f"{continuity.mismatched} continuity check(s) found a mismatch")
    if continuity.final_unverified:
        out.append(
            f"the final check of {', '.join(continuity.final_unverified)} could not read "
            "the service's state"
        )
    out.extend(memory_problems(memory or {}))
    return out


def growth(processes: Mapping[str, ProcessUsage]) -> dict[str, dict[str, int | None]]:
    """Per process: how much its memory and descriptors grew from the start to the end (not
    for a process restarted in between: its end is another process)."""
    out: dict[str, dict[str, int | None]] = {}
    for name, p in processes.items():
        if p.start is None or p.end is None or p.start.pid != p.end.pid:
            continue
        out[name] = {
            "rss_bytes": None
            if p.start.rss_bytes is None or p.end.rss_bytes is None
            else p.end.rss_bytes - p.start.rss_bytes,
            "open_fds": None
            if p.start.open_fds is None or p.end.open_fds is None
            else p.end.open_fds - p.start.open_fds,
        }
    return out


def process_usage(samples: Mapping[str, Sequence[Sample]]) -> dict[str, ProcessUsage]:
    """Per process: its first sample (after the first migration) and its last (``start`` is
    ``None`` when there is only one)."""
    out: dict[str, ProcessUsage] = {}
    for name, taken in samples.items():
        if not taken:
            continue
        first, last = taken[0], taken[-1]
        out[name] = ProcessUsage(start=_usage(first) if len(taken) > 1 else None, end=_usage(last))
    return out


def _usage(s: Sample) -> Usage:
    return Usage(pid=s.pid, rss_bytes=s.rss_bytes, open_fds=s.open_fds)
