"""A typed CoAP client of the sensor service, and a device's ledger to verify its state.

Devices and tests post readings and read ``/state`` through :class:`SensorClient`; a
:class:`DeviceLedger` keeps the device's own running hash over what the service acknowledged,
so a migration that lost or doubled a reading shows up as a mismatch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from fogmig.platform.base.errors import ServiceError
from fogmig.services.sensor import (
    CONTENT_FORMAT_JSON,
    DEFAULT_PORT,
    INITIAL_HASH,
    chain_hash,
    validate_reading,
)

DEFAULT_TIMEOUT_S = 5.0
# Beyond this many readings of unknown fate the ledger stops trying every combination.
MAX_UNCERTAIN = 12


class ServiceUnreachableError(ServiceError):
    """No answer from the service within the timeout (down, migrating, or wrong address)."""


# ---- wire forms -----------------------------------------------------------------------------


class DeviceSummary(BaseModel):
    """What the service applied for one device."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    last_seq: int
    count: int
    hash: str


class ServiceState(BaseModel):
    """The answer of ``GET /state``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    count: int
    hash: str
    requests: int = 0
    state_mb: int
    dirty_kbps: float
    dirty_kbps_measured: float
    dirtied_pages: int = 0
    uptime_s: float
    started_at: float
    pid: int
    rss_kb: int | None = None
    last_seq: dict[str, int] = {}
    devices: dict[str, DeviceSummary] = {}


class _PostReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    count: int
    hash: str
    applied: bool


@dataclass(frozen=True, slots=True)
class CoapReply:
    """A raw CoAP response: code as ``"c.dd"``, payload, round-trip time."""

    code: str
    payload: bytes
    latency_s: float

    @property
    def successful(self) -> bool:
        return self.code.startswith("2.")


@dataclass(frozen=True, slots=True)
class PostResult:
    """The outcome of posting one reading.

    ``ok`` (2.04) carries the service's counter and hash and whether this post applied the
    reading (``False`` for a repeated seq); otherwise ``message`` holds the service's reason.
    """

    code: str
    latency_s: float
    count: int | None = None
    hash: str | None = None
    applied: bool | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "2.04"


def _uri(host: str, port: int, path: str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"coap://{host}:{port}/{path}"


def encode_reading(reading: Mapping[str, Any]) -> bytes:
    """The canonical payload of a reading (compact JSON): what the hash chains over."""
    return json.dumps(dict(reading), separators=(",", ":")).encode()


# ---- client ---------------------------------------------------------------------------------


class SensorClient:
    """One CoAP client context for many requests; use as ``async with SensorClient() as c``."""

    def __init__(self, *, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.port = port
        self.timeout = timeout
        self._ctx: Any = None

    async def __aenter__(self) -> Self:
        import aiocoap

        self._ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ctx is not None:
            await self._ctx.shutdown()
            self._ctx = None

    async def request(
        self,
        host: str,
        *,
        method: str = "GET",
        path: str = "state",
        payload: bytes = b"",
        content_format: int | None = None,
        timeout: float | None = None,
    ) -> CoapReply:
        """Send one confirmable request; raises :class:`ServiceUnreachableError` on timeout."""
        import aiocoap
        import aiocoap.error

        if self._ctx is None:
            raise ServiceError("SensorClient used outside `async with`")
        msg = aiocoap.Message(
            code=getattr(aiocoap.Code, method.upper()),
            uri=_uri(host, self.port, path),
            payload=payload,
        )
        if content_format is not None:
            msg.opt.content_format = content_format
        limit = self.timeout if timeout is None else timeout
        t0 = time.monotonic()
        try:
            resp = await asyncio.wait_for(self._ctx.request(msg).response, limit)
        except TimeoutError as exc:
            raise ServiceUnreachableError(
                f"no answer from {msg.get_request_uri()} within {limit:g} s"
            ) from exc
        except aiocoap.error.Error as exc:
            # aiocoap's str() of a network error hides the reason; its cause or args carry it.
            reason = exc.__cause__ or (exc.args[0] if exc.args else type(exc).__name__)
            helper = getattr(exc, "extra_help", None)
            raise ServiceUnreachableError(
                f"{msg.get_request_uri()}: {reason}",
                hint=helper() if callable(helper) else None,
            ) from exc
        return CoapReply(resp.code.dotted, bytes(resp.payload), time.monotonic() - t0)

    async def post_reading(
        self, host: str, reading: Mapping[str, Any] | bytes, *, timeout: float | None = None
    ) -> PostResult:
        """POST a reading (a mapping, or its exact payload bytes) to ``/sensor``."""
        payload = reading if isinstance(reading, bytes) else encode_reading(reading)
        reply = await self.request(
            host,
            method="POST",
            path="sensor",
            payload=payload,
            content_format=CONTENT_FORMAT_JSON,
            timeout=timeout,
        )
        if reply.code != "2.04":
            return PostResult(
                reply.code, reply.latency_s, message=reply.payload.decode(errors="replace")
            )
        try:
            body = _PostReply.model_validate_json(reply.payload)
        except ValidationError as exc:
            raise ServiceError(f"malformed answer from {host}: {reply.payload[:200]!r}") from exc
        return PostResult(reply.code, reply.latency_s, body.count, body.hash, body.applied)

    async def get_state(self, host: str, *, timeout: float | None = None) -> ServiceState:
        """``GET /state``; raises :class:`ServiceError` on an error code or malformed JSON."""
        reply = await self.request(host, method="GET", path="state", timeout=timeout)
        if reply.code != "2.05":
            raise ServiceError(f"GET /state on {host} answered {reply.code}")
        try:
            return ServiceState.model_validate_json(reply.payload)
        except ValidationError as exc:
            raise ServiceError(f"malformed state from {host}: {reply.payload[:200]!r}") from exc


async def post_reading(
    host: str,
    reading: Mapping[str, Any] | bytes,
    *,
    port: int = DEFAULT_PORT,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> PostResult:
    """Post one reading with a short-lived client (use :class:`SensorClient` for many)."""
    async with SensorClient(port=port, timeout=timeout) as c:
        return await c.post_reading(host, reading)


async def get_state(
    host: str, *, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT_S
) -> ServiceState:
    """Read the service's state with a short-lived client."""
    async with SensorClient(port=port, timeout=timeout) as c:
        return await c.get_state(host)


# ---- the device's ledger --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    """The verdict of comparing a device's ledger with the service's state.

    ``lost``: readings the device had acknowledged that the service no longer holds;
    ``doubled``: readings the service holds beyond what the device sent and could account for.
    """

    matches: bool
    expected_count: int
    service_count: int
    expected_hash: str
    service_hash: str
    lost: int = 0
    doubled: int = 0
    unacknowledged_applied: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Sent:
    seq: int
    payload: bytes
    acknowledged: bool


class DeviceLedger:
    """A device's own record of the readings the service acknowledged.

    A device sends one reading at a time: :meth:`next_reading` makes it, :meth:`record` files
    the result. A reading is resent with the same bytes until acknowledged (the service's dedup
    makes that safe); one given up with :meth:`abandon` may or may not have been applied, and
    :meth:`verify` accounts for both possibilities.
    """

    def __init__(self, device: str, *, first_seq: int = 1) -> None:
        self.device = device
        self.next_seq = first_seq
        self.count = 0
        self.hash = INITIAL_HASH
        self.pending: bytes | None = None
        self._history: list[_Sent] = []

    @property
    def uncertain(self) -> int:
        """Readings given up without an acknowledgement."""
        return sum(1 for s in self._history if not s.acknowledged)

    def next_reading(self, **fields: Any) -> bytes:
        """The payload of the next reading (or the pending one again, to resend it)."""
        if self.pending is not None:
            return self.pending
        doc = {"device": self.device, "seq": self.next_seq, **fields}
        self.pending = encode_reading(doc)
        return self.pending

    def record(self, result: PostResult) -> bool:
        """File the service's answer to the pending reading; returns whether it is settled.

        A 2.04 settles it, ``applied`` or not: a repeat of a seq the service applied earlier
        (whose first answer was lost) is acknowledged without applying it again.
        """
        if self.pending is None:
            raise ServiceError("no reading is pending")
        if not result.ok:
            return False
        self._settle(acknowledged=True)
        return True

    def abandon(self) -> None:
        """Give up the pending reading: its fate stays unknown until :meth:`verify`."""
        if self.pending is not None:
            self._settle(acknowledged=False)

    def _settle(self, *, acknowledged: bool) -> None:
        assert self.pending is not None
        seq = validate_reading(self.pending).seq
        self._history.append(_Sent(seq, self.pending, acknowledged))
        if acknowledged:
            self.count += 1
            self.hash = chain_hash(self.hash, self.pending)
        self.pending = None
        self.next_seq = seq + 1

    def _candidate_chains(self) -> list[tuple[int, str, int]]:
        """Every (count, hash, abandoned-but-applied) the service could rightly hold."""
        unknown = [i for i, s in enumerate(self._history) if not s.acknowledged]
        out = []
        for mask in itertools.product((False, True), repeat=len(unknown)):
            included = {i for i, inc in zip(unknown, mask, strict=True) if inc}
            h, n = INITIAL_HASH, 0
            for i, s in enumerate(self._history):
                if s.acknowledged or i in included:
                    h = chain_hash(h, s.payload)
                    n += 1
            out.append((n, h, len(included)))
        return out

    def verify(self, state: ServiceState, *, exclusive: bool = False) -> LedgerCheck:
        """Compare with the service's record of this device.

        With ``exclusive`` (this device is the service's only client) the service's global
        counter and hash must agree as well.
        """
        rec = state.devices.get(self.device)
        svc_count, svc_hash = (rec.count, rec.hash) if rec is not None else (0, INITIAL_HASH)

        def verdict(ok: bool, reason: str = "", unack: int = 0) -> LedgerCheck:
            if ok and exclusive and (state.count, state.hash) != (svc_count, svc_hash):
                ok, reason = False, "the global counter/hash differ from this device's own"
            return LedgerCheck(
                matches=ok,
                expected_count=self.count,
                service_count=svc_count,
                expected_hash=self.hash,
                service_hash=svc_hash,
                lost=max(0, self.count - svc_count),
                doubled=max(0, svc_count - self.count - self.uncertain),
                unacknowledged_applied=unack,
                reason=reason,
            )

        if self.uncertain == 0:
            if (svc_count, svc_hash) == (self.count, self.hash):
                return verdict(True)
        elif self.uncertain <= MAX_UNCERTAIN:
            for n, h, unack in self._candidate_chains():
                if (n, h) == (svc_count, svc_hash):
                    return verdict(True, unack=unack)
        else:
            return verdict(False, f"{self.uncertain} readings of unknown fate: cannot verify")
        if svc_count < self.count:
            return verdict(False, f"the service lost {self.count - svc_count} readings")
        if svc_count > self.count + self.uncertain:
            return verdict(False, "the service applied readings more than once")
        return verdict(False, "the service holds different readings (hash mismatch)")
