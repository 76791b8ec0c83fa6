"""The launcher of CRIU's lazy-pages daemon at the destination, fed by fogmig's page server.

Starts ``criu lazy-pages --page-server``, waits for its socket so the restore can run, and
turns its exit and log into a :class:`~fogmig.platform.migration.lazy.verdict.LazyPagesOutcome`.
Log level INFO for the daemon's readiness and outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from fogmig.platform.migration.lazy.errors import LazyPagesFailed
from fogmig.platform.migration.lazy.layout import lazy_vaddrs
from fogmig.platform.migration.lazy.server import LazyPageServer
from fogmig.platform.migration.lazy.verdict import (
    LazyPagesOutcome,
    parse_lazy_pages_events,
    released_and_missing,
)

log = logging.getLogger(__name__)

LAZY_SOCKET_NAME = "lazy-pages.socket"


class LazyPagesDaemon:
    """``criu lazy-pages --page-server`` at the destination, fed from a local page server.

    The daemon reaches the server through ``channel`` (from :meth:`LazyPageServer.channel`:
    nothing listens, nothing else can connect). It talks to ``restore --lazy-pages`` through
    ``lazy-pages.socket`` in ``work_dir``, not the network, so it need not share the restored
    service's namespace.

    Entering starts the daemon and returns once that socket exists, so the restore (with the
    same work directory) can run. :meth:`wait` returns the outcome; leaving kills a daemon that
    is still running. Time the transfer with the server's ``last_page_at``, not the daemon's
    exit.
    """

    def __init__(
        self,
        *,
        image_dir: Path,
        work_dir: Path,
        channel: socket.socket,
        criu: str = "criu",
        log_name: str = "lazy-pages.log",
        expected_tasks: int | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.image_dir = image_dir
        self.work_dir = work_dir
        self.log_path = work_dir / log_name
        self.expected_tasks = expected_tasks
        self._start_timeout = start_timeout
        self._channel = channel
        # CRIU's --ps-socket: talk over an inherited, already connected socket. -v4: the
        # per-task "UFFD transferred pages" summary is a debug line.
        self.argv = [
            *(criu, "lazy-pages", "--page-server", "--ps-socket", str(channel.fileno())),
            *("-D", str(image_dir), "-W", str(work_dir), "-v4", "--log-file", log_name),
        ]
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def socket_path(self) -> Path:
        return self.work_dir / LAZY_SOCKET_NAME

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _error(self, message: str, returncode: int | None) -> LazyPagesFailed:
        return LazyPagesFailed(
            message, cmd=self.argv, returncode=returncode, log_path=self.log_path
        )

    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                pass_fds=(self._channel.fileno(),),
            )
        except FileNotFoundError as exc:
            raise self._error("criu not found", None) from exc
        finally:
            # The daemon holds its own copy; ours would keep the server from seeing the
            # daemon go away.
            self._channel.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        while not self.socket_path.exists():
            if self._proc.returncode is not None:
                raise self._error(
                    "lazy-pages daemon exited before it listened", self._proc.returncode
                )
            if loop.time() > deadline:
                await self.kill()
                raise self._error(f"no {LAZY_SOCKET_NAME} after {self._start_timeout} s", None)
            await asyncio.sleep(0.01)
        log.info("lazy-pages daemon %d ready in %s", self._proc.pid, self.work_dir)

    async def wait(
        self,
        timeout: float | None = None,
        *,
        server: LazyPageServer | None = None,
    ) -> LazyPagesOutcome:
        """Wait for the daemon to finish (all pages in, or failure) and judge it.

        With ``server`` (the page server that fed this daemon) a task that released part of
        its memory during the transfer can still pass, as long as every page it lacks is one
        it released; without it only a full N/N does.
        """
        if self._proc is None:
            raise self._error("lazy-pages daemon was never started", None)
        async with asyncio.timeout(timeout):
            returncode = await self._proc.wait()
        served = server.served_pages if server is not None else None
        return await asyncio.to_thread(self._outcome, returncode, served)

    def _outcome(
        self, returncode: int | None, served: Mapping[int, Collection[int]] | None
    ) -> LazyPagesOutcome:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        parsed = parse_lazy_pages_events(text)
        released: dict[int, int] = {}
        missing: dict[int, int] | None = None
        short = [t for t in parsed.tasks if t.copied != t.total]
        if served is not None:
            missing = {}
            lazy = lazy_vaddrs(self.image_dir) if short else {}
            for t in short:
                if t.pid not in lazy:
                    missing[t.pid] = t.total - t.copied
                    continue
                events = [e for e in parsed.events if e.pid == t.pid]
                released[t.pid], missing[t.pid] = released_and_missing(
                    lazy[t.pid], served.get(t.pid, ()), events
                )
        outcome = LazyPagesOutcome(
            returncode=returncode,
            tasks=parsed.tasks,
            log_path=self.log_path,
            expected_tasks=self.expected_tasks,
            argv=list(self.argv),
            released=released,
            missing=missing,
        )
        log.info("%s", outcome.describe())
        return outcome

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()
