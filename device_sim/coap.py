"""The devices' way out: one aiocoap client context for a whole fleet, behind a small port.

Requests are confirmable, with as many retransmissions as end within the device's timeout;
the answer (or its absence) comes back as a value, never as an exception, so
the device loop records every request the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from fogmig.device_sim.events import NETWORK_ERROR, Outcome
from fogmig.platform.errors import ConfigError, SetupError
from fogmig.platform.proc import NETNS_DIR
from fogmig.services.sensor import CONTENT_FORMAT_JSON

CLONE_NEWNET = 0x40000000


@dataclass(frozen=True, slots=True)
class Answer:
    """The result of one request: an outcome, the CoAP code if any, the payload, the time."""

    outcome: Outcome
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

    aiocoap checks the route of every name it resolves with a throwaway socket, made in the
    namespace of the calling thread; an IPv6 literal skips that check, so the fleet's socket
    alone decides where packets go.
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


@contextlib.contextmanager
def thread_in_netns(netns: str | None) -> Iterator[None]:
    """Run the calling thread in network namespace ``netns`` for the block (None: stay)."""
    if netns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / netns, os.O_RDONLY)
    except OSError as exc:
        raise SetupError(
            f"cannot open network namespace {netns}: {exc}", hint="is the testbed up?"
        ) from exc
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SetupError(f"cannot enter network namespace {netns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                # Going on in the wrong namespace would send everything astray.
                raise SetupError(f"cannot leave network namespace {netns}: {os.strerror(err)}")
    finally:
        os.close(own)
        os.close(target)


class AiocoapPort:
    """The real port: one aiocoap client context, its socket made in ``netns`` if given."""

    def __init__(self, context: Any, *, ack_timeout_s: float) -> None:
        self._ctx = context
        self._ack_timeout_s = ack_timeout_s

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, *, ack_timeout_s: float = 0.4, netns: str | None = None
    ) -> AsyncIterator[AiocoapPort]:
        import aiocoap

        # The socket is made while the context is created; it keeps its namespace afterwards.
        with thread_in_netns(netns):
            ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            yield cls(ctx, ack_timeout_s=ack_timeout_s)
        finally:
            await ctx.shutdown()

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
            return Answer(Outcome.TIMEOUT, "", b"", time.monotonic() - t0)
        except aiocoap.error.Error as exc:
            # aiocoap's str() of a network error hides the reason; its cause carries it.
            reason = exc.__cause__ or (exc.args[0] if exc.args else type(exc).__name__)
            return Answer(
                Outcome.ERROR, NETWORK_ERROR, b"", time.monotonic() - t0, detail=str(reason)
            )
        latency = time.monotonic() - t0
        code = str(resp.code.dotted)
        outcome = Outcome.OK if code.startswith("2.") else Outcome.ERROR
        body = bytes(resp.payload)
        detail = "" if outcome is Outcome.OK else body[:200].decode("utf-8", "replace")
        return Answer(outcome, code, body, latency, detail=detail)
