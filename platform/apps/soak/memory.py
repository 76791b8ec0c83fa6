"""Whether the soak's processes leak: their samples over the run and a verdict per process.

The soak reads the resident memory and open descriptors of the controller and each agent every
few migrations (:class:`Sample`, following an agent's new PID after a restart);
:func:`verdicts` says per process whether they stay flat once warm or keep growing. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from fogmig.platform.base.fmt import megabytes

TARGET_SAMPLES = 20
"""Without ``--sample-every``: sample so often that a run has about this many samples."""
WARMUP_MIGRATIONS = 20
"""A process is warming up for this many migrations from its start (or its restart)..."""
WARMUP_FRACTION = 0.25
"""... and for this share of its samples, whichever covers more of them."""
MIN_JUDGED = 3
"""Samples after the warm-up below which no verdict is given (``unknown``)."""
RSS_BOUND_FRACTION = 0.05
RSS_BOUND_BYTES = 8 * 1024 * 1024
"""Flat: resident memory grows by less than the larger of these two after the warm-up."""
FDS_BOUND = 4
"""Flat: open descriptors grow by at most this many after the warm-up."""
END_SAMPLES = 3
"""Resident memory at the end is the lowest of this many last samples. A sample can land
while an agent still holds what its last migration allocated (its heap is trimmed at the next
idle moment: measured 17 MB trimmed, 22-37 MB between, from one second to the next), which
reads as several megabytes of growth once; a leak raises every sample, the lowest too."""

Verdict = Literal["flat", "growing", "unknown"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sample(_Model):
    """One process as ``/proc`` showed it after ``migration`` migrations had ended."""

    migration: int
    at: float
    """Wall-clock time of the reading (seconds since the epoch)."""
    pid: int
    rss_bytes: int | None
    open_fds: int | None
    restarted: bool = False
    """Its PID differs from the process's previous sample: it was restarted in between."""


class MemoryVerdict(_Model):
    """One process over the run: ``flat``, ``growing`` (a leak, or a warm-up longer than the
    run's) or ``unknown`` (too few samples after the warm-up). The figures are those of the
    PID the verdict rests on, after its warm-up: the first and last sample, the maximum, and
    the growth from the minimum to the lowest of the last :data:`END_SAMPLES` samples."""

    verdict: Verdict
    pid: int | None = None
    restarts: int = 0
    since_migration: int | None = None
    until_migration: int | None = None
    judged: int = 0
    """Samples of that PID after its warm-up."""
    rss_start: int | None = None
    rss_end: int | None = None
    rss_max: int | None = None
    rss_growth: int | None = None
    fds_start: int | None = None
    fds_end: int | None = None
    fds_max: int | None = None
    fds_growth: int | None = None
    detail: str = ""


def sample_every(migrations: int, asked: int | None = None) -> int:
    """Migrations between two samples: ``asked``, else about :data:`TARGET_SAMPLES` a run
    (10 for 200 migrations)."""
    if asked is not None:
        return asked
    return max(1, round(migrations / TARGET_SAMPLES))


def due(ended: int, every: int) -> bool:
    """Whether to sample after ``ended`` migrations: after the first, then every ``every``."""
    return ended == 1 or (ended > 0 and ended % every == 0)


def take(
    previous: Sample | None,
    *,
    migration: int,
    at: float,
    pid: int,
    rss_bytes: int | None,
    open_fds: int | None,
) -> Sample:
    """The next sample of a process, marked ``restarted`` when its PID changed."""
    return Sample(
        migration=migration,
        at=at,
        pid=pid,
        rss_bytes=rss_bytes,
        open_fds=open_fds,
        restarted=previous is not None and previous.pid != pid,
    )


def _lives(samples: Sequence[Sample]) -> list[tuple[int, list[Sample]]]:
    """The samples cut at each change of PID, each with the migration its process started at
    (0, or the last migration the previous PID was seen after)."""
    out: list[tuple[int, list[Sample]]] = []
    for s in samples:
        if out and out[-1][1][-1].pid == s.pid:
            out[-1][1].append(s)
        else:
            born = out[-1][1][-1].migration if out else 0
            out.append((born, [s]))
    return out


def _judge(born: int, life: list[Sample]) -> MemoryVerdict:
    warm = sum(1 for s in life if s.migration < born + WARMUP_MIGRATIONS)
    after = life[max(math.ceil(len(life) * WARMUP_FRACTION), warm) :]
    rss = [s.rss_bytes for s in after if s.rss_bytes is not None]
    fds = [s.open_fds for s in after if s.open_fds is not None]
    pid = life[0].pid
    if min(len(rss), len(fds)) < MIN_JUDGED:
        return MemoryVerdict(
            verdict="unknown",
            pid=pid,
            judged=min(len(rss), len(fds)),
            detail=f"pid {pid}: {min(len(rss), len(fds))} sample(s) after its warm-up "
            f"({WARMUP_MIGRATIONS} migrations or a quarter of its samples), "
            f"{MIN_JUDGED} needed",
        )
    rss_level = min(rss[-END_SAMPLES:])
    rss_growth = rss_level - min(rss)
    fds_growth = fds[-1] - min(fds)
    rss_bound = max(RSS_BOUND_FRACTION * min(rss), RSS_BOUND_BYTES)
    growing: list[str] = []
    if rss_growth >= rss_bound:
        growing.append(
            f"memory +{megabytes(rss_growth)} ({megabytes(min(rss))} -> {megabytes(rss_level)}, "
            f"the lowest of the last {min(END_SAMPLES, len(rss))} samples; "
            f"bound {megabytes(rss_bound)})"
        )
    if fds_growth > FDS_BOUND:
        growing.append(f"descriptors +{fds_growth} ({min(fds)} -> {fds[-1]}, bound {FDS_BOUND})")
    since, until = after[0].migration, after[-1].migration
    span = f"pid {pid}, migrations {since}-{until}"
    detail = (
        f"{span}: " + "; ".join(growing)
        if growing
        else f"{span}: {megabytes(rss[0])} -> {megabytes(rss[-1])} (max {megabytes(max(rss))}), "
        f"{fds[0]} -> {fds[-1]} fds"
    )
    return MemoryVerdict(
        verdict="growing" if growing else "flat",
        pid=pid,
        since_migration=since,
        until_migration=until,
        judged=len(after),
        rss_start=rss[0],
        rss_end=rss[-1],
        rss_max=max(rss),
        rss_growth=rss_growth,
        fds_start=fds[0],
        fds_end=fds[-1],
        fds_max=max(fds),
        fds_growth=fds_growth,
        detail=detail,
    )


def verdict(samples: Sequence[Sample]) -> MemoryVerdict:
    """One process's verdict from its samples (in the order taken).

    Each PID is judged on its own, after its own warm-up (a restart starts a new one):
    ``growing`` when any of them grew, else ``flat`` when one had enough samples to tell,
    else ``unknown``.
    """
    lives = _lives(samples)
    if not lives:
        return MemoryVerdict(verdict="unknown", detail="no sample")
    judged = [_judge(born, life) for born, life in lives]
    growing = [v for v in judged if v.verdict == "growing"]
    flat = [v for v in judged if v.verdict == "flat"]
    chosen = growing[0] if growing else flat[-1] if flat else judged[-1]
    return chosen.model_copy(update={"restarts": len(lives) - 1})


def verdicts(samples: Mapping[str, Sequence[Sample]]) -> dict[str, MemoryVerdict]:
    return {name: verdict(s) for name, s in samples.items()}


def memory_problems(found: Mapping[str, MemoryVerdict]) -> Iterable[str]:
    """A process that keeps growing after its warm-up fails the run."""
    for name, v in found.items():
        if v.verdict == "growing":
            yield f"{name} keeps growing after its warm-up: {v.detail}"
