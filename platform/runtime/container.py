"""The container runtime of one fog node: runc and CRIU behind one typed asyncio interface.

Everything docs/platform.md says about options, network locks, logs and mounts lives here once:
every command runs under ``nsenter --net=<node netns>``; restore-only CRIU options reach CRIU
through the destination bundle's ``org.criu.config`` file and are kept away from dumps; no
CRIU network lock survives a dump.

Log levels: INFO for each container operation and its timing, DEBUG for every command run.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import shutil
import signal as signal_module
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fogmig.platform.base.errors import (
    ContainerNotFoundError,
    CriuError,
    RuntimeToolError,
)
from fogmig.platform.base.proc import Completed, in_netns, run
from fogmig.platform.runtime import bundle as bundle_mod
from fogmig.platform.runtime.cgroups import bundle_cgroups_path, prune_cgroup
from fogmig.platform.runtime.criu_logs import DUMP_LOG, RESTORE_LOG, criu_error, read_log
from fogmig.platform.runtime.freezer import CgroupFreezer
from fogmig.platform.runtime.image import read_stats
from fogmig.platform.runtime.results import (
    CheckpointResult,
    ContainerState,
    RestoreResult,
    parse_state,
)
from fogmig.platform.runtime.workdir import WorkdirError, unmount_below

log = logging.getLogger(__name__)

RUNC_LOG = "runc.log"
PARKED_SUFFIX = ".parked"
CRIU_LOCK_CHAIN = "CRIU"


def _tree_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def _criu_config(state: ContainerState) -> Path | None:
    """The CRIU config file the container's ``org.criu.config`` annotation names."""
    value = state.annotations.get(bundle_mod.CRIU_CONFIG_ANNOTATION)
    return Path(value) if value else None


def _absolute(*paths: Path, create: bool = False) -> tuple[Path, ...]:
    # runc resolves relative image and work paths against its own working directory.
    out = tuple(Path(os.path.abspath(p)) for p in paths)
    if create:
        for p in out:
            p.mkdir(parents=True, exist_ok=True)
    return out


def _park(path: Path | None) -> Path | None:
    """Move a restore-only CRIU config aside for a dump; return where it went."""
    if path is None or not path.exists():
        return None
    parked = path.with_name(path.name + PARKED_SUFFIX)
    os.replace(path, parked)
    return parked


def _unpark(parked: Path | None) -> None:
    if parked is not None and parked.exists():
        os.replace(parked, parked.with_name(parked.name.removesuffix(PARKED_SUFFIX)))


async def _prefreeze(freezer: CgroupFreezer | None) -> bool:
    """Freeze a container's cgroup before its dump; False if there is no freezer to use or it
    failed (CRIU then freezes the cgroup itself, as it always can)."""
    if freezer is None:
        return False
    try:
        return await freezer.freeze() is not None
    except OSError as exc:
        log.warning("could not freeze %s ahead of the dump: %s", freezer.path, exc)
        with contextlib.suppress(OSError):
            freezer.thaw()
        return False


def runc_running(runc_root: Path, cid: str, verb: str) -> bool:
    """Whether ``runc ... <verb> ... <cid>`` under ``runc_root`` runs on this machine.

    An agent killed during a checkpoint or a restore leaves runc (and CRIU) running; a
    restarted agent waits for them before it judges what the runtime holds.
    """
    root = str(runc_root)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if verb in words and cid in words and root in words:
            return True
    return False


# ---- the runtime -----------------------------------------------------------------------------


class NodeRuntime:
    """runc and CRIU for the containers of one node.

    ``netns`` is the node's network namespace name (``/var/run/netns/<netns>``); every command
    runs inside it. ``runc_root`` keeps this node's containers apart from other nodes' on the
    same machine.
    """

    def __init__(
        self,
        *,
        node: str,
        netns: str | None,
        runc_root: Path,
        criu: str = "criu",
        runc: str = "runc",
    ) -> None:
        self.node = node
        self.netns = netns
        self.runc_root = runc_root
        self.criu = criu
        self.runc = runc

    def __repr__(self) -> str:
        return f"NodeRuntime(node={self.node!r}, netns={self.netns!r})"

    # -- plumbing --

    def _runc_argv(self, *args: str, log_file: Path | None = None) -> list[str]:
        argv = [self.runc, "--root", str(self.runc_root), "--criu", self.criu]
        if log_file is not None:
            argv += ["--log", str(log_file)]
        return [*argv, *args]

    async def _runc(
        self, *args: str, check: bool = True, timeout: float = 60.0, what: str | None = None
    ) -> Completed:
        self.runc_root.mkdir(parents=True, exist_ok=True)
        return await run(
            self._runc_argv(*args), netns=self.netns, check=check, timeout=timeout, what=what
        )

    async def _run_detached_stdio(
        self, argv: list[str], *, timeout: float
    ) -> tuple[int, list[str]]:
        """Run a runc command whose container inherits its stdio: give it /dev/null.

        A container's stdio must not be a pipe or file of ours: CRIU cannot dump fds that
        point outside the container (docs/platform.md), and a pipe would never reach EOF.
        """
        full = in_netns(self.netns, argv)
        log.debug("run: %s", " ".join(full))
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for the CLI never reaches the container, and a
            # timeout can stop runc, CRIU and a half-restored task together.
            start_new_session=True,
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal_module.SIGKILL)
            await proc.wait()
            raise
        return rc, full

    # -- container lifecycle --

    async def run(self, cid: str, bundle: Path, *, timeout: float = 60.0) -> ContainerState:
        """Create and start ``cid`` from ``bundle``, detached, stdio on /dev/null."""
        (bundle,) = _absolute(bundle)
        self.runc_root.mkdir(parents=True, exist_ok=True)
        runc_log = bundle / RUNC_LOG
        runc_log.unlink(missing_ok=True)
        argv = self._runc_argv("run", "--detach", "--bundle", str(bundle), cid, log_file=runc_log)
        try:
            rc, full = await self._run_detached_stdio(argv, timeout=timeout)
        except TimeoutError as exc:
            raise RuntimeToolError(
                f"runc run {cid} timed out", cmd=argv, returncode=None, log_path=runc_log
            ) from exc
        if rc != 0:
            raise RuntimeToolError(
                f"cannot start container {cid} on {self.node}",
                cmd=full,
                returncode=rc,
                stderr=read_log(runc_log),
                log_path=runc_log,
            )
        state = await self.state(cid)
        log.info("started %s on %s (pid %d)", cid, self.node, state.pid)
        return state

    async def state(self, cid: str) -> ContainerState:
        """The container's status and init pid; :class:`ContainerNotFoundError` if absent."""
        done = await self._runc("state", cid, check=False, what=f"runc state {cid}")
        if done.returncode != 0:
            if "does not exist" in done.stderr:
                raise ContainerNotFoundError(f"no container {cid!r} on node {self.node}")
            raise RuntimeToolError(
                f"runc state {cid}", cmd=done.argv, returncode=done.returncode, stderr=done.stderr
            )
        return parse_state(json.loads(done.stdout))

    async def exists(self, cid: str) -> bool:
        try:
            await self.state(cid)
        except ContainerNotFoundError:
            return False
        return True

    async def list(self) -> list[ContainerState]:
        """Every container of this node (any status)."""
        if not self.runc_root.exists():
            return []
        done = await self._runc("list", "--format", "json", what="runc list")
        data = json.loads(done.stdout or "null") or []
        return [parse_state(item) for item in data]

    async def kill(self, cid: str, sig: str | int = "TERM") -> None:
        """Send a signal to the container's init process."""
        signame = sig if isinstance(sig, str) else signal_module.Signals(sig).name
        done = await self._runc("kill", cid, signame.removeprefix("SIG"), check=False)
        if done.returncode != 0:
            if "does not exist" in done.stderr:
                raise ContainerNotFoundError(f"no container {cid!r} on node {self.node}")
            if "not running" in done.stderr:
                return
            raise RuntimeToolError(
                f"runc kill {cid}", cmd=done.argv, returncode=done.returncode, stderr=done.stderr
            )

    async def resume(self, cid: str) -> None:
        """Thaw a paused container (a dump that died mid-way can leave it frozen)."""
        await self._runc("resume", cid, what=f"runc resume {cid}")
        log.info("resumed %s on %s", cid, self.node)

    async def delete(self, cid: str, *, force: bool = False) -> None:
        """Delete the container (``force`` kills it first if it still runs)."""
        cgroup = bundle_cgroups_path((await self.state(cid)).bundle)
        args = ["delete", *(["--force"] if force else []), cid]
        done = await self._runc(*args, check=False)
        if done.returncode != 0:
            if "does not exist" in done.stderr:
                raise ContainerNotFoundError(f"no container {cid!r} on node {self.node}")
            raise RuntimeToolError(
                f"runc delete {cid}", cmd=done.argv, returncode=done.returncode, stderr=done.stderr
            )
        prune_cgroup(cgroup)

    async def stop(self, cid: str, *, grace: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then delete by force. Absent is fine."""
        try:
            await self.kill(cid, "TERM")
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if (await self.state(cid)).status == "stopped":
                    break
                await asyncio.sleep(0.05)
            await self.delete(cid, force=True)
        except ContainerNotFoundError:
            return
        log.info("stopped %s on %s", cid, self.node)

    # -- CRIU config per operation --

    @staticmethod
    def _prepare_restore_config(bundle: Path) -> None:
        """Make sure the bundle's CRIU config holds the restore-only options right now."""
        path = bundle_mod.criu_config_path(bundle_mod.read_config(bundle))
        if path is None:
            return
        parked = path.with_name(path.name + PARKED_SUFFIX)
        parked.unlink(missing_ok=True)  # a dump that crashed may have left it parked
        path.write_text(bundle_mod.restore_conf_text())

    @contextlib.asynccontextmanager
    async def _dumping(self, state: ContainerState) -> AsyncIterator[Path | None]:
        # The dump refuses restore-only options ("only valid on restore"), and runc hands
        # CRIU the file that the container's annotation names: keep it aside meanwhile.
        parked = _park(_criu_config(state))
        try:
            yield parked
        finally:
            await self.remove_network_lock()
            _unpark(parked)

    # -- network locks --

    async def remove_network_lock(self) -> bool:
        """Remove CRIU's network-lock chain from this node if a dump left it; True if found.

        Under ``nsenter --net`` CRIU treats the node's namespace as its own and does not lock
        it, but a lock left behind would cut the whole node off: never leave one.
        """
        found = False
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is None:
                continue
            probe = await run([tool, "-w", "-S", CRIU_LOCK_CHAIN], netns=self.netns, check=False)
            if probe.returncode != 0:
                continue
            found = True
            for hook in ("INPUT", "OUTPUT"):
                for _ in range(16):  # one jump per lock taken; never loop forever
                    rm = await run(
                        [tool, "-w", "-D", hook, "-j", CRIU_LOCK_CHAIN],
                        netns=self.netns,
                        check=False,
                    )
                    if rm.returncode != 0:
                        break
            await run([tool, "-w", "-F", CRIU_LOCK_CHAIN], netns=self.netns, check=False)
            await run([tool, "-w", "-X", CRIU_LOCK_CHAIN], netns=self.netns, what="iptables -X")
        if found:
            log.warning("removed a CRIU network lock left in node %s", self.node)
        return found

    # -- checkpoint --

    async def checkpoint(
        self,
        cid: str,
        *,
        image_dir: Path,
        work_dir: Path,
        leave_running: bool = False,
        timeout: float = 300.0,
    ) -> CheckpointResult:
        """Dump ``cid`` into ``image_dir`` (kills it unless ``leave_running``)."""
        image_dir, work_dir = _absolute(image_dir, work_dir, create=True)
        args = ["checkpoint", "--image-path", str(image_dir), "--work-path", str(work_dir)]
        if leave_running:
            args.append("--leave-running")
        state = await self.state(cid)
        freezer = CgroupFreezer.of(bundle_cgroups_path(state.bundle))
        async with self._dumping(state):
            t0 = time.monotonic()
            # Frozen here, CRIU finds the tasks frozen and skips its 100 ms wait (freezer.py).
            prefrozen = await _prefreeze(freezer)
            try:
                done = await self._runc(*args, cid, check=False, timeout=timeout)
            finally:
                # CRIU froze a container it found frozen again after a dump that left it
                # running (or that failed): it runs on, so thaw what was frozen here.
                if freezer is not None and prefrozen:
                    with contextlib.suppress(OSError):  # gone with a container that was dumped
                        freezer.thaw()
            wall = time.monotonic() - t0
        if done.returncode != 0:
            raise criu_error(
                f"checkpoint of {cid} on {self.node} failed",
                cmd=done.argv,
                returncode=done.returncode,
                stderr=done.stderr,
                log_path=work_dir / DUMP_LOG,
            )
        if not leave_running:
            prune_cgroup(bundle_cgroups_path(state.bundle))
        result = CheckpointResult(
            cid,
            image_dir,
            work_dir,
            leave_running,
            wall,
            _tree_bytes(image_dir),
            read_stats(work_dir / "stats-dump"),
        )
        log.info(
            "checkpoint of %s on %s: %.3f s, freezing %s ms (frozen first: %s), frozen %s ms, "
            "%s pages",
            cid,
            self.node,
            wall,
            result.freezing_ms,
            prefrozen,
            result.frozen_ms,
            result.pages_written,
        )
        return result

    # -- restore --

    async def cleanup_failed_restore(self, cid: str, bundle: Path, work_dir: Path) -> None:
        """After a failed restore: no half-made container or cgroup, nothing mounted."""
        with contextlib.suppress(ContainerNotFoundError, RuntimeToolError):
            await self.delete(cid, force=True)
        prune_cgroup(bundle_cgroups_path(bundle))
        try:
            unmount_below(work_dir)
        except WorkdirError as exc:
            log.error("%s", exc)

    async def restore(
        self,
        cid: str,
        *,
        bundle: Path,
        image_dir: Path,
        work_dir: Path,
        timeout: float = 120.0,
        lazy_pages: bool = False,
    ) -> RestoreResult:
        """Restore ``cid`` from ``image_dir`` into this node, detached.

        With ``lazy_pages`` the memory comes from a lazy-pages daemon that the caller started
        on the same ``work_dir`` (fogmig's own page server feeds it, see migration.lazy.server).
        """
        argv, image_dir, work_dir = self._restore_argv(
            cid, bundle, image_dir, work_dir, lazy=lazy_pages
        )
        if await self.exists(cid):
            raise RuntimeToolError(
                f"cannot restore {cid} on {self.node}: a container of that name exists",
                cmd=argv,
                returncode=None,
                hint=f"delete it first (runc --root {self.runc_root} delete {cid})",
            )
        t0 = time.monotonic()
        try:
            rc, full = await self._run_detached_stdio(argv, timeout=timeout)
        except TimeoutError as exc:
            await self.cleanup_failed_restore(cid, bundle, work_dir)
            raise CriuError(
                f"restore of {cid} timed out after {timeout} s",
                cmd=argv,
                returncode=None,
                log_path=work_dir / RESTORE_LOG,
            ) from exc
        wall = time.monotonic() - t0
        if rc != 0:
            await self.cleanup_failed_restore(cid, bundle, work_dir)
            raise criu_error(
                f"restore of {cid} on {self.node} failed",
                cmd=full,
                returncode=rc,
                stderr=read_log(work_dir / RUNC_LOG),
                log_path=work_dir / RESTORE_LOG,
            )
        state = await self.state(cid)
        self._never_frozen(cid, state)
        result = RestoreResult(cid, state.pid, wall, read_stats(work_dir / "stats-restore"))
        log.info("restored %s on %s in %.3f s (pid %d)", cid, self.node, wall, state.pid)
        return result

    def _never_frozen(self, cid: str, state: ContainerState) -> None:
        # A dump of a cgroup frozen first records it as frozen (freezer.py); runc restores it
        # thawed here, but a restored service left frozen would be down with nothing to say so.
        freezer = CgroupFreezer.of(bundle_cgroups_path(state.bundle))
        try:
            if freezer is not None and freezer.frozen():
                freezer.thaw()
                log.warning("restored %s on %s was frozen; thawed", cid, self.node)
        except OSError as exc:
            log.warning("restored %s on %s: its freezer could not be read: %s", cid, self.node, exc)

    def _restore_argv(
        self, cid: str, bundle: Path, image_dir: Path, work_dir: Path, *, lazy: bool
    ) -> tuple[builtins.list[str], Path, Path]:
        bundle, image_dir, work_dir = _absolute(bundle, image_dir, work_dir)
        if not (image_dir / "inventory.img").exists():
            raise CriuError(
                f"no checkpoint image in {image_dir} (inventory.img missing)",
                cmd=["runc", "restore"],
                returncode=None,
            )
        work_dir.mkdir(parents=True, exist_ok=True)
        self.runc_root.mkdir(parents=True, exist_ok=True)
        self._prepare_restore_config(bundle)
        runc_log = work_dir / RUNC_LOG
        runc_log.unlink(missing_ok=True)
        args = ["restore", "--detach", "--image-path", str(image_dir)]
        args += ["--work-path", str(work_dir), "--bundle", str(bundle)]
        if lazy:
            args.append("--lazy-pages")
        return self._runc_argv(*args, cid, log_file=runc_log), image_dir, work_dir
