"""The fence of a migrating service's copy at the destination: a lease that outlives the agent.

Before the destination restores a migrating service it arms a fence with a deadline; each
ticketed call extends it; commit disarms it. When the deadline passes, a watchdog process
(``fence_watch``, one per armed fence, detached from the agent) records ``fired`` and kills the
container, and keeps killing any container of that id for a grace period. A fence that fired
can never be disarmed or extended. Deadlines are ``time.monotonic()`` seconds (CLOCK_MONOTONIC,
the same in every process of the machine). See docs/fence.md.

The calls are blocking but short (a locked file update with fsync); ``arm`` waits for its
watchdog to start (60-70 ms, an interpreter starting) unless told to let the caller confirm it
later, and ``disarm``/``release`` for it to leave, so an asyncio caller runs those in a thread
(``asyncio.to_thread``). The destination arms without waiting and confirms the watchdog once
its restore has run: the start-up overlaps the restore instead of adding to the downtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fogmig.platform.base.errors import FenceError
from fogmig.platform.runtime import fence_state, fence_store
from fogmig.platform.runtime.fence_state import FenceRecord, FenceState

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
"""Longest wait for a new watchdog to record itself."""
LEAVE_TIMEOUT_S = 2.0
"""Longest wait for a watchdog to leave after disarm or release."""
DEFAULT_GRACE_S = 600.0
"""How long a fired fence keeps killing a late container unless released earlier."""


def _wait_gone(pid: int | None, path: Path, timeout: float) -> bool:
    """Wait until ``pid`` is no longer the watchdog of ``path``; True if it left."""
    deadline = time.monotonic() + timeout
    while fence_store.is_watchdog(pid, path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class FenceHandle:
    """One migration's fence on one node, as seen by its agent (or a restarted one)."""

    def __init__(self, *, node: str, migration_id: str) -> None:
        self.node = node
        """The node whose runtime holds the copy."""
        self.migration_id = migration_id
        """The migration the fence guards."""
        self.path = fence_store.fence_path(node, migration_id)
        """The fence file."""
        self._final: FenceState | None = None
        self._launcher: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"FenceHandle(node={self.node!r}, migration_id={self.migration_id!r})"

    # -- reading --

    def record(self) -> FenceRecord:
        """The fence's current record; :class:`FenceError` if its file is gone."""
        rec = fence_store.read(self.path)
        if rec is None:
            raise FenceError(f"no fence for migration {self.migration_id} on {self.node}")
        return rec

    def state(self) -> FenceState:
        """Armed, disarmed or fired.

        Once this handle has disarmed or released the fence, its last state stays known after
        the file is gone; otherwise a missing file is a :class:`FenceError`.
        """
        rec = fence_store.read(self.path)
        if rec is not None:
            return rec.state
        if self._final is not None:
            return self._final
        raise FenceError(f"no fence for migration {self.migration_id} on {self.node}")

    def watchdog_pid(self) -> int | None:
        """The pid of the live watchdog of this fence, if one runs."""
        rec = fence_store.read(self.path)
        pid = rec.watchdog_pid if rec is not None else None
        return pid if fence_store.is_watchdog(pid, self.path) else None

    # -- changing --

    def _update(self, change: Callable[[FenceRecord, float, str], FenceRecord]) -> FenceRecord:
        """Apply ``change(record, now, boot_id)`` under the lock and write what changed."""
        with fence_store.locked(self.path.parent):
            rec = self.record()
            new = change(rec, time.monotonic(), fence_store.boot_id())
            if new != rec:
                fence_store.write(self.path, new)
        return new

    def extend(self, deadline: float) -> float:
        """Push the deadline to ``deadline`` (monotonic seconds); return the deadline in force.

        A lease never shrinks: an earlier ``deadline`` changes nothing. Raises
        :class:`FenceFiredError` once the fence fired or its deadline has passed, and
        :class:`FenceError` if it was disarmed.
        """
        new = self._update(
            lambda rec, now, boot: fence_state.extended(rec, deadline, now=now, boot_id=boot)
        )
        return new.deadline

    def disarm(self, *, timeout: float = LEAVE_TIMEOUT_S) -> None:
        """The copy is owned: stop the fence for good and remove its file.

        Raises :class:`FenceFiredError` if the fence fired or its deadline passed (the copy is
        dead or about to be). Idempotent once it succeeded. Returns after the watchdog left.
        """
        if self._final is FenceState.DISARMED and not self.path.exists():
            return
        rec = self._update(lambda rec, now, boot: fence_state.disarmed(rec, now=now, boot_id=boot))
        self._final = FenceState.DISARMED
        self._leave(rec, timeout)

    def fire(self) -> None:
        """Fire now (the agent gives the copy up); the watchdog kills it within its poll."""
        self._update(
            lambda rec, now, _: fence_state.fired(rec, now=now, reason="fired by the agent")
        )

    def wait_killed(self, timeout: float = 30.0) -> FenceRecord:
        """Wait until a fired fence's watchdog has done its first kill; return the record."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.record()
            if rec.state is FenceState.FIRED and rec.killed_at is not None:
                return rec
            if rec.state is FenceState.DISARMED:
                raise FenceError(f"fence of {self.migration_id} is disarmed, not fired")
            if time.monotonic() >= deadline:
                raise FenceError(
                    f"fence of {self.migration_id} did not kill {rec.container_id} "
                    f"within {timeout} s ({rec.state})"
                )
            time.sleep(0.01)

    def release(self, *, timeout: float = LEAVE_TIMEOUT_S) -> None:
        """Drop a fired (or disarmed) fence before its grace period ends.

        Call it only when no restore of this migration can still be running: the watchdog
        makes one last check for the container, then leaves. An armed fence is refused.
        """
        with fence_store.locked(self.path.parent):
            rec = fence_store.read(self.path)
            if rec is None:
                return
            if rec.state is FenceState.ARMED:
                raise FenceError(
                    f"fence of {self.migration_id} is armed: disarm or fire it before release"
                )
            fence_store.remove(self.path)
        self._final = rec.state
        self._leave(rec, timeout)

    def _leave(self, rec: FenceRecord, timeout: float) -> None:
        """Wait for the watchdog to go, then make sure the file is gone (disarmed) too."""
        if not _wait_gone(rec.watchdog_pid, self.path, timeout):
            pid = rec.watchdog_pid
            log.warning("watchdog %s of %s did not leave; killing it", pid, self.migration_id)
            if pid is not None and fence_store.is_watchdog(pid, self.path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, self.path, timeout)
        if rec.state is FenceState.DISARMED:
            with fence_store.locked(self.path.parent):
                cur = fence_store.read(self.path)
                if cur is not None and cur.state is FenceState.DISARMED:
                    fence_store.remove(self.path)

    # -- the watchdog --

    def start_watchdog(self, *, timeout: float = START_TIMEOUT_S) -> int | None:
        """Start the watchdog if none runs; return its pid once it has recorded itself.

        None if the fence is gone or disarmed meanwhile (nothing to watch).
        """
        pid = self.watchdog_pid()
        if pid is not None:
            return pid
        self.launch_watchdog()
        return self.confirm_watchdog(timeout=timeout)

    def launch_watchdog(self) -> None:
        """Start a watchdog without waiting for it; :meth:`confirm_watchdog` waits.

        A watchdog takes 60-70 ms to start (an interpreter and its imports): a caller with
        other work to do meanwhile launches it first and confirms later.
        """
        argv = fence_store.watch_argv(sys.executable, self.path)
        log.debug("start: %s", " ".join(argv))
        # It forks again and its first process exits at once (see fence_watch.main): reaping
        # that one leaves no zombie; its own session keeps it clear of the agent's signals.
        self._launcher = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )

    def confirm_watchdog(self, *, timeout: float = START_TIMEOUT_S) -> int | None:
        """Wait until the launched watchdog has recorded itself; its pid.

        None if the fence is gone or disarmed meanwhile; :class:`FenceError` if no watchdog
        records itself within ``timeout``.
        """
        launcher, self._launcher = self._launcher, None
        argv = fence_store.watch_argv(sys.executable, self.path)
        node_dir = fence_store.node_run_dir(self.node)
        deadline = time.monotonic() + timeout
        try:
            if launcher is not None:
                launcher.wait(timeout)
            while True:
                rec = fence_store.read(self.path)
                if rec is None or rec.state is FenceState.DISARMED:
                    return None
                if fence_store.is_watchdog(rec.watchdog_pid, self.path):
                    assert rec.watchdog_pid is not None
                    fence_store.log_line(node_dir, f"fence {self.migration_id}: started")
                    return rec.watchdog_pid
                if time.monotonic() >= deadline:
                    raise FenceError(
                        f"the watchdog of fence {self.migration_id} did not start in {timeout} s",
                        hint=f"run `{' '.join(argv)}` by hand to see why",
                    )
                time.sleep(0.005)
        except subprocess.TimeoutExpired as exc:
            raise FenceError(
                f"the watchdog of fence {self.migration_id} did not start in {timeout} s",
                hint=f"run `{' '.join(argv)}` by hand to see why",
            ) from exc
        finally:
            # Still our unreaped child, so its pid is still its own. A watchdog that starts
            # after we gave up finds no file (the caller removes it) and leaves by itself.
            if launcher is not None and launcher.poll() is None:
                launcher.kill()
                launcher.wait()


class Fence:
    """Arming, finding and recovering the fences of a node."""

    @staticmethod
    def arm(
        *,
        node: str,
        container_id: str,
        runc_root: Path,
        migration_id: str,
        deadline: float,
        grace_s: float = DEFAULT_GRACE_S,
        netns: str | None = None,
        runc: str = "runc",
        confirm: bool = True,
    ) -> FenceHandle:
        """Arm a fence for ``container_id`` until ``deadline`` (``time.monotonic()`` seconds).

        Returns once the watchdog watches; with ``confirm=False`` as soon as the armed record
        is on disk and the watchdog launched, and the caller calls
        :meth:`FenceHandle.confirm_watchdog` before it relies on the watchdog (a restore
        overlaps the watchdog's start-up this way). ``netns`` is the node's namespace when the
        caller runs outside it (runc is then run under ``nsenter --net``). Raises
        :class:`FenceFiredError` for a deadline already past, and :class:`FenceError` if a
        fence of that migration exists on the node (in any state) or the watchdog cannot start.
        """
        runc_path = shutil.which(runc) or runc
        handle = FenceHandle(node=node, migration_id=migration_id)
        rec = fence_state.new_record(
            migration_id=migration_id,
            node=node,
            container_id=container_id,
            runc_root=str(Path(os.path.abspath(runc_root))),
            runc=runc_path,
            netns=netns,
            deadline=deadline,
            grace_s=grace_s,
            now=time.monotonic(),
            boot_id=fence_store.boot_id(),
        )
        with fence_store.locked(handle.path.parent):
            old = fence_store.read(handle.path)
            if old is not None:
                raise FenceError(
                    f"a fence of migration {migration_id} exists on {node} ({old.state})",
                    hint="a fence is armed once per migration; find it with Fence.find",
                )
            fence_store.write(handle.path, rec)
        try:
            handle.launch_watchdog()
            pid = handle.confirm_watchdog() if confirm else None
            if confirm and pid is None:
                raise FenceError(f"the fence of {migration_id} vanished while it was armed")
        except (FenceError, OSError):
            with fence_store.locked(handle.path.parent):
                fence_store.remove(handle.path)
            raise
        log.info(
            "armed fence of %s on %s for %s, %.3f s ahead (watchdog %s)",
            migration_id,
            node,
            container_id,
            deadline - time.monotonic(),
            pid if confirm else "starting",
        )
        return handle

    @staticmethod
    def find(node: str, migration_id: str) -> FenceHandle | None:
        """The fence of ``migration_id`` on ``node``, if its file exists."""
        handle = FenceHandle(node=node, migration_id=migration_id)
        return handle if handle.path.exists() else None

    @staticmethod
    def records(node: str) -> list[FenceRecord]:
        """Every fence of ``node`` with its state, without changing anything."""
        out = []
        for path in fence_store.listing(fence_store.fence_dir(node)):
            rec = fence_store.read(path)
            if rec is not None:
                out.append(rec)
        return out

    @staticmethod
    def recover(node: str) -> list[FenceHandle]:
        """Re-attach after an agent restart: a handle per fence of ``node``.

        An armed or fired fence whose watchdog is gone gets a new one (an armed fence past its
        deadline then fires at once); a disarmed leftover, which the agent that disarmed it
        died before removing, is removed.
        """
        handles = []
        for rec in Fence.records(node):
            handle = FenceHandle(node=node, migration_id=rec.migration_id)
            if rec.state is FenceState.DISARMED:
                handle._final = FenceState.DISARMED
                handle._leave(rec, LEAVE_TIMEOUT_S)
            elif handle.watchdog_pid() is None:
                log.warning(
                    "fence of %s on %s has no watchdog; starting one", rec.migration_id, node
                )
                handle.start_watchdog()
            handles.append(handle)
        return handles
