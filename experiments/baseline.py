"""The paper's own toolchain as a baseline: runc, CRIU and rsync over ssh, run like its scripts.

:func:`run_baseline` moves a deployed service between two testbed nodes the way the paper's
shell scripts did (section 4.2): cold is checkpoint, rsync, restore; pre-copy adds a
``--pre-dump`` round and a final dump with ``--parent-path``; post-copy is a lazy checkpoint
with CRIU's page server, ``criu lazy-pages`` and a lazy restore; hybrid is a pre-dump, then
post-copy. Each step is timed around its command, as the paper's ``time`` did, and the bytes
are those rsync reports as sent. The result is a fogmig :class:`MigrationRecord` whose id
starts with ``baseline-`` (engine ``runc-rsync``). A step this kernel refuses ends the record
with the tool's own error; the service then still runs on the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fogmig.experiments import baseline_cmds as cmds
from fogmig.experiments.baseline_check import DeviceCheck
from fogmig.experiments.baseline_ssh import SshLink
from fogmig.platform.agent.status import rss, service_params
from fogmig.platform.base import paths
from fogmig.platform.base.errors import (
    ConfigError,
    CriuError,
    FogmigError,
    RuntimeToolError,
    ServiceError,
)
from fogmig.platform.base.nodes import runc_root
from fogmig.platform.base.proc import in_netns, run, terminate
from fogmig.platform.base.vocabulary import Outcome, Phase, Technique
from fogmig.platform.migration.record import MigrationRecord, Round
from fogmig.platform.runtime.bundle import make_bundle, read_config
from fogmig.platform.runtime.cgroups import bundle_cgroups_path, prune_cgroup
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.platform.testbed.state import TestbedState, load_state
from fogmig.services.deploy import bundle_dir, find_service, netns_path, node_runtime

log = logging.getLogger(__name__)

ENGINE: Final = "runc-rsync"
ID_PREFIX: Final = "baseline-"
DEFAULT_SSH_PORT: Final = 2222
DEFAULT_PAGE_SERVER_PORT: Final = 27027
PARKED: Final = ".parked"


def engine_of(record: MigrationRecord) -> str:
    """The engine that made a record: this baseline, or fogmig's own."""
    return ENGINE if record.migration_id.startswith(ID_PREFIX) else "fogmig"


def new_migration_id(service: str) -> str:
    return f"{ID_PREFIX}{service}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


class StepFailed(FogmigError):
    """A step of the toolchain failed; ``phase`` names it as the record does."""

    def __init__(self, phase: str, cause: FogmigError) -> None:
        self.phase = phase
        self.cause = cause
        super().__init__(f"{phase}: {cause}", hint=cause.hint)


@dataclass(slots=True)
class _Move:
    """What one baseline migration works with (both nodes, their runc roots and images)."""

    service: str
    technique: Technique
    source: str
    destination: str
    source_netns: str
    dest_netns: str
    source_ip: str
    source_bundle: Path
    dest_bundle: Path
    src: cmds.ImageLayout
    dst: cmds.ImageLayout
    page_server_port: int
    timeout_s: float
    record: MigrationRecord
    source_dumped: bool = False
    lazy_daemon: asyncio.subprocess.Process | None = None
    lazy_dump: asyncio.subprocess.Process | None = None
    restored: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def source_root(self) -> Path:
        return runc_root(self.source)

    @property
    def dest_root(self) -> Path:
        return runc_root(self.destination)


async def run_baseline(
    service: str,
    destination: str,
    technique: Technique,
    *,
    state: TestbedState | None = None,
    ssh_port: int = DEFAULT_SSH_PORT,
    page_server_port: int = DEFAULT_PAGE_SERVER_PORT,
    timeout_s: float = 600.0,
    readings: int = 3,
) -> MigrationRecord:
    """Move ``service`` (running on one testbed node) to ``destination`` with ``technique``.

    Before the move a device posts ``readings`` readings; afterwards the service must answer
    on the destination with the same counter and running hash, accept one more reading, and
    no longer run on the source. The record's outcome is ``completed`` then; ``rolled_back``
    when a step failed while the service still ran on the source (such as a pre-dump this
    kernel refuses), ``failed_after_commit`` when it failed after the source had dumped.
    """
    state = state or load_state()
    move = await _prepare(
        service,
        destination,
        technique=technique,
        state=state,
        page_server_port=page_server_port,
        timeout_s=timeout_s,
    )
    record = move.record
    device = DeviceCheck(state=state, service=service, port=_port(move.source_bundle))
    await device.before(move.source, readings)
    try:
        async with SshLink(
            source_netns=move.source_netns,
            dest_netns=move.dest_netns,
            dest_address=state.node(destination).data_ip,
            port=ssh_port,
        ) as link:
            record.started_at = time.time()
            try:
                await _migrate(move, link)
                record.outcome = Outcome.COMPLETED
            except StepFailed as exc:
                record.error = str(exc.cause)
                record.failed_phase = exc.phase
                record.outcome = (
                    Outcome.FAILED_AFTER_COMMIT if move.source_dumped else Outcome.ROLLED_BACK
                )
            finally:
                record.finished_at = time.time()
                await _stop_lazy(move)
        if record.outcome is Outcome.COMPLETED:
            problems = await device.after(move.destination, move.source)
            if problems:
                record.outcome = Outcome.FAILED_AFTER_COMMIT
                record.error = "; ".join(problems)
                record.failed_phase = "verify"
        elif not move.source_dumped:
            problems = await device.after(move.source, move.destination)
            if problems:
                record.error = f"{record.error}; after the failure: {'; '.join(problems)}"
        record.mark(
            Phase.DONE if record.outcome is Outcome.COMPLETED else Phase.FAILED, time.time()
        )
    finally:
        await _clean_up(move)
    return record


def _port(bundle: Path) -> int:
    return service_params(bundle)[2]


async def _prepare(
    service: str,
    destination: str,
    *,
    technique: Technique,
    state: TestbedState,
    page_server_port: int,
    timeout_s: float,
) -> _Move:
    running = [p for p in await find_service(service) if p.container.running]
    if not running:
        raise ServiceError(f"service {service} runs on no node", hint="`fogmig deploy` it first")
    placement = running[0]
    source = placement.node
    state.node(destination)
    if source == destination:
        raise ConfigError(f"service {service} already runs on {destination}")
    if await node_runtime(destination).exists(service):
        raise ServiceError(
            f"node {destination} already has a container {service}",
            hint=f"`fogmig undeploy {service}` and deploy it again",
        )
    source_bundle = placement.container.bundle
    if source_bundle is None:
        raise ServiceError(f"service {service} on {source} has no bundle")
    config = read_config(source_bundle)
    # The destination's bundle exists before the migration starts, as on the paper's
    # nodes: same image and command, the destination's namespace and cgroup.
    dest_bundle = make_bundle(
        bundle_dir(destination, service),
        rootfs=Path(config["root"]["path"]),
        args=config["process"]["args"],
        netns_path=netns_path(state.node(destination).netns),
        restore_conf=True,
        cgroups_path=f"/fogmig/{destination}/{service}",
        hostname=service,
    )
    migration_id = new_migration_id(service)
    _, dirty_kbps, _ = service_params(source_bundle)
    link = state.link(source, destination)
    record = MigrationRecord(
        migration_id=migration_id,
        service=service,
        source=source,
        destination=destination,
        technique=technique,
        compression=False,
        state_bytes=rss(placement.container.pid),
        dirty_rate_bytes_per_s=dirty_kbps * 1024,
        link_rate_bit_per_s=link.rate_mbit * 1e6,
        link_rtt_s=link.rtt_ms / 1000,
    )
    root = paths.state_dir() / "baseline" / migration_id
    return _Move(
        service=service,
        technique=technique,
        source=source,
        destination=destination,
        source_netns=state.node(source).netns,
        dest_netns=state.node(destination).netns,
        source_ip=state.node(source).data_ip,
        source_bundle=source_bundle,
        dest_bundle=dest_bundle,
        src=cmds.ImageLayout(root / "source"),
        dst=cmds.ImageLayout(root / "destination"),
        page_server_port=page_server_port,
        timeout_s=timeout_s,
        record=record,
    )


async def _migrate(move: _Move, link: SshLink) -> None:
    r = move.record
    t = move.technique
    parent: str | None = None
    if t in cmds.PRE_DUMP_TECHNIQUES:
        r.mark(Phase.PRECOPY, time.time())
        r.pre_dump_time_s = await _checkpoint(move, "pre_dump", move.src.pre_dump, pre_dump=True)
        moved = await _rsync(link, move, "pre_dump_transfer", move.src.pre_dump, move.dst.pre_dump)
        r.pre_dump_transfer_time_s, r.pre_dump_bytes = moved.seconds, moved.bytes_sent
        r.rounds.append(
            Round(
                index=0,
                dump_time_s=r.pre_dump_time_s,
                freeze_time_s=r.pre_dump_time_s,
                transfer_time_s=moved.seconds,
                bytes_dumped=_tree_bytes(move.src.pre_dump),
                bytes_sent=moved.bytes_sent,
            )
        )
        parent = cmds.PARENT_LINK
    r.mark(Phase.DUMPING, time.time())
    if t in cmds.LAZY_TECHNIQUES:
        r.dump_time_s = await _lazy_checkpoint(move, parent)
    else:
        r.dump_time_s = await _checkpoint(move, "dump", move.src.final, parent=parent)
    move.source_dumped = True
    r.mark(Phase.TRANSFERRING, time.time())
    moved = await _rsync(link, move, "dump_transfer", move.src.final, move.dst.final)
    r.dump_transfer_time_s, r.dump_bytes = moved.seconds, moved.bytes_sent
    r.rounds.append(
        Round(
            index=len(r.rounds),
            final=True,
            dump_time_s=r.dump_time_s,
            freeze_time_s=r.dump_time_s,
            transfer_time_s=moved.seconds,
            bytes_dumped=_tree_bytes(move.src.final),
            bytes_sent=moved.bytes_sent,
        )
    )
    lazy = t in cmds.LAZY_TECHNIQUES
    if lazy:
        await _start_lazy_daemon(move)
    r.mark(Phase.RESTORING, time.time())
    r.resume_time_s = await _restore(move, lazy=lazy)
    move.restored = True
    if lazy:
        r.mark(Phase.LAZY_PAGES, time.time())
        r.faulted_pages_transfer_time_s = await _wait_lazy(move)
    r.mark(Phase.COMMITTED, time.time())


# ---------------------------------------------------------------- steps


def _park(bundle: Path) -> Path | None:
    # The source bundle's CRIU config holds restore-only options that a dump refuses.
    conf = bundle / "restore.conf"
    if not conf.exists():
        return None
    parked = conf.with_name(conf.name + PARKED)
    conf.replace(parked)
    return parked


def _unpark(parked: Path | None) -> None:
    if parked is not None and parked.exists():
        parked.replace(parked.with_name(parked.name.removesuffix(PARKED)))


async def _after_dump(move: _Move) -> None:
    # A dump must never leave CRIU's network lock on the node (docs/platform.md).
    with contextlib.suppress(FogmigError):
        await node_runtime(move.source).remove_network_lock()


async def _checkpoint(
    move: _Move, phase: str, image_dir: Path, *, pre_dump: bool = False, parent: str | None = None
) -> float:
    work = move.src.work(phase)
    for d in (image_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    argv = cmds.checkpoint_argv(
        move.source_root,
        move.service,
        image_dir=image_dir,
        work_dir=work,
        pre_dump=pre_dump,
        parent=parent,
    )
    parked = _park(move.source_bundle)
    t0 = time.monotonic()
    try:
        done = await run(argv, netns=move.source_netns, check=False, timeout=move.timeout_s)
    except RuntimeToolError as exc:
        raise StepFailed(phase, exc) from exc
    finally:
        seconds = time.monotonic() - t0
        _unpark(parked)
        await _after_dump(move)
    if done.returncode != 0:
        failure = _criu_failure(f"runc checkpoint ({phase})", done, work)
        if pre_dump:
            failure = await _explain_pre_dump(failure)
        raise StepFailed(phase, failure)
    return seconds


async def _explain_pre_dump(failure: CriuError) -> CriuError:
    """runc only says "CRIU is missing features": add what CRIU says about memory tracking."""
    check = await run(cmds.DIRTY_TRACK_CHECK, check=False, what="criu check")
    said = " ".join((check.stderr + check.stdout).split())
    if check.returncode == 0 or not said:
        return failure
    return CriuError(
        "runc checkpoint --pre-dump failed",
        cmd=failure.cmd,
        returncode=failure.returncode,
        stderr=f"{failure.stderr.strip()}; `{' '.join(cmds.DIRTY_TRACK_CHECK)}`: {said}",
        hint="this kernel has no soft-dirty memory tracking (docs/platform.md)",
    )


def _criu_failure(what: str, done: object, work: Path) -> CriuError:
    argv = getattr(done, "argv", [])
    stderr = (getattr(done, "stderr", "") or getattr(done, "stdout", "")).strip()
    dump_log = work / "dump.log"
    tail = ""
    if dump_log.exists():
        errors = [
            line
            for line in dump_log.read_text(errors="replace").splitlines()
            if "Error" in line and "RLIMIT_NOFILE" not in line
        ]
        tail = errors[-1].strip() if errors else ""
    detail = stderr.splitlines()[-1] if stderr else ""
    if tail:
        detail = f"{detail} (CRIU: {tail})" if detail else tail
    return CriuError(
        f"{what} failed",
        cmd=argv,
        returncode=getattr(done, "returncode", None),
        stderr=detail,
        log_path=dump_log if dump_log.exists() else None,
    )


async def _lazy_checkpoint(move: _Move, parent: str | None) -> float:
    """Start the lazy dump; it stays up as the source's page server. Returns the time until
    runc reports on its status fd that the dump is done and the page server listens."""
    image_dir, work = move.src.final, move.src.work("dump")
    for d in (image_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    argv = cmds.checkpoint_argv(
        move.source_root,
        move.service,
        image_dir=image_dir,
        work_dir=work,
        parent=parent,
        page_server=(move.source_ip, move.page_server_port),
        status_fd=write_end,
    )
    full = in_netns(move.source_netns, argv)
    out = (work / "runc-checkpoint.out").open("wb")
    parked = _park(move.source_bundle)
    t0 = time.monotonic()
    try:
        move.lazy_dump = await asyncio.create_subprocess_exec(
            *full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(write_end,),
            start_new_session=True,
        )
        os.close(write_end)
        write_end = -1
        ready = await asyncio.wait_for(asyncio.to_thread(os.read, read_end, 1), move.timeout_s)
    except (OSError, TimeoutError) as exc:
        raise StepFailed(
            "dump", CriuError(f"lazy checkpoint: {exc}", cmd=full, returncode=None)
        ) from exc
    finally:
        seconds = time.monotonic() - t0
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)
        out.close()
        _unpark(parked)
    if not ready:
        rc = await move.lazy_dump.wait()
        move.lazy_dump = None
        await _after_dump(move)
        text = (work / "runc-checkpoint.out").read_text(errors="replace")
        done = _Done(full, rc, text)
        raise StepFailed("dump", _criu_failure("runc checkpoint --lazy-pages", done, work))
    return seconds


@dataclass(frozen=True, slots=True)
class _Done:
    argv: list[str]
    returncode: int
    stderr: str


async def _rsync(link: SshLink, move: _Move, phase: str, src: Path, dst: Path) -> _Moved:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        result = await link.rsync(src, dst, timeout=move.timeout_s)
    except (RuntimeToolError, ValueError) as exc:
        cause = exc if isinstance(exc, FogmigError) else ConfigError(str(exc))
        raise StepFailed(phase, cause) from exc
    return _Moved(result.seconds, result.bytes_sent)


@dataclass(frozen=True, slots=True)
class _Moved:
    seconds: float
    bytes_sent: int


async def _start_lazy_daemon(move: _Move) -> None:
    work = move.dst.work("restore")
    work.mkdir(parents=True, exist_ok=True)
    argv = cmds.lazy_pages_argv(
        address=move.source_ip,
        port=move.page_server_port,
        image_dir=move.dst.final,
        work_dir=work,
    )
    full = in_netns(move.dest_netns, argv)
    move.lazy_daemon = await asyncio.create_subprocess_exec(
        *full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    sock = work / "lazy-pages.socket"
    deadline = time.monotonic() + 10.0
    while not sock.exists():
        if move.lazy_daemon.returncode is not None or time.monotonic() > deadline:
            raise StepFailed(
                "restore",
                CriuError(
                    "criu lazy-pages did not start",
                    cmd=full,
                    returncode=move.lazy_daemon.returncode,
                    log_path=work / cmds.LAZY_LOG,
                ),
            )
        await asyncio.sleep(0.01)


async def _restore(move: _Move, *, lazy: bool) -> float:
    work = move.dst.work("restore")
    work.mkdir(parents=True, exist_ok=True)
    argv = cmds.restore_argv(
        move.dest_root,
        move.service,
        bundle=move.dest_bundle,
        image_dir=move.dst.final,
        work_dir=work,
        lazy=lazy,
    )
    full = in_netns(move.dest_netns, [*argv[:1], "--log", str(work / "runc.log"), *argv[1:]])
    # The restored service inherits runc's stdio: /dev/null, never a pipe of ours.
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *full,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        rc = await asyncio.wait_for(proc.wait(), move.timeout_s)
    except TimeoutError:
        await terminate(proc, grace=1.0)
        rc = -1
    seconds = time.monotonic() - t0
    if rc != 0:
        log_text = (
            (work / "runc.log").read_text(errors="replace") if (work / "runc.log").exists() else ""
        )
        restore_log = work / "restore.log"
        errors = [
            line.strip()
            for line in (
                restore_log.read_text(errors="replace") if restore_log.exists() else ""
            ).splitlines()
            if "Error" in line and "RLIMIT_NOFILE" not in line
        ]
        detail = errors[-1] if errors else (log_text.strip().splitlines() or [""])[-1]
        raise StepFailed(
            "restore",
            CriuError(
                "runc restore failed", cmd=full, returncode=rc, stderr=detail, log_path=restore_log
            ),
        )
    return seconds


async def _wait_lazy(move: _Move) -> float:
    """Wait until the destination's daemon has every page and the source's dump has ended."""
    t0 = time.monotonic()
    work = move.dst.work("restore")
    assert move.lazy_daemon is not None
    assert move.lazy_dump is not None
    try:
        rc_daemon = await asyncio.wait_for(move.lazy_daemon.wait(), move.timeout_s)
        rc_dump = await asyncio.wait_for(move.lazy_dump.wait(), move.timeout_s)
    except TimeoutError as exc:
        raise StepFailed(
            "lazy_pages",
            CriuError("lazy page transfer timed out", cmd=["criu", "lazy-pages"], returncode=None),
        ) from exc
    seconds = time.monotonic() - t0
    await _after_dump(move)
    lazy_log = work / cmds.LAZY_LOG
    text = lazy_log.read_text(errors="replace") if lazy_log.exists() else ""
    got, expected = cmds.uffd_pages(text)
    move.record.faulted_pages_bytes = cmds.uffd_bytes(text)
    move.record.faulted_pages_remote = got
    # The destination's daemon judges the transfer; the source's exit code does not.
    if rc_daemon != 0 or got < expected:
        raise StepFailed(
            "lazy_pages",
            CriuError(
                f"criu lazy-pages: {got}/{expected} pages (source dump exited {rc_dump})",
                cmd=["criu", "lazy-pages"],
                returncode=rc_daemon,
                log_path=lazy_log,
            ),
        )
    return seconds


async def _stop_lazy(move: _Move) -> None:
    for proc in (move.lazy_daemon, move.lazy_dump):
        if proc is not None:
            await terminate(proc, grace=2.0)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


async def _clean_up(move: _Move) -> None:
    """Images, work directories and the bundle of the side that no longer runs the service."""
    src_rt, dst_rt = node_runtime(move.source), node_runtime(move.destination)
    completed = move.record.outcome is Outcome.COMPLETED
    if completed or move.source_dumped:
        # runc removes a checkpointed container; a stopped leftover would still be listed.
        with contextlib.suppress(FogmigError):
            st = await src_rt.state(move.service)
            if not st.running:
                await src_rt.delete(move.service, force=True)
    if not move.restored:
        with contextlib.suppress(FogmigError):
            if await dst_rt.exists(move.service):
                await dst_rt.delete(move.service, force=True)
        prune_cgroup(bundle_cgroups_path(move.dest_bundle))
        remove_tree(move.dest_bundle)
    elif completed:
        prune_cgroup(bundle_cgroups_path(move.source_bundle))
        remove_tree(move.source_bundle)
    # remove_tree unmounts what CRIU left mounted below it before it deletes anything.
    remove_tree(move.src.root.parent)
