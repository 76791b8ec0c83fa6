"""Post-copy with CRIU's own machinery: a lazy checkpoint that stays up as the source's page
server, ``criu lazy-pages`` at the destination, and the wait until every page has moved.

The destination's daemon judges the transfer (its exit code and its "UFFD transferred pages"
lines); the source's exit code is not trusted (docs/platform.md).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

from fogmig.experiments import baseline_cmds as cmds
from fogmig.experiments.baseline_steps import (
    Done,
    Move,
    StepFailed,
    after_dump,
    criu_failure,
    park,
    unpark,
)
from fogmig.platform.base.errors import CriuError
from fogmig.platform.base.proc import in_netns, terminate


async def lazy_checkpoint(move: Move, parent: str | None) -> float:
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
    parked = park(move.source_bundle)
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
        unpark(parked)
    if not ready:
        rc = await move.lazy_dump.wait()
        move.lazy_dump = None
        await after_dump(move)
        text = (work / "runc-checkpoint.out").read_text(errors="replace")
        done = Done(full, rc, text)
        raise StepFailed("dump", criu_failure("runc checkpoint --lazy-pages", done, work))
    return seconds


async def start_lazy_daemon(move: Move) -> None:
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


async def wait_lazy(move: Move) -> float:
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
    await after_dump(move)
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


async def stop_lazy(move: Move) -> None:
    for proc in (move.lazy_daemon, move.lazy_dump):
        if proc is not None:
            await terminate(proc, grace=2.0)
