"""What the container runtime reports: a container's state and the figures of a dump or restore.

Plain values, built from runc's JSON and CRIU's stats files; no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class ContainerState:
    """What runc reports about one container."""

    id: str
    status: str  # created, running, paused or stopped
    pid: int
    bundle: Path | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.status == "running"


def parse_state(data: dict[str, Any]) -> ContainerState:
    """One container of ``runc state`` or ``runc list --format json``."""
    bundle = data.get("bundle")
    return ContainerState(
        id=str(data["id"]),
        status=str(data.get("status", "unknown")),
        pid=int(data.get("pid") or 0),
        bundle=Path(bundle) if bundle else None,
        annotations={str(k): str(v) for k, v in (data.get("annotations") or {}).items()},
    )


def _ms(stats: dict[str, int], key: str) -> float | None:
    value = stats.get(key)
    return None if value is None else value / 1000.0


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """One finished dump: where it is, how long it took, and CRIU's own figures."""

    container: str
    image_dir: Path
    work_dir: Path
    leave_running: bool
    wall_s: float
    image_bytes: int
    stats: dict[str, int]  # stats-dump, times in microseconds

    @property
    def freezing_ms(self) -> float | None:
        return _ms(self.stats, "freezing_time_us")

    @property
    def frozen_ms(self) -> float | None:
        return _ms(self.stats, "frozen_time_us")

    @property
    def memdump_ms(self) -> float | None:
        return _ms(self.stats, "memdump_time_us")

    @property
    def memwrite_ms(self) -> float | None:
        return _ms(self.stats, "memwrite_time_us")

    @property
    def pages_written(self) -> int | None:
        return self.stats.get("pages_written")


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """One finished restore: the new init pid, timings, and CRIU's stats-restore."""

    container: str
    pid: int
    wall_s: float
    stats: dict[str, int]  # stats-restore, times in microseconds

    @property
    def restore_ms(self) -> float | None:
        return _ms(self.stats, "restore_time_us")

    @property
    def forking_ms(self) -> float | None:
        return _ms(self.stats, "forking_time_us")

    @property
    def pages_restored(self) -> int | None:
        return self.stats.get("pages_restored")
