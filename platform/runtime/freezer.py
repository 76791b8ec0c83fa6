"""Freezing a container's cgroup ahead of CRIU, so that the dump does not sleep.

CRIU freezes the container's cgroup itself before a dump, then reads the freezer's state once
and, if the tasks are not frozen yet (they rarely are at the first look), sleeps 100 ms before
it looks again (``freeze_processes`` in CRIU's seize.c, a fixed step). The service is frozen
all that time: measured here on a 75 MB service, ``runc checkpoint --leave-running`` took
0.30-0.34 s with a ``freezing_time`` of 100.9 ms in 3 dumps of 4, and 0.20-0.21 s with the
cgroup frozen first (freezing done in 0.4-1.5 ms, polled every half millisecond;
CRIU's ``freezing_time`` then 0.3 ms).

A cgroup that is frozen when CRIU starts is recorded as frozen, and CRIU freezes it again
after a dump that leaves the container running; whoever froze it thaws it (see
:meth:`NodeRuntime.checkpoint <fogmig.platform.runtime.container.NodeRuntime.checkpoint>`).

Both cgroup versions: v1's ``freezer`` hierarchy (``freezer.state``) and v2's unified one
(``cgroup.freeze``, with ``cgroup.events`` saying ``frozen 1`` once done).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fogmig.platform.runtime.cgroups import CGROUP_ROOT

log = logging.getLogger(__name__)

POLL_S = 0.0005
"""How often a freeze in progress is looked at (the freeze itself takes about a millisecond)."""
FREEZE_TIMEOUT_S = 1.0
"""A cgroup not frozen by then is thawed again and CRIU freezes it its own way."""


@dataclass(frozen=True, slots=True)
class CgroupFreezer:
    """The freezer of one cgroup, v1 (``freezer.state``) or v2 (``cgroup.freeze``)."""

    path: Path
    """The cgroup's directory in the freezer's hierarchy."""
    v2: bool

    @classmethod
    def of(cls, cgroups_path: str | None, *, root: Path = CGROUP_ROOT) -> CgroupFreezer | None:
        """The freezer of a container's ``linux.cgroupsPath``, or None when there is none to
        use (no path, or no freezer file where the cgroup should be)."""
        if not cgroups_path or not cgroups_path.startswith("/"):
            return None
        rel = cgroups_path.lstrip("/")
        v1 = root / "freezer" / rel
        if (v1 / "freezer.state").is_file():
            return cls(v1, v2=False)
        for unified in (root / rel, root / "unified" / rel):
            if (unified / "cgroup.freeze").is_file():
                return cls(unified, v2=True)
        return None

    def frozen(self) -> bool:
        """True once every task of the cgroup is frozen."""
        if self.v2:
            events = (self.path / "cgroup.events").read_text().split()
            return "frozen" in events and events[events.index("frozen") + 1] == "1"
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def _write(self, frozen: bool) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    async def freeze(self, timeout_s: float = FREEZE_TIMEOUT_S) -> float | None:
        """Freeze the cgroup and wait until it is; the seconds it took, or None if it was not
        frozen within ``timeout_s`` (then it is thawed again)."""
        t0 = time.monotonic()
        self._write(True)
        while not self.frozen():
            if time.monotonic() - t0 > timeout_s:
                self.thaw()
                log.warning(
                    "%s did not freeze within %.1f s; thawed, CRIU freezes it itself",
                    self.path,
                    timeout_s,
                )
                return None
            await asyncio.sleep(POLL_S)
        return time.monotonic() - t0

    def thaw(self) -> None:
        """Let the cgroup's tasks run again (nothing happens if they already run)."""
        self._write(False)
