"""The watchdog of one fence: a detached process that kills the container when the lease ends.

Started by ``fence.Fence.arm`` as ``python -P -m fogmig.platform.runtime.fence_watch FILE``; it
forks once more so that it outlives, and is never a zombie of, the agent that armed it. It
re-reads FILE every ``POLL_S`` (and wakes exactly at the deadline). Disarmed: it exits. Deadline
passed: it writes ``fired`` durably FIRST, then kills the container (``runc kill KILL``,
``runc delete --force``), then keeps watching for the grace period and kills any container of
that id that appears again (a restore may finish just after the fence fired), until the grace
period ends or the agent releases the file. SIGTERM fires an armed fence at once: a copy must
never run unguarded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from fogmig.platform.base.errors import FenceError
from fogmig.platform.base.proc import in_netns
from fogmig.platform.runtime import fence_store as store
from fogmig.platform.runtime.cgroups import bundle_cgroups_path, prune_cgroup
from fogmig.platform.runtime.fence_state import FenceRecord, FenceState, fired

POLL_S = 0.05
"""How often the file is re-read, and a late container looked for."""
RUNC_TIMEOUT_S = 10.0
"""Longest wait for one runc command."""


class Watchdog:
    """Enforces one fence file; :meth:`run` returns when there is nothing left to enforce."""

    def __init__(
        self,
        path: Path,
        *,
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = path
        """The fence file, exactly as on the command line (that is how the agent finds us)."""
        self.poll_s = poll_s
        """Re-read interval."""
        self.clock = clock
        """CLOCK_MONOTONIC, the clock of the deadlines."""
        self.sleep = sleep
        """How to wait."""
        self.stop = False
        """Set by SIGTERM: fire if armed, then leave."""
        self.boot = store.boot_id()
        """This boot's id, to compare with the record's."""
        self.pid = os.getpid()
        """Our pid, as recorded in the file."""

    def log(self, message: str) -> None:
        store.log_line(self.path.parent.parent, f"fence {self.path.stem}: {message}")

    # -- the three phases --

    def run(self) -> int:
        rec = self._claim()
        if rec is None:
            return 0
        if rec.state is FenceState.ARMED:
            rec = self._watch_armed(rec)
            if rec is None:
                return 0
        self._enforce(rec)
        return 0

    def _claim(self) -> FenceRecord | None:
        """Record our pid; None if there is nothing to watch or another watchdog watches."""
        with store.locked(self.path.parent):
            rec = store.read(self.path)
            if rec is None or rec.state is FenceState.DISARMED:
                return None
            if rec.watchdog_pid not in (None, self.pid) and store.is_watchdog(
                rec.watchdog_pid, self.path
            ):
                self.log(f"watchdog {rec.watchdog_pid} already watches; leaving")
                return None
            rec = dataclasses.replace(rec, watchdog_pid=self.pid)
            store.write(self.path, rec)
        self.log(f"watching {rec.container_id} ({rec.state}, deadline {rec.deadline:.3f})")
        return rec

    def _watch_armed(self, last: FenceRecord) -> FenceRecord | None:
        """Wait for disarm (None) or the deadline (the fired record)."""
        while True:
            try:
                rec = store.read(self.path)
            except FenceError as exc:
                return self._fire(last, f"fence file unreadable ({exc})", damaged=True)
            if rec is None:
                self.log("fence file removed while armed; leaving")
                return None
            if rec.state is FenceState.DISARMED:
                self.log("disarmed")
                return None
            if rec.state is FenceState.FIRED:
                return rec
            last = rec
            now = self.clock()
            if self.stop or rec.due(now=now, boot_id=self.boot):
                done = self._fire(rec, "watchdog stopped" if self.stop else "deadline passed")
                if done is not None:
                    return done
                continue  # disarmed or extended meanwhile: the next read tells which
            self.sleep(min(self.poll_s, max(0.0, rec.deadline - now)))

    def _fire(self, seen: FenceRecord, reason: str, *, damaged: bool = False) -> FenceRecord | None:
        """Write ``fired`` durably; None if a disarm or an extension got the lock first."""
        with store.locked(self.path.parent):
            rec: FenceRecord | None = seen
            if not damaged:
                try:
                    rec = store.read(self.path)
                except FenceError:
                    damaged = True
            if rec is None or rec.state is FenceState.DISARMED:
                return None
            now = self.clock()
            if rec.state is FenceState.ARMED and not (
                damaged or self.stop or rec.due(now=now, boot_id=self.boot)
            ):
                return None
            rec = fired(rec, now=now, reason=reason)
            store.write(self.path, rec)
        self.log(f"FIRED ({reason}), {(now - rec.deadline) * 1000:+.1f} ms from the deadline")
        return rec

    def _enforce(self, rec: FenceRecord) -> None:
        """Kill now, then kill again whatever appears under that id until the grace ends."""
        self._kill(rec)
        with store.locked(self.path.parent):
            cur = store.read(self.path)
            if cur is not None and cur.state is FenceState.FIRED and cur.killed_at is None:
                store.write(self.path, dataclasses.replace(cur, killed_at=self.clock()))
        while True:
            try:
                cur = store.read(self.path)
            except FenceError:
                cur = rec
            if self._exists(rec):
                self.log(f"container {rec.container_id} appeared after firing; killing it")
                self._kill(rec)
            if cur is None:
                self.log("released; leaving")
                return
            if self.stop:
                self.log("stopped during the grace period; leaving the record")
                return
            if cur.grace_over(now=self.clock(), boot_id=self.boot):
                with store.locked(self.path.parent):
                    store.remove(self.path)
                self.log("grace period over; removed the record")
                return
            self.sleep(self.poll_s)

    # -- runc --

    @staticmethod
    def _exists(rec: FenceRecord) -> bool:
        # runc makes <root>/<id> first thing on create or restore and removes it on delete.
        return (Path(rec.runc_root) / rec.container_id).exists()

    def _runc(self, rec: FenceRecord, *args: str) -> subprocess.CompletedProcess[str] | None:
        argv = in_netns(rec.netns, [rec.runc, "--root", rec.runc_root, *args])
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=RUNC_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.log(f"{' '.join(argv)}: {exc}")
            return None

    def _kill(self, rec: FenceRecord) -> None:
        cid = rec.container_id
        self._runc(rec, "kill", cid, "KILL")
        cgroup = None
        state = self._runc(rec, "state", cid)
        if state is not None and state.returncode == 0:
            try:
                bundle = json.loads(state.stdout).get("bundle")
            except ValueError:
                bundle = None
            cgroup = bundle_cgroups_path(Path(bundle)) if bundle else None
        done = self._runc(rec, "delete", "--force", cid)
        if done is not None and done.returncode != 0 and "does not exist" not in done.stderr:
            self.log(f"runc delete --force {cid} exited {done.returncode}: {done.stderr.strip()}")
        prune_cgroup(cgroup)
        self.log(f"killed {cid}" if not self._exists(rec) else f"{cid} still present")


def _on_term(watchdog: Watchdog) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        watchdog.stop = True

    return handler


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -P -m fogmig.platform.runtime.fence_watch FENCE_FILE", file=sys.stderr)
        return 2
    # Fork once more: the process that armed us reaps our parent at once, and we are adopted
    # by init, so we outlive the agent and never linger as its zombie.
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    watchdog = Watchdog(Path(args[0]))
    signal.signal(signal.SIGTERM, _on_term(watchdog))
    try:
        return watchdog.run()
    except FenceError as exc:
        watchdog.log(f"failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
