"""A probe device: GET /ping to one service through a gateway at a fixed rate, to measure
the downtime a device sees while the service migrates.

Every request is a CoAP NON message (never retransmitted, so a lost request is just lost and
no back-off delays the next) with its own timeout; requests go out on the beat whether or not
earlier ones were answered. The probe has its own aiocoap context, so its own UDP socket, on a
:class:`~fogmig.device_sim.coap.CoapThread` (in the device host's namespace if asked), and is
started and stopped from any other event loop::

    async with Probe.running(address=gw_ip, port=5700, netns=netns) as probe:
        t0 = probe.now()
        ...  # migrate
        t1 = probe.now()
    print(probe.timeline().window(t0, t1).downtime_s)
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import functools
import ipaddress
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from fogmig.device_sim.coap import CoapThread, coap_uri
from fogmig.device_sim.events import NETWORK_ERROR, RequestOutcome
from fogmig.device_sim.observed import ProbeRecord, ProbeTimeline
from fogmig.platform.base.errors import ConfigError, SetupError

PING_PATH: Final = "ping"
MAX_RATE_HZ: Final = 100.0
CSV_FIELDS: Final = (
    "seq",
    "address",
    "sent_at",
    "answered_at",
    "latency_ms",
    "outcome",
    "code",
    "detail",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSettings:
    """How often the probe asks and how long each request waits."""

    rate_hz: float = 20.0
    """Requests per second, at most :data:`MAX_RATE_HZ`; the downtime's resolution is one
    interval (1 / rate)."""
    timeout_s: float = 1.0
    """A request not answered by then counts as lost (its late answer is ignored)."""
    path: str = PING_PATH
    """A read-only resource that costs the service next to nothing."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_hz) and 0 < self.rate_hz <= MAX_RATE_HZ):
            raise ConfigError(
                f"the probe rate must be in (0, {MAX_RATE_HZ:g}] Hz, got {self.rate_hz}"
            )
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"the probe timeout must be positive, got {self.timeout_s}")
        if not self.path.strip("/"):
            raise ConfigError("the probe needs a resource path, e.g. 'ping'")

    @property
    def interval_s(self) -> float:
        return 1.0 / self.rate_hz


class Probe:
    """One probe device; :meth:`start` once, :meth:`stop` once, read :meth:`timeline`.

    ``thread`` shares a running :class:`CoapThread` (e.g. a fleet's); without it the probe
    runs its own, in network namespace ``netns`` (None: the caller's namespace).
    """

    def __init__(
        self,
        *,
        address: str,
        port: int,
        settings: ProbeSettings | None = None,
        netns: str | None = None,
        thread: CoapThread | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise ConfigError(f"invalid probe port {port}")
        _check_address(address)
        self.settings = settings or ProbeSettings()
        self.address = address
        """The gateway the next request goes to (see :meth:`retarget`)."""
        self.port = port
        self.netns = netns
        self._first_address = address
        self._shared_thread = thread
        self._used = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._thread: CoapThread | None = None
        self._ctx: Any = None
        self._stop: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._records: list[ProbeRecord] = []
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._wall_offset_s = 0.0

    @staticmethod
    def now() -> float:
        """The probe's clock (monotonic); mark a window's start and end with it."""
        return time.monotonic()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        *,
        address: str,
        port: int,
        settings: ProbeSettings | None = None,
        netns: str | None = None,
        thread: CoapThread | None = None,
    ) -> AsyncIterator[Self]:
        """A started probe, stopped on the way out (its timeline stays readable)."""
        probe = cls(address=address, port=port, settings=settings, netns=netns, thread=thread)
        await probe.start()
        try:
            yield probe
        finally:
            await probe.stop()

    def retarget(self, address: str) -> None:
        """Send the next requests to another gateway (the device roamed)."""
        _check_address(address)
        # One attribute store: the CoAP thread reads either the old or the new address.
        self.address = address

    async def start(self) -> None:
        """Open the probe's socket and start sending; returns once the first request left."""
        if self._used:
            raise ConfigError("a Probe runs once; make a new one")
        self._used = True
        import aiocoap

        stack = contextlib.AsyncExitStack()
        try:
            thread = self._shared_thread
            if thread is None:
                thread = await stack.enter_async_context(CoapThread.running(netns=self.netns))
            self._ctx = await thread.call(
                aiocoap.Context.create_client_context(transports=["udp6"])
            )
            stack.push_async_callback(self._close_context, thread)
            started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._thread = thread
            self._loop_task = asyncio.create_task(
                thread.call(self._send_loop(started)), name="probe"
            )
            await asyncio.wait([started, self._loop_task], return_when=asyncio.FIRST_COMPLETED)
            if self._loop_task.done():
                self._loop_task.result()  # raises what ended it
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def stop(self) -> ProbeTimeline:
        """Stop sending, wait until every request is answered or timed out, close the socket."""
        if self._stack is None or self._thread is None or self._loop_task is None:
            raise ConfigError("the probe is not running")
        stack, self._stack = self._stack, None
        try:
            with contextlib.suppress(SetupError):  # the thread died: the loop ended with it
                await self._thread.call(self._set_stop())
            await self._loop_task
        finally:
            await stack.aclose()
        return self.timeline()

    def records(self) -> list[ProbeRecord]:
        """The requests settled so far (answered or given up), in the order they settled."""
        # Appends happen on the CoAP thread; copying a list is atomic under the GIL.
        return list(self._records)

    def timeline(self) -> ProbeTimeline:
        """What the probe recorded so far (everything, once stopped), in send order."""
        if self._started_at is None:
            raise ConfigError("the probe has not started")
        records = sorted(self.records(), key=lambda r: r.seq)
        return ProbeTimeline(
            address=self._first_address,
            port=self.port,
            path=self.settings.path,
            interval_s=self.settings.interval_s,
            timeout_s=self.settings.timeout_s,
            started_at=self._started_at,
            stopped_at=self._stopped_at if self._stopped_at is not None else self.now(),
            wall_offset_s=self._wall_offset_s,
            records=tuple(records),
        )

    async def _close_context(self, thread: CoapThread) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await thread.call(ctx.shutdown())

    # --- on the CoAP thread ------------------------------------------------------------------

    async def _set_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _send_loop(self, started: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        self._stop = stop = asyncio.Event()
        interval = self.settings.interval_s
        in_flight: set[asyncio.Task[None]] = set()
        self._wall_offset_s = time.time() - time.monotonic()
        # loop.time() is time.monotonic() on the stock loop the CoapThread runs.
        next_at = self._started_at = loop.time()
        seq = 0
        started.get_loop().call_soon_threadsafe(_resolve, started)
        while not stop.is_set():
            seq += 1
            task = loop.create_task(self._request(seq))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            next_at += interval
            now = loop.time()
            if next_at < now:
                # The loop stalled: skip the beats it missed instead of sending them in a burst.
                next_at += math.ceil((now - next_at) / interval) * interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next_at - now)
        if in_flight:
            await asyncio.wait(in_flight)
        self._stopped_at = loop.time()

    async def _request(self, seq: int) -> None:
        import aiocoap
        import aiocoap.error

        address = self.address
        msg = aiocoap.Message(
            code=aiocoap.GET,
            uri=coap_uri(address, self.port, self.settings.path),
            transport_tuning=non_tuning(),
        )
        sent_at = time.monotonic()
        answered_at, code, detail = None, "", ""
        try:
            resp = await asyncio.wait_for(self._ctx.request(msg).response, self.settings.timeout_s)
        except (TimeoutError, aiocoap.error.TimeoutError):
            outcome = RequestOutcome.TIMEOUT
        except aiocoap.error.Error as exc:
            outcome, code, detail = RequestOutcome.ERROR, NETWORK_ERROR, error_detail(exc)
        else:
            at = time.monotonic()
            code = str(resp.code.dotted)
            outcome = RequestOutcome.OK if code.startswith("2.") else RequestOutcome.ERROR
            answered_at = at if outcome is RequestOutcome.OK else None
        self._records.append(
            ProbeRecord(
                seq=seq,
                address=address,
                sent_at=sent_at,
                answered_at=answered_at,
                outcome=outcome,
                code=code,
                detail=detail,
            )
        )


def error_detail(exc: BaseException) -> str:
    """What an error below CoAP was: the errno's name of the socket error behind it, else the
    error's type and text (aiocoap fails every request to a peer on one ICMP error)."""
    for cause in (exc, exc.__cause__, exc.__context__):
        if isinstance(cause, OSError) and cause.errno is not None:
            return errno.errorcode.get(cause.errno, str(cause.errno))
    return f"{type(exc).__name__}: {exc}"[:120]


@functools.cache
def non_tuning() -> Any:
    """aiocoap's transport tuning that makes a request a NON message (made on first use:
    the simulator imports aiocoap lazily)."""
    from aiocoap.numbers.constants import Unreliable

    return Unreliable()


def _check_address(address: str) -> None:
    # A bad address fails here, in the caller, and not later on the CoAP thread.
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(
            f"the probe needs a gateway's IP address, got {address!r}",
            hint="`fogmig testbed status` lists the gateways' data addresses",
        ) from None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def write_csv(timeline: ProbeTimeline, path: Path) -> None:
    """One row per request (times on the monotonic clock, in seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        out.writeheader()
        for r in timeline.records:
            latency = None if r.answered_at is None else r.answered_at - r.sent_at
            out.writerow(
                {
                    "seq": r.seq,
                    "address": r.address,
                    "sent_at": f"{r.sent_at:.6f}",
                    "answered_at": "" if r.answered_at is None else f"{r.answered_at:.6f}",
                    "latency_ms": "" if latency is None else f"{latency * 1000:.3f}",
                    "outcome": r.outcome.value,
                    "code": r.code,
                    "detail": r.detail,
                }
            )
