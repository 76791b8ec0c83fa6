"""The devices' way out: an aiocoap client context per device, behind a small port.

Requests are confirmable, with as many retransmissions as end within the device's timeout;
the answer (or its absence) comes back as a value, never as an exception, so the device loop
records every request the same way. Each device has its own context, so its own UDP socket
(as a real device does): an ICMP error the network returns for one device's traffic stays
with that device. All contexts run on one :class:`CoapThread`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fogmig.device_sim.events import NETWORK_ERROR, RequestOutcome
from fogmig.platform.base.errors import ConfigError, SetupError
from fogmig.platform.base.netns import enter_netns
from fogmig.services.sensor import CONTENT_FORMAT_JSON

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Answer:
    """The result of one request: an outcome, the CoAP code if any, the payload, the time."""

    outcome: RequestOutcome
    code: str
    payload: bytes
    latency_s: float
    detail: str = ""


class CoapPort(Protocol):
    """What a device needs from the network: one bounded request at a time."""

    async def request(
        self,
        method: str,
        address: str,
        port: int,
        path: str,
        *,
        payload: bytes = b"",
        timeout: float,
    ) -> Answer: ...


def coap_uri(address: str, port: int, path: str) -> str:
    """The URI of ``path`` on ``address``; IPv4 is written IPv4-mapped.

    aiocoap checks the route of every name it resolves with a throwaway socket; an IPv6
    literal skips that check (one socket and one system call less per request).
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return f"coap://[{ip}]:{port}/{path.lstrip('/')}"


ACK_RANDOM_FACTOR = 1.5  # RFC 7252's, kept: it spreads the retransmissions of many devices
MARGIN_S = 0.25


def retransmission_plan(ack_timeout_s: float, timeout_s: float) -> tuple[float, int]:
    """(ACK_TIMEOUT, MAX_RETRANSMIT) whose exchange is over by ``timeout_s`` at the latest.

    aiocoap keeps retransmitting a confirmable request that its caller gave up on, and holds
    every later request to the same endpoint back behind it (NSTART = 1). A device that gave
    up after its timeout would then wait for a retransmission backed off to many seconds
    after the service is back, and report that wait as downtime. So the exchange itself must
    end within the device's timeout: as many retransmissions as fit (RFC 7252's
    MAX_TRANSMIT_WAIT), and a shorter first timeout when not even one transmission fits.
    """
    if not (ack_timeout_s > 0 and timeout_s > 0):
        raise ConfigError(f"timeouts must be positive: ack {ack_timeout_s}, request {timeout_s}")
    ack = min(ack_timeout_s, timeout_s / ACK_RANDOM_FACTOR)
    retransmits = 0
    while ack * (2 ** (retransmits + 2) - 1) * ACK_RANDOM_FACTOR <= timeout_s:
        retransmits += 1
    return ack, retransmits


@functools.cache
def transport_tuning(ack_timeout_s: float, timeout_s: float) -> Any:
    """aiocoap's transmission parameters for :func:`retransmission_plan`."""
    from aiocoap.numbers.constants import TransportTuning

    ack, retransmits = retransmission_plan(ack_timeout_s, timeout_s)
    tuning_class = type(
        "DeviceTuning",
        (TransportTuning,),
        {
            "ACK_TIMEOUT": ack,
            "ACK_RANDOM_FACTOR": ACK_RANDOM_FACTOR,
            "MAX_RETRANSMIT": retransmits,
        },
    )
    return tuning_class()


class CoapThread:
    """A plain asyncio event loop on a thread of its own, where the devices' CoAP runs.

    Two reasons. aiocoap learns of ICMP errors through the socket's error queue, which it
    drains from an ``add_reader`` callback; under uvloop (the CLI's loop, and the demo's)
    that queue was left undrained, so a "port unreachable" from one gateway failed the next
    good request to another gateway and corrupted aiocoap's exchange bookkeeping (measured on
    the testbed: good requests lost, ``KeyError`` in ``_retransmit``); the stock loop drains
    it. And a thread can live in the device host's network namespace for good, so every
    socket aiocoap makes, early or late, is made there, whatever the caller's namespace.
    """

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, *, netns: str | None = None) -> AsyncIterator[CoapThread]:
        thread = cls(netns=netns)
        await thread._start()
        try:
            yield thread
        finally:
            await thread._stop()

    async def _start(self) -> None:
        started: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()

        def main() -> None:
            try:
                if self.netns is not None:
                    enter_netns(self.netns)
                loop = asyncio.new_event_loop()
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(loop)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="device-coap", daemon=True)
        self._thread.start()
        self._loop = await asyncio.wrap_future(started)

    async def _stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._loop = self._thread = None

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the CoAP thread; cancelling the caller cancels it there too."""
        if self._loop is None:
            coro.close()
            raise SetupError("the CoAP thread is not running")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))


class AiocoapPort:
    """The real port: one aiocoap client context, so one UDP socket, on a :class:`CoapThread`."""

    def __init__(self, thread: CoapThread, context: Any, *, ack_timeout_s: float) -> None:
        self._thread = thread
        self._ctx = context
        self._ack_timeout_s = ack_timeout_s

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, thread: CoapThread, *, ack_timeout_s: float = 0.4
    ) -> AsyncIterator[AiocoapPort]:
        import aiocoap

        ctx = await thread.call(aiocoap.Context.create_client_context(transports=["udp6"]))
        try:
            yield cls(thread, ctx, ack_timeout_s=ack_timeout_s)
        finally:
            await thread.call(ctx.shutdown())

    async def request(
        self,
        method: str,
        address: str,
        port: int,
        path: str,
        *,
        payload: bytes = b"",
        timeout: float,
    ) -> Answer:
        return await self._thread.call(
            self._request(method, address, port, path, payload=payload, timeout=timeout)
        )

    async def _request(
        self,
        method: str,
        address: str,
        port: int,
        path: str,
        *,
        payload: bytes,
        timeout: float,
    ) -> Answer:
        import aiocoap
        import aiocoap.error

        msg = aiocoap.Message(
            code=getattr(aiocoap.Code, method.upper()),
            uri=coap_uri(address, port, path),
            payload=payload,
            transport_tuning=transport_tuning(self._ack_timeout_s, timeout),
        )
        if payload:
            msg.opt.content_format = CONTENT_FORMAT_JSON
        t0 = time.monotonic()
        try:
            # CoAP's own give-up (ConRetransmitsExceeded) ends the exchange first; the margin
            # only guards against a loop too busy to run aiocoap's timer in time.
            resp = await asyncio.wait_for(self._ctx.request(msg).response, timeout + MARGIN_S)
        except (TimeoutError, aiocoap.error.TimeoutError):
            return Answer(RequestOutcome.TIMEOUT, "", b"", time.monotonic() - t0)
        except aiocoap.error.Error as exc:
            # aiocoap's str() of a network error hides the reason; its cause carries it.
            reason = exc.__cause__ or (exc.args[0] if exc.args else type(exc).__name__)
            return Answer(
                RequestOutcome.ERROR, NETWORK_ERROR, b"", time.monotonic() - t0, detail=str(reason)
            )
        latency = time.monotonic() - t0
        code = str(resp.code.dotted)
        outcome = RequestOutcome.OK if code.startswith("2.") else RequestOutcome.ERROR
        body = bytes(resp.payload)
        detail = "" if outcome is RequestOutcome.OK else body[:200].decode("utf-8", "replace")
        return Answer(outcome, code, body, latency, detail=detail)
