"""Fence files on disk, shared by the agent's side (``fence``) and the watchdog (``fence_watch``).

One JSON file per migration under ``<run dir>/nodes/<node>/fences/``, replaced atomically
(write, fsync, rename, fsync the directory). Every read-modify-write holds ``flock`` on the
directory, so the agent's disarm and the watchdog's firing can never both succeed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from fogmig.platform.base import paths
from fogmig.platform.base.errors import FenceError
from fogmig.platform.base.nodes import check_node_name
from fogmig.platform.runtime.fence_state import FenceRecord, check_name, decode, encode

WATCH_MODULE = "fogmig.platform.runtime.fence_watch"
SUFFIX = ".json"
LOG_NAME = "fence.log"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def node_run_dir(node: str) -> Path:
    return paths.run_dir() / "nodes" / check_node_name(node)


def fence_dir(node: str) -> Path:
    """Where the fences of ``node`` live (volatile: they mean nothing after a reboot)."""
    return node_run_dir(node) / "fences"


def fence_path(node: str, migration_id: str) -> Path:
    return fence_dir(node) / (check_name("migration id", migration_id) + SUFFIX)


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the fence directory's lock (``flock`` on the directory itself)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def read(path: Path) -> FenceRecord | None:
    """The record in ``path``; None if there is no such file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FenceError(f"cannot read fence file {path}: {exc}") from exc
    return decode(data, source=f"fence file {path}")


def write(path: Path, rec: FenceRecord) -> None:
    """Replace ``path`` by ``rec`` durably; call with the directory locked."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, encode(rec))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise FenceError(f"cannot write fence file {path}: {exc}") from exc


def remove(path: Path) -> None:
    """Remove ``path`` durably (absent is fine); call with the directory locked."""
    try:
        path.unlink(missing_ok=True)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise FenceError(f"cannot remove fence file {path}: {exc}") from exc


def listing(directory: Path) -> list[Path]:
    """The fence files in ``directory``, by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def watch_argv(python: str, path: Path) -> list[str]:
    """The command line of the watchdog of ``path`` (``-P``: no checkout shadows the stdlib)."""
    return [python, "-P", "-m", WATCH_MODULE, str(path)]


def is_watchdog(pid: int | None, path: Path) -> bool:
    """True if ``pid`` is alive and is the watchdog of ``path`` (judged by its command line).

    A recorded pid may since have been reused by any process: never signal one that this
    does not confirm. A zombie has an empty command line and counts as gone.
    """
    if pid is None or pid <= 0:
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = raw.rstrip(b"\0").split(b"\0")
    return WATCH_MODULE.encode() in args and str(path).encode() in args


def log_line(node_dir: Path, message: str) -> None:
    """Append one line to the node's fence log; a log that cannot be written is no failure."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    line = f"{stamp} mono={time.monotonic():.3f} pid={os.getpid()} {message}\n"
    with contextlib.suppress(OSError):
        node_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(node_dir / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
