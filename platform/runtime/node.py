"""The container runtime of one fog node: runc and CRIU behind one typed asyncio interface.

Everything PLATFORM-NOTES.md says about options, network locks, logs and mounts lives here once:
every command runs under ``nsenter --net=<node netns>``; restore-only CRIU options reach CRIU
through the destination bundle's ``org.criu.config`` file and are kept away from dumps; no
CRIU network lock survives a dump; a lazy migration is judged by the destination only.

Log levels: INFO for each container operation and its timing, DEBUG for every command run.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import shutil
import signal as signal_module
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fogmig.platform.base.errors import (
    ConfigError,
    ContainerNotFoundError,
    CriuError,
    RuntimeToolError,
)
from fogmig.platform.base.proc import Completed, in_netns, run
from fogmig.platform.runtime import bundle as bundle_mod
from fogmig.platform.runtime.capabilities import ensure_pipe_sysctls
from fogmig.platform.runtime.image import read_stats
from fogmig.platform.runtime.workdir import WorkdirError, unmount_below

log = logging.getLogger(__name__)

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
LAZY_PAGES_LOG = "lazy-pages.log"
LAZY_PAGES_SOCKET = "lazy-pages.socket"
RUNC_LOG = "runc.log"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PARKED_SUFFIX = ".parked"
CRIU_LOCK_CHAIN = "CRIU"
# Logged by every CRIU run here (no CAP_SYS_RESOURCE) and harmless: never the explanation.
HARMLESS_ERRORS = ("rlimit: Can't setup RLIMIT_NOFILE",)
UFFD_PAGES = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")
LOG_PREFIX = re.compile(r"^\(\s*[\d.]+\)\s*")
LOG_TIME = re.compile(r"^\(\s*([\d.]+)\)")


# ---- results ---------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class LazyDumpResult:
    """How the source side of a lazy migration ended. NOT proof of success (see LazyResult).

    No CRIU stats here: a lazy dump's stats-dump holds zeros and a meaningless frozen time;
    ``ready_s`` (start to images written and page server up) is the figure that counts.
    """

    container: str
    returncode: int
    ready_s: float | None
    wall_s: float  # CRIU's run time by its own log clock


@dataclass(frozen=True, slots=True)
class LazyResult:
    """The destination's verdict on a lazy (post-copy) transfer: the only one to trust.

    ``ok`` means the lazy-pages daemon exited 0 and logged every task's pages as transferred.
    """

    pages_transferred: int
    pages_total: int
    ok: bool
    duration: float
    returncode: int
    tasks: tuple[tuple[int, int], ...]
    log_path: Path

    def check(self) -> None:
        """Raise :class:`CriuError` unless every page arrived."""
        if not self.ok:
            raise CriuError(
                f"lazy page transfer incomplete: {self.pages_transferred}/{self.pages_total} "
                f"pages, lazy-pages daemon exited {self.returncode}",
                cmd=["criu", "lazy-pages"],
                returncode=self.returncode,
                log_path=self.log_path,
                hint="the restored service lacks memory pages; kill it and resume the source",
            )


# ---- CRIU log reading (pure) -----------------------------------------------------------------


def criu_log_errors(text: str, limit: int = 3) -> list[str]:
    """The last ``limit`` meaningful "Error" lines of a CRIU log, without their timestamps."""
    lines = [
        LOG_PREFIX.sub("", line).strip()
        for line in text.splitlines()
        if "Error" in line and not any(h in line for h in HARMLESS_ERRORS)
    ]
    return lines[-limit:]


def criu_log_seconds(text: str) -> float | None:
    """The timestamp of the last line of a CRIU log: seconds since that CRIU started.

    It tells how long a daemon ran no matter when anyone looked.
    """
    for line in reversed(text.splitlines()):
        m = LOG_TIME.match(line)
        if m:
            return float(m.group(1))
    return None


def uffd_transfers(text: str) -> list[tuple[int, int]]:
    """Every ``UFFD transferred pages: (N/M)`` of a lazy-pages log, one per restored task."""
    return [(int(m.group(1)), int(m.group(2))) for m in UFFD_PAGES.finditer(text)]


def judge_lazy(text: str, returncode: int, duration: float, log_path: Path) -> LazyResult:
    """The lazy-pages daemon's exit code and log, turned into a :class:`LazyResult`.

    ``duration`` is the fallback for a log without timestamps; normally the daemon's own
    clock (its last log line) gives the time from its start to its end.
    """
    duration = criu_log_seconds(text) or duration
    tasks = uffd_transfers(text)
    done = sum(n for n, _ in tasks)
    total = sum(m for _, m in tasks)
    ok = returncode == 0 and bool(tasks) and all(n == m for n, m in tasks)
    return LazyResult(done, total, ok, duration, returncode, tuple(tasks), log_path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tree_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def _parse_state(data: dict[str, Any]) -> ContainerState:
    bundle = data.get("bundle")
    return ContainerState(
        id=str(data["id"]),
        status=str(data.get("status", "unknown")),
        pid=int(data.get("pid") or 0),
        bundle=Path(bundle) if bundle else None,
        annotations={str(k): str(v) for k, v in (data.get("annotations") or {}).items()},
    )


# ---- handles of long-running operations ------------------------------------------------------


class LazyCheckpoint:
    """The source side of a lazy migration: frozen, images written, page server serving.

    ``await ready()`` once the page server listens and the images are complete (ship them
    then); ``await wait()`` when the source process ends after serving every page it was
    asked for. Its exit code says nothing about the destination: judge by ``LazyRestore``.
    """

    def __init__(
        self,
        *,
        runtime: NodeRuntime,
        container: str,
        proc: asyncio.subprocess.Process,
        status_fd: int,
        work_dir: Path,
        port: int,
        allow_ip: str,
        parked: Path | None,
        cgroup: str | None,
        started: float,
    ) -> None:
        self._rt = runtime
        self._cgroup = cgroup
        self.container = container
        self._proc = proc
        self._status_fd: int | None = status_fd
        self.work_dir = work_dir
        self.port = port
        self._allow_ip = allow_ip
        self._parked = parked
        self._started = started
        self._result: LazyDumpResult | None = None
        self.ready_s: float | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / DUMP_LOG

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def ready(self, timeout: float = 120.0) -> float:
        """Wait for the images and the listening page server; return seconds since start."""
        if self.ready_s is not None:
            return self.ready_s
        fd = self._status_fd
        if fd is None:
            raise CriuError(
                "lazy checkpoint already failed",
                cmd=["runc", "checkpoint"],
                returncode=self._proc.returncode,
                log_path=self.log_path,
            )
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not got.done():
                try:
                    got.set_result(os.read(fd, 1))
                except OSError as exc:
                    got.set_exception(exc)

        loop.add_reader(fd, readable)
        try:
            data = await asyncio.wait_for(got, timeout)
        except TimeoutError as exc:
            raise CriuError(
                f"lazy checkpoint of {self.container} not ready after {timeout} s",
                cmd=["runc", "checkpoint", "--lazy-pages"],
                returncode=None,
                log_path=self.log_path,
            ) from exc
        finally:
            loop.remove_reader(fd)
            os.close(fd)
            self._status_fd = None
        if not data:
            # runc closes the status fd unwritten when the checkpoint died.
            await self.wait()
            raise CriuError(  # wait() raises on a non-zero exit; an exit 0 here is odd too
                f"lazy checkpoint of {self.container} ended before it was ready",
                cmd=["runc", "checkpoint", "--lazy-pages"],
                returncode=self._proc.returncode,
                log_path=self.log_path,
            )
        self.ready_s = time.monotonic() - self._started
        log.info("lazy checkpoint of %s ready after %.3f s", self.container, self.ready_s)
        return self.ready_s

    async def wait(self, timeout: float | None = None) -> LazyDumpResult:
        """Wait for the source process to end; raise :class:`CriuError` on a non-zero exit."""
        if self._result is None:
            try:
                _, err = await asyncio.wait_for(self._proc.communicate(), timeout)
            finally:
                if self._proc.returncode is not None:
                    await self._cleanup()
            rc = self._proc.returncode
            assert rc is not None
            ran = criu_log_seconds(_read_text(self.log_path))
            self._result = LazyDumpResult(
                self.container, rc, self.ready_s, ran or time.monotonic() - self._started
            )
            if rc != 0:
                raise self._rt.criu_error(
                    f"lazy checkpoint of {self.container} failed",
                    cmd=["runc", "checkpoint", "--lazy-pages"],
                    returncode=rc,
                    stderr=err.decode(errors="replace"),
                    log_path=self.log_path,
                )
        return self._result

    async def abort(self) -> None:
        """Stop the page server (kills the checkpoint's process group) and clean up.

        Before any destination restored from the images, this is a rollback: with CRIU gone
        its hold on the frozen service ends and the service goes on at the source.
        """
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal_module.SIGKILL)
        with contextlib.suppress(RuntimeToolError):
            await self.wait(timeout=30)
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None

    async def _cleanup(self) -> None:
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None
        await self._rt.unconfine_page_server(self.port, self._allow_ip)
        await self._rt.remove_network_lock()
        _unpark(self._parked)
        if self._proc.returncode == 0:
            prune_cgroup(self._cgroup)


class LazyRestore:
    """The destination side of a lazy migration: restored service plus lazy-pages daemon.

    ``await restored()`` once the service runs (its memory arrives on demand);
    ``await pages_done()`` once the daemon has every page (or gave up): the verdict.
    """

    def __init__(
        self,
        *,
        runtime: NodeRuntime,
        container: str,
        daemon: asyncio.subprocess.Process,
        restore: asyncio.subprocess.Process,
        restore_argv: list[str],
        bundle: Path,
        work_dir: Path,
        started: float,
    ) -> None:
        self._rt = runtime
        self.bundle = bundle
        self.container = container
        self._daemon = daemon
        self._restore = restore
        self._restore_argv = restore_argv
        self.work_dir = work_dir
        self._started = started
        self._restored: RestoreResult | None = None
        self._lazy: LazyResult | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / LAZY_PAGES_LOG

    async def restored(self, timeout: float = 120.0) -> RestoreResult:
        """Wait for ``runc restore --lazy-pages``; raise :class:`CriuError` if it failed."""
        if self._restored is None:
            try:
                rc = await asyncio.wait_for(self._restore.wait(), timeout)
            except TimeoutError as exc:
                await self.abort()
                raise CriuError(
                    f"lazy restore of {self.container} timed out after {timeout} s",
                    cmd=self._restore_argv,
                    returncode=None,
                    log_path=self.work_dir / RESTORE_LOG,
                ) from exc
            wall = time.monotonic() - self._started
            if rc != 0:
                await self.abort()
                await self._rt.cleanup_failed_restore(self.container, self.bundle, self.work_dir)
                raise self._rt.criu_error(
                    f"lazy restore of {self.container} failed",
                    cmd=self._restore_argv,
                    returncode=rc,
                    stderr=_read_text(self.work_dir / RUNC_LOG),
                    log_path=self.work_dir / RESTORE_LOG,
                )
            state = await self._rt.state(self.container)
            self._restored = RestoreResult(
                self.container, state.pid, wall, read_stats(self.work_dir / "stats-restore")
            )
            log.info("lazy restore of %s running after %.3f s", self.container, wall)
        return self._restored

    async def pages_done(self, timeout: float | None = 600.0) -> LazyResult:
        """Wait for the lazy-pages daemon to end and judge the transfer by its exit and log."""
        if self._lazy is None:
            try:
                rc = await asyncio.wait_for(self._daemon.wait(), timeout)
            except TimeoutError:
                await self.abort()
                rc = self._daemon.returncode if self._daemon.returncode is not None else -1
            self._lazy = judge_lazy(
                _read_text(self.log_path), rc, time.monotonic() - self._started, self.log_path
            )
            log.info(
                "lazy pages of %s: %d/%d in %.3f s (daemon exit %d)",
                self.container,
                self._lazy.pages_transferred,
                self._lazy.pages_total,
                self._lazy.duration,
                rc,
            )
        return self._lazy

    async def abort(self) -> None:
        """Stop the daemon and the restore if still running (the service then cannot fault)."""
        for proc in (self._restore, self._daemon):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal_module.SIGKILL)
                await proc.wait()


def _criu_config(state: ContainerState) -> Path | None:
    """The CRIU config file the container's ``org.criu.config`` annotation names."""
    value = state.annotations.get(bundle_mod.CRIU_CONFIG_ANNOTATION)
    return Path(value) if value else None


def _cgroups_path(state: ContainerState) -> str | None:
    if state.bundle is None:
        return None
    try:
        value = bundle_mod.read_config(state.bundle)["linux"]["cgroupsPath"]
    except (ConfigError, KeyError, TypeError):
        return None
    return str(value) if value else None


def prune_cgroup(cgroups_path: str | None, *, root: Path = CGROUP_ROOT) -> None:
    """Remove a container's cgroup and its parents (``/fogmig/<node>``, ...) where empty.

    runc removes only a container's own cgroup, and not at all after a failed restore.
    ``rmdir`` on cgroupfs refuses a cgroup with children or tasks, so whatever a live
    container still uses stays.
    """
    if not cgroups_path or not cgroups_path.startswith("/"):
        return
    path = PurePosixPath(cgroups_path)
    chain = [path, *list(path.parents)[:-1]]  # deepest first, never "/"
    for hierarchy in root.iterdir() if root.is_dir() else []:
        for cgroup in chain:
            try:
                (hierarchy / cgroup.relative_to("/")).rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break  # still in use: so are its parents


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
        point outside the container (PLATFORM-NOTES.md), and a pipe would never reach EOF.
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

    def criu_error(
        self,
        message: str,
        *,
        cmd: Sequence[str],
        returncode: int | None,
        stderr: str,
        log_path: Path,
    ) -> CriuError:
        """A :class:`CriuError` whose message carries the last Error lines of ``log_path``."""
        errors = criu_log_errors(_read_text(log_path))
        if errors:
            message = f"{message}: {' | '.join(errors)}"
        return CriuError(message, cmd=cmd, returncode=returncode, stderr=stderr, log_path=log_path)

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
                stderr=_read_text(runc_log),
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
        return _parse_state(json.loads(done.stdout))

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
        return [_parse_state(item) for item in data]

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

    async def delete(self, cid: str, *, force: bool = False) -> None:
        """Delete the container (``force`` kills it first if it still runs)."""
        cgroup = _cgroups_path(await self.state(cid))
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

    # -- network locks and page server confinement --

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

    @staticmethod
    def _page_server_chain(port: int) -> str:
        return f"FMPS-{port}"

    async def confine_page_server(self, port: int, allow_ip: str) -> None:
        """Admit only ``allow_ip`` to TCP ``port`` in this node (CRIU's page server has no auth)."""
        await self.unconfine_page_server(port, allow_ip)
        chain = self._page_server_chain(port)
        rules = [
            ["-N", chain],
            ["-A", chain, "-s", allow_ip, "-j", "ACCEPT"],
            ["-A", chain, "-j", "DROP"],
            ["-I", "INPUT", "-p", "tcp", "--dport", str(port), "-j", chain],
        ]
        for rule in rules:
            await run(["iptables", "-w", *rule], netns=self.netns, what="iptables")

    async def unconfine_page_server(self, port: int, allow_ip: str) -> None:
        """Remove what :meth:`confine_page_server` added; absent rules are fine."""
        del allow_ip  # the chain is per port; the argument keeps the pair symmetric
        chain = self._page_server_chain(port)
        jump = ["-D", "INPUT", "-p", "tcp", "--dport", str(port), "-j", chain]
        for _ in range(16):
            if (await run(["iptables", "-w", *jump], netns=self.netns, check=False)).returncode:
                break
        await run(["iptables", "-w", "-F", chain], netns=self.netns, check=False)
        await run(["iptables", "-w", "-X", chain], netns=self.netns, check=False)

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
        async with self._dumping(state):
            t0 = time.monotonic()
            done = await self._runc(*args, cid, check=False, timeout=timeout)
            wall = time.monotonic() - t0
        if done.returncode != 0:
            raise self.criu_error(
                f"checkpoint of {cid} on {self.node} failed",
                cmd=done.argv,
                returncode=done.returncode,
                stderr=done.stderr,
                log_path=work_dir / DUMP_LOG,
            )
        if not leave_running:
            prune_cgroup(_cgroups_path(state))
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
            "checkpoint of %s on %s: %.3f s, frozen %s ms, %s pages",
            cid,
            self.node,
            wall,
            result.frozen_ms,
            result.pages_written,
        )
        return result

    async def checkpoint_lazy(
        self,
        cid: str,
        *,
        image_dir: Path,
        work_dir: Path,
        listen_ip: str,
        port: int,
        allow_ip: str,
    ) -> LazyCheckpoint:
        """Start a lazy dump whose page server serves ``allow_ip`` only; return its handle.

        ``listen_ip`` is what runc asks for, though CRIU's lazy page server listens on every
        address of the node (PLATFORM-NOTES.md): hence the firewall rule for ``allow_ip``.
        """
        image_dir, work_dir = _absolute(image_dir, work_dir, create=True)
        ensure_pipe_sysctls()
        state = await self.state(cid)
        parked = _park(_criu_config(state))
        read_fd, write_fd = os.pipe()
        try:
            await self.confine_page_server(port, allow_ip)
            argv = self._runc_argv(
                "checkpoint",
                "--lazy-pages",
                "--page-server",
                f"{listen_ip}:{port}",
                "--status-fd",
                str(write_fd),
                "--image-path",
                str(image_dir),
                "--work-path",
                str(work_dir),
                cid,
            )
            full = in_netns(self.netns, argv)
            log.debug("run: %s", " ".join(full))
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,),
                # Its own process group, so that abort() can stop runc and CRIU together.
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            await self.unconfine_page_server(port, allow_ip)
            _unpark(parked)
            raise
        finally:
            os.close(write_fd)  # only runc may hold the write end: EOF then means it died
        os.set_blocking(read_fd, False)
        return LazyCheckpoint(
            runtime=self,
            container=cid,
            proc=proc,
            status_fd=read_fd,
            work_dir=work_dir,
            port=port,
            allow_ip=allow_ip,
            parked=parked,
            cgroup=_cgroups_path(state),
            started=started,
        )

    # -- restore --

    async def cleanup_failed_restore(self, cid: str, bundle: Path, work_dir: Path) -> None:
        """After a failed restore: no half-made container or cgroup, nothing mounted."""
        with contextlib.suppress(ContainerNotFoundError, RuntimeToolError):
            await self.delete(cid, force=True)
        with contextlib.suppress(ConfigError, KeyError, TypeError):
            prune_cgroup(bundle_mod.read_config(bundle)["linux"]["cgroupsPath"])
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
        on the same ``work_dir`` (fogmig's own page server feeds it, see migration.lazypages).
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
            raise self.criu_error(
                f"restore of {cid} on {self.node} failed",
                cmd=full,
                returncode=rc,
                stderr=_read_text(work_dir / RUNC_LOG),
                log_path=work_dir / RESTORE_LOG,
            )
        state = await self.state(cid)
        result = RestoreResult(cid, state.pid, wall, read_stats(work_dir / "stats-restore"))
        log.info("restored %s on %s in %.3f s (pid %d)", cid, self.node, wall, state.pid)
        return result

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

    async def restore_lazy(
        self,
        cid: str,
        *,
        bundle: Path,
        image_dir: Path,
        work_dir: Path,
        page_server_ip: str,
        port: int,
        socket_timeout: float = 30.0,
    ) -> LazyRestore:
        """Start the lazy-pages daemon, then ``runc restore --lazy-pages``; return the handle.

        The images must already be in ``image_dir``; the daemon and the restore share
        ``work_dir`` (the daemon's socket lives there).
        """
        argv, image_dir, work_dir = self._restore_argv(cid, bundle, image_dir, work_dir, lazy=True)
        if await self.exists(cid):
            raise RuntimeToolError(
                f"cannot restore {cid} on {self.node}: a container of that name exists",
                cmd=argv,
                returncode=None,
            )
        socket_path = work_dir / LAZY_PAGES_SOCKET
        socket_path.unlink(missing_ok=True)
        (work_dir / LAZY_PAGES_LOG).unlink(missing_ok=True)
        ensure_pipe_sysctls()
        daemon_argv = in_netns(
            self.netns,
            [
                self.criu,
                "lazy-pages",
                "--page-server",
                "--address",
                page_server_ip,
                "--port",
                str(port),
                "--images-dir",
                str(image_dir),
                "--work-dir",
                str(work_dir),
                "--log-file",
                LAZY_PAGES_LOG,
                "-v4",
            ],
        )
        log.debug("run: %s", " ".join(daemon_argv))
        started = time.monotonic()
        with (work_dir / "lazy-pages.stderr").open("wb") as err_file:
            daemon = await asyncio.create_subprocess_exec(
                *daemon_argv,
                stdin=subprocess.DEVNULL,
                stdout=err_file,
                stderr=err_file,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + socket_timeout
            while not socket_path.exists():
                if daemon.returncode is not None or time.monotonic() > deadline:
                    raise self.criu_error(
                        "the lazy-pages daemon did not come up"
                        if daemon.returncode is not None
                        else f"no lazy-pages socket after {socket_timeout} s",
                        cmd=daemon_argv,
                        returncode=daemon.returncode,
                        stderr=_read_text(work_dir / "lazy-pages.stderr"),
                        log_path=work_dir / LAZY_PAGES_LOG,
                    )
                await asyncio.sleep(0.01)
            full = in_netns(self.netns, argv)
            log.debug("run: %s", " ".join(full))
            restore = await asyncio.create_subprocess_exec(
                *full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            if daemon.returncode is None:
                os.killpg(daemon.pid, signal_module.SIGKILL)
            await daemon.wait()
            raise
        return LazyRestore(
            runtime=self,
            container=cid,
            daemon=daemon,
            restore=restore,
            restore_argv=full,
            bundle=bundle,
            work_dir=work_dir,
            started=started,
        )
