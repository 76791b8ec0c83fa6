"""The steps of a baseline migration: one runc checkpoint, rsync or runc restore each.

Each step runs its command as a script would, times it, and turns a failure into
:class:`StepFailed` carrying the tool's own message and the phase the record names. The
source bundle's restore-only CRIU config is moved aside while a dump runs, and CRIU's network
lock is removed after it (docs/platform.md); neither is part of the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fogmig.experiments import baseline_cmds as cmds
from fogmig.experiments.baseline_ssh import SshLink
from fogmig.platform.base.errors import ConfigError, CriuError, FogmigError, RuntimeToolError
from fogmig.platform.base.nodes import runc_root
from fogmig.platform.base.proc import in_netns, run, terminate
from fogmig.platform.base.vocabulary import Technique
from fogmig.platform.migration.record import MigrationRecord
from fogmig.services.deploy import node_runtime

PARKED: Final = ".parked"


class StepFailed(FogmigError):
    """A step of the toolchain failed; ``phase`` names it as the record does."""

    def __init__(self, phase: str, cause: FogmigError) -> None:
        self.phase = phase
        self.cause = cause
        super().__init__(f"{phase}: {cause}", hint=cause.hint)


@dataclass(slots=True)
class Move:
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

    @property
    def source_root(self) -> Path:
        return runc_root(self.source)

    @property
    def dest_root(self) -> Path:
        return runc_root(self.destination)


def park(bundle: Path) -> Path | None:
    # The source bundle's CRIU config holds restore-only options that a dump refuses.
    conf = bundle / "restore.conf"
    if not conf.exists():
        return None
    parked = conf.with_name(conf.name + PARKED)
    conf.replace(parked)
    return parked


def unpark(parked: Path | None) -> None:
    if parked is not None and parked.exists():
        parked.replace(parked.with_name(parked.name.removesuffix(PARKED)))


async def after_dump(move: Move) -> None:
    # A dump must never leave CRIU's network lock on the node (docs/platform.md).
    with contextlib.suppress(FogmigError):
        await node_runtime(move.source).remove_network_lock()


async def checkpoint(
    move: Move, phase: str, image_dir: Path, *, pre_dump: bool = False, parent: str | None = None
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
    parked = park(move.source_bundle)
    t0 = time.monotonic()
    try:
        done = await run(argv, netns=move.source_netns, check=False, timeout=move.timeout_s)
    except RuntimeToolError as exc:
        raise StepFailed(phase, exc) from exc
    finally:
        seconds = time.monotonic() - t0
        unpark(parked)
        await after_dump(move)
    if done.returncode != 0:
        failure = criu_failure(f"runc checkpoint ({phase})", done, work)
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


def criu_failure(what: str, done: object, work: Path) -> CriuError:
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


@dataclass(frozen=True, slots=True)
class Done:
    argv: list[str]
    returncode: int
    stderr: str


async def rsync(link: SshLink, move: Move, phase: str, src: Path, dst: Path) -> Moved:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        result = await link.rsync(src, dst, timeout=move.timeout_s)
    except (RuntimeToolError, ValueError) as exc:
        cause = exc if isinstance(exc, FogmigError) else ConfigError(str(exc))
        raise StepFailed(phase, cause) from exc
    return Moved(result.seconds, result.bytes_sent)


@dataclass(frozen=True, slots=True)
class Moved:
    seconds: float
    bytes_sent: int


async def restore(move: Move, *, lazy: bool) -> float:
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


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
