"""The testbed's own background processes: start them detached, recognise them, stop them.

A recorded PID is only trusted after ``/proc/PID/cmdline`` proves it is still the process we
started (PIDs are reused after a crash or a reboot); nothing is ever stopped by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path


def cmdline(pid: int) -> list[str]:
    """The command line of a live process; empty for a zombie or a process that is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_ours(pid: int | None, needles: Sequence[str]) -> bool:
    """Whether ``pid`` is alive and every one of ``needles`` is an argument of its command."""
    if pid is None or pid <= 0:
        return False
    args = cmdline(pid)
    return bool(args) and all(any(n in a for a in args) for n in needles)


def _reap(pid: int) -> None:
    # A process this one started stays a zombie until waited for.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (its command line may be in flux)."""
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def spawn_detached(
    argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None
) -> int:
    """Start a daemon in its own session, output appended to ``log_path``; returns its PID.

    ``posix_spawn`` rather than ``subprocess.Popen``: the daemon outlives the ``Popen`` object,
    whose finaliser would warn about a child still running.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawnp(
        argv[0],
        list(argv),
        dict(os.environ) if env is None else env,
        file_actions=actions,
        setsid=True,
    )


async def wait_gone(pid: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while alive(pid):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def stop_process(pid: int, needles: Sequence[str] = (), *, grace: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds, a process proven to be ours.

    Returns whether a process was stopped (False when it was gone or is someone else's).
    """
    if not is_ours(pid, needles):
        _reap(pid)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if await wait_gone(pid, grace):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    await wait_gone(pid, grace)
    return True


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a daemon's log, joined for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def write_pidfile(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")
