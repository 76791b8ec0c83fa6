"""Running external tools (ip, runc, criu, iptables, nsenter) from asyncio.

One place that turns a failed command into a typed :class:`RuntimeToolError` with the command,
exit code and stderr, and that knows how to run a command inside a node's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fogmig.platform.base.errors import RuntimeToolError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` so it runs in the named network namespace.

    ``nsenter --net`` rather than ``ip netns exec``: the latter remounts /sys, hides the cgroup
    tree, and CRIU then cannot find the freezer (docs/platform.md).
    """
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--", *argv]


@dataclass(frozen=True, slots=True)
class Completed:
    """The outcome of a finished command."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


async def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    timeout: float | None = 60.0,
    input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    error: type[RuntimeToolError] = RuntimeToolError,
    what: str | None = None,
) -> Completed:
    """Run a command to completion and return its output.

    With ``check`` a non-zero exit raises ``error`` (a :class:`RuntimeToolError` subclass)
    naming the command and ``log_path``; a timeout kills the command and raises too.
    """
    full = in_netns(netns, argv)
    log.debug("run: %s", " ".join(full))
    try:
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        raise error(
            f"{what or full[0]}: command not found",
            cmd=full,
            returncode=None,
            hint="run `make setup` to install the platform's tools",
        ) from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(input_bytes), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise error(
            f"{what or full[0]} timed out after {timeout} s",
            cmd=full,
            returncode=None,
            log_path=log_path,
        ) from exc
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    done = Completed(
        full, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and done.returncode != 0:
        raise error(
            what or "command failed",
            cmd=full,
            returncode=done.returncode,
            stderr=done.stderr or done.stdout,
            log_path=log_path,
        )
    return done


def run_sync(
    argv: Sequence[str], *, netns: str | None = None, check: bool = True, timeout: float = 60.0
) -> Completed:
    """Blocking variant for code that is not on an event loop (setup checks, cleanup at exit)."""
    full = in_netns(netns, argv)
    try:
        cp = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise RuntimeToolError(f"{full[0]}: command not found", cmd=full, returncode=None) from exc
    done = Completed(full, cp.returncode, cp.stdout, cp.stderr)
    if check and cp.returncode != 0:
        raise RuntimeToolError(
            "command failed", cmd=full, returncode=cp.returncode, stderr=cp.stderr or cp.stdout
        )
    return done


async def terminate(proc: asyncio.subprocess.Process, *, grace: float) -> None:
    """End a child this process started, by its own PID: SIGTERM, then SIGKILL after ``grace``
    seconds; returns once it has been reaped. A child that already ended is left alone."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
