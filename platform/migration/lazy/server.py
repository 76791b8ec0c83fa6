"""The lazy page server: CRIU's page-server protocol, lazy side, answered from a page source.

CRIU's lazy-pages daemon connects to it and asks for the pages of each task; requests are
read ahead, answered concurrently and replied to in order. Log levels: DEBUG for every
request, INFO for sessions, WARNING for a rejected connection or a failed session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import PageServerError
from fogmig.platform.migration.lazy.protocol import (
    CLOSE_STATUS_OK,
    CloseRequest,
    GetPages,
    PageServerConnection,
    ProtocolError,
    pages_reply_header,
)
from fogmig.platform.migration.lazy.sources import PageSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LazyServeStats:
    """What the page server delivered; times are on the server's clock (monotonic seconds).

    ``faulted_pages_bytes`` and ``faulted_pages_transfer_time`` are the migration metrics.
    """

    connections: int
    requests: int
    pages_served: int
    bytes_served: int
    local_pages: int
    local_bytes: int
    remote_pages: int
    remote_bytes: int
    remote_requests: int
    first_request_at: float | None
    last_request_at: float | None
    last_page_at: float | None
    closed_cleanly: bool
    error: str | None

    @property
    def faulted_pages_bytes(self) -> int:
        return self.bytes_served

    @property
    def faulted_pages_transfer_time(self) -> float | None:
        if self.first_request_at is None or self.last_page_at is None:
            return None
        return self.last_page_at - self.first_request_at


@dataclass(slots=True)
class _Counters:
    connections: int = 0
    requests: int = 0
    pages_served: int = 0
    bytes_served: int = 0
    first_request_at: float | None = None
    last_request_at: float | None = None
    last_page_at: float | None = None
    closed_cleanly: bool = False
    error: str | None = None
    faults: int = 0
    fault_queue_s: list[float] = field(default_factory=lambda: [0.0] * 30)
    """Per second since the first request: how long ready fault replies waited for earlier
    replies (the daemon takes replies in request order)."""


class LazyPageServer:
    """CRIU's page-server protocol, lazy side, answered from a :class:`PageSource`.

    The daemon reaches it through :meth:`channel`, a connected socket pair: nothing listens,
    so nothing else on the node can read the service's memory (the protocol has no
    authentication). One session at a time; a further channel is refused. Requests are read
    ahead and fetched concurrently (up to ``max_in_flight``), replies go out in request order
    as the daemon expects. A request the source cannot answer ends the session, which makes
    the daemon fail: never a silent hole in restored memory.
    """

    def __init__(
        self,
        *,
        source: PageSource,
        max_in_flight: int = 16,
        max_reply_pages: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._max_in_flight = max_in_flight
        self._max_reply_pages = max_reply_pages
        self._clock = clock
        self._counters = _Counters()
        self._served: dict[int, list[tuple[int, int]]] = {}
        self._session: asyncio.Task[None] | None = None
        self._channel_sessions: set[asyncio.Task[None]] = set()
        self._session_done = asyncio.Event()

    @property
    def stats(self) -> LazyServeStats:
        c = self._counters
        t = self.source.tally
        return LazyServeStats(
            connections=c.connections,
            requests=c.requests,
            pages_served=c.pages_served,
            bytes_served=c.bytes_served,
            local_pages=t.local_pages,
            local_bytes=t.local_bytes,
            remote_pages=t.remote_pages,
            remote_bytes=t.remote_bytes,
            remote_requests=t.remote_requests,
            first_request_at=c.first_request_at,
            last_request_at=c.last_request_at,
            last_page_at=c.last_page_at,
            closed_cleanly=c.closed_cleanly,
            error=c.error,
        )

    @property
    def served_pages(self) -> dict[int, set[int]]:
        """Per task, the image address of every page sent to the daemon (for its verdict)."""
        return {
            pid: {vaddr + i * PAGE_SIZE for vaddr, nr in ranges for i in range(nr)}
            for pid, ranges in self._served.items()
        }

    async def channel(self) -> socket.socket:
        """A connected socket for the daemon's ``--ps-socket``; its session starts now.

        A Unix socket pair: no port to find, guard or race for, and no TCP cork delay.
        Hand it to :class:`LazyPagesDaemon` (which passes it on and closes this copy).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        self._channel_sessions.add(asyncio.create_task(self._run_session(reader, writer)))
        return theirs

    async def close(self) -> None:
        pending = [t for t in (self._session, *self._channel_sessions) if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._channel_sessions.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_session(self, timeout: float | None = None) -> LazyServeStats:
        """Wait until the daemon's session ends (cleanly or not) and return the stats."""
        async with asyncio.timeout(timeout):
            await self._session_done.wait()
        return self.stats

    async def _run_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._session is not None and not self._session.done():
            log.warning("refused a second lazy-pages session while one is running")
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        self._session_done.clear()
        self._session = asyncio.current_task()
        self._counters.connections += 1
        log.info("lazy-pages daemon connected")
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception as exc:
            # Whatever broke (the source, the protocol, the socket), the daemon must see the
            # session end and fail; the error is kept for the verdict.
            self._counters.error = f"{type(exc).__name__}: {exc}"
            log.warning("lazy page session failed: %s", self._counters.error)
            writer.transport.abort()
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            self._session_done.set()
        c = self._counters
        last = max((i for i, w in enumerate(c.fault_queue_s) if w > 0), default=-1)
        log.info(
            "lazy page session over: %s; %d one-page replies waited %.2f s in all for earlier "
            "replies, per second from the first: %s",
            self.stats,
            c.faults,
            sum(c.fault_queue_s),
            ", ".join(f"{w:.2f}" for w in c.fault_queue_s[: last + 1]) or "none",
        )

    async def _answer(self, request: GetPages) -> bytes:
        # CRIU's daemon asks for exactly one page when a process faults on it. Its background
        # ranges grow to 4 MiB; answered in part, they never hold up a fault queued behind
        # them for long (replies go out in request order), and the daemon asks for the rest.
        fault = request.nr_pages == 1
        nr = request.nr_pages if fault else min(request.nr_pages, self._max_reply_pages)
        data = await self.source.read(request.pid_id, request.vaddr, nr, fault=fault)
        nr = len(data) // PAGE_SIZE
        if nr == 0 or len(data) % PAGE_SIZE or nr > request.nr_pages:
            raise PageServerError(
                f"page source answered {len(data)} bytes for {request.nr_pages} pages"
            )
        return data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = PageServerConnection()
        pending: asyncio.Queue[tuple[GetPages, asyncio.Task[bytes]] | None] = asyncio.Queue(
            self._max_in_flight
        )
        answers: set[asyncio.Task[bytes]] = set()
        ready_at: dict[asyncio.Task[bytes], float] = {}

        async def read_requests() -> bool:
            """Queue an answer per GET; True at the daemon's close, False at EOF."""
            while True:
                data = await reader.read(65536)
                if not data:
                    if conn.pending_bytes:
                        raise ProtocolError("connection closed inside a request header")
                    await pending.put(None)
                    return False
                for event in conn.receive(data):
                    if isinstance(event, CloseRequest):
                        await pending.put(None)
                        return True
                    now = self._clock()
                    c = self._counters
                    c.requests += 1
                    if c.first_request_at is None:
                        c.first_request_at = now
                    c.last_request_at = now
                    task = asyncio.create_task(self._answer(event))
                    answers.add(task)
                    task.add_done_callback(answers.discard)
                    task.add_done_callback(lambda t: ready_at.__setitem__(t, time.monotonic()))
                    await pending.put((event, task))

        async def write_replies() -> None:
            """Send the answers in request order: the daemon reads each reply into its oldest
            outstanding read (criu/page-xfer.c), and a service that forked has two processes
            behind one task id, each with its own buffer, so no reply may go ahead."""
            first_ready: float | None = None
            while (item := await pending.get()) is not None:
                request, task = item
                data = await task
                ready = ready_at.pop(task, None)
                first_ready = first_ready or ready
                c = self._counters
                if request.nr_pages == 1 and ready is not None:
                    c.faults += 1
                    second = int(ready - (first_ready or ready))
                    if 0 <= second < len(c.fault_queue_s):
                        c.fault_queue_s[second] += time.monotonic() - ready
                nr = len(data) // PAGE_SIZE
                writer.write(pages_reply_header(request.request, nr))
                writer.write(data)
                await writer.drain()
                self._served.setdefault(request.pid_id, []).append((request.vaddr, nr))
                c.pages_served += nr
                c.bytes_served += len(data)
                c.last_page_at = self._clock()
                log.debug(
                    "served %d/%d pages at %#x of task %d",
                    nr,
                    request.nr_pages,
                    request.vaddr,
                    request.pid_id,
                )

        reading = asyncio.create_task(read_requests())
        writing = asyncio.create_task(write_replies())
        try:
            # A failed answer must stop the reader too: the daemon waits for that answer and
            # would never send anything that wakes the reader up.
            await asyncio.wait({reading, writing}, return_when=asyncio.FIRST_EXCEPTION)
            if writing.done() and writing.exception() is not None:
                await writing  # re-raises the failed answer
            closed = await reading
        finally:
            leftovers: list[asyncio.Task[Any]] = [reading, writing, *answers]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
        if not closed:
            raise PageServerError("the lazy-pages daemon hung up without closing the session")
        writer.write(CLOSE_STATUS_OK)
        await writer.drain()
        self._counters.closed_cleanly = True
        log.debug("session closed by the daemon, status sent")
        # The daemon closes its end after reading the status; wait for it.
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reader.read(1), timeout=5.0)
