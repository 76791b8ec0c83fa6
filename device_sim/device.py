"""One simulated IoT device: posts a reading to its service on its current gateway every beat.

A reading is resent with the same seq until the service acknowledges it (the service applies
a seq once), so a migration costs time but no data; the device's ledger, held against the
service's ``/state`` after every disruption, shows whether that held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from fogmig.device_sim.coap import Answer, CoapPort
from fogmig.device_sim.events import (
    ContinuityCheck,
    FleetEvent,
    Outage,
    RequestKind,
    RequestOutcome,
    RequestRecord,
    Roam,
)
from fogmig.device_sim.roaming import Roaming, Static
from fogmig.device_sim.timeline import OutageTracker, default_gap_s
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.nodes import check_node_name, check_service_name
from fogmig.platform.bus.topics import DEVICE_NAME_PATTERN
from fogmig.services.client import DeviceLedger, DeviceSummary, PostResult, ServiceState
from fogmig.services.sensor import INITIAL_HASH, chain_hash

log = logging.getLogger(__name__)

# Answers that say the reading itself is wrong: resending the same bytes cannot help.
PERMANENT_CODES = frozenset({"4.00", "4.13", "4.15"})


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A device, the service it uses (name and UDP port) and where it starts and roams."""

    name: str
    service: str
    port: int
    gateway: str
    roaming: Roaming = field(default_factory=Static)

    def __post_init__(self) -> None:
        if not re.fullmatch(DEVICE_NAME_PATTERN, self.name):
            raise ConfigError(
                f"invalid device name {self.name!r}: lowercase letters, digits, '-' and '_'"
            )
        check_service_name(self.service)
        check_node_name(self.gateway)
        if not 0 < self.port < 65536:
            raise ConfigError(f"invalid port {self.port} for device {self.name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSettings:
    """How every device of a fleet talks to its service."""

    interval_s: float = 1.0
    """One reading per interval (the paper's client sends one per second)."""
    timeout_s: float = 2.0
    """A request without an answer by then is a timeout; the reading is resent next beat."""
    ack_timeout_s: float = 0.4
    """CoAP's first retransmission comes after this (times 1 to 1.5); as many follow as fit
    into ``timeout_s`` (see :func:`fogmig.device_sim.coap.retransmission_plan`)."""
    check_every_s: float | None = 30.0
    """Verify the service's state at least this often (None: only after disruptions)."""
    gap_s: float | None = None
    """Good answers further apart than this are an outage (None: two beats, see timeline)."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s", "ack_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.check_every_s is not None and not self.check_every_s > 0:
            raise ConfigError(f"check_every_s must be positive, got {self.check_every_s}")

    @property
    def outage_gap_s(self) -> float:
        return self.gap_s if self.gap_s is not None else default_gap_s(self.interval_s)


class ResumedLedger(DeviceLedger):
    """A :class:`DeviceLedger` that continues what the service already holds for the device.

    A service outlives a run of the simulator; the next run starts from the service's count,
    hash and last seq for this device instead of from nothing.
    """

    def __init__(self, device: str, baseline: DeviceSummary | None = None) -> None:
        super().__init__(device, first_seq=1 if baseline is None else baseline.last_seq + 1)
        self.base_count = 0 if baseline is None else baseline.count
        self.base_hash = INITIAL_HASH if baseline is None else baseline.hash
        self.count, self.hash = self.base_count, self.base_hash

    def _candidate_chains(self) -> list[tuple[int, str, int]]:
        unknown = [i for i, s in enumerate(self._history) if not s.acknowledged]
        out = []
        for mask in itertools.product((False, True), repeat=len(unknown)):
            included = {i for i, inc in zip(unknown, mask, strict=True) if inc}
            h, n = self.base_hash, self.base_count
            for i, s in enumerate(self._history):
                if s.acknowledged or i in included:
                    h = chain_hash(h, s.payload)
                    n += 1
            out.append((n, h, len(included)))
        return out


def _post_result(answer: Answer) -> PostResult:
    if answer.outcome is not RequestOutcome.OK:
        return PostResult(answer.code or "timeout", answer.latency_s, message=answer.detail)
    try:
        body = json.loads(answer.payload)
        return PostResult(
            answer.code,
            answer.latency_s,
            int(body["count"]),
            str(body["hash"]),
            bool(body["applied"]),
        )
    except (ValueError, KeyError, TypeError):
        # The service said 2.xx: the reading is acknowledged even if the body is odd.
        return PostResult(answer.code, answer.latency_s, message="malformed answer body")


class Device:
    """The loop of one device. ``emit`` receives every event as it happens."""

    def __init__(
        self,
        config: DeviceConfig,
        *,
        coap: CoapPort | None,
        addresses: Mapping[str, str],
        settings: RequestSettings,
        emit: Callable[[FleetEvent], None],
        shared_service: bool = False,
        seed: int = 0,
    ) -> None:
        if config.gateway not in addresses:
            raise ConfigError(
                f"device {config.name} starts on unknown gateway {config.gateway}; "
                f"known: {', '.join(sorted(addresses))}"
            )
        self.config = config
        self.name = config.name
        self.service = config.service
        self.gateway = config.gateway
        self.settings = settings
        self.records: list[RequestRecord] = []
        self.outages: list[Outage] = []
        self.checks: list[ContinuityCheck] = []
        self.roams: list[Roam] = []
        self.ledger: ResumedLedger | None = None
        self.exclusive = False
        self.coap = coap
        self._addresses = addresses
        self._emit = emit
        self._shared = shared_service
        self._tracker = OutageTracker(gap_s=settings.outage_gap_s)
        self._attempt = 0
        self._check_due: str | None = None
        self._last_check = time.monotonic()
        self._rng = random.Random(seed)
        self._value = 20.0

    # --- moving ------------------------------------------------------------------------------

    def move_to(self, gateway: str, *, published: bool = False) -> Roam:
        """Attach to ``gateway`` from the next request on; returns the event (not emitted)."""
        if gateway not in self._addresses:
            raise ConfigError(f"device {self.name} cannot roam to unknown gateway {gateway}")
        roam = Roam(self.name, self.service, time.time(), self.gateway, gateway, published)
        if gateway != self.gateway:
            self.gateway = gateway
            self._check_due = self._check_due or "roam"
        return roam

    def record_roam(self, roam: Roam) -> None:
        self.roams.append(roam)
        self._emit(roam)

    def migration_seen(self) -> None:
        """The service moved: verify its state after the next good answer."""
        self._check_due = "migration"

    # --- requests ----------------------------------------------------------------------------

    async def _send(
        self, kind: RequestKind, method: str, path: str, payload: bytes, seq: int | None
    ) -> tuple[RequestRecord, Answer]:
        gateway = self.gateway
        address = self._addresses[gateway]
        sent_at = time.time()
        if self.coap is None:
            raise ConfigError(f"device {self.name} has no CoAP port to send with")
        answer = await self.coap.request(
            method,
            address,
            self.config.port,
            path,
            payload=payload,
            timeout=self.settings.timeout_s,
        )
        applied = None
        if kind is RequestKind.POST and answer.outcome is RequestOutcome.OK:
            applied = _post_result(answer).applied
        record = RequestRecord(
            device=self.name,
            request=kind,
            seq=seq,
            attempt=self._attempt if kind is RequestKind.POST else 1,
            service=self.service,
            gateway=gateway,
            address=address,
            port=self.config.port,
            sent_at=sent_at,
            latency_s=answer.latency_s,
            outcome=answer.outcome,
            code=answer.code,
            applied=applied,
            detail=answer.detail,
        )
        self.records.append(record)
        self._emit(record)
        return record, answer

    async def _read_state(self) -> ServiceState | str:
        """The service's state, or why it could not be read."""
        _, answer = await self._send(RequestKind.STATE, "GET", "state", b"", None)
        if answer.outcome is not RequestOutcome.OK:
            return answer.detail or answer.code or "timeout"
        try:
            return ServiceState.model_validate_json(answer.payload)
        except ValidationError as exc:
            return f"malformed state: {exc.error_count()} problem(s)"

    async def _baseline(self) -> bool:
        """Learn what the service already holds for this device; False if it cannot be read."""
        state = await self._read_state()
        if isinstance(state, str):
            return False
        own = state.devices.get(self.name)
        self.ledger = ResumedLedger(self.name, own)
        own_count, own_hash = (own.count, own.hash) if own else (0, INITIAL_HASH)
        # The global counter is part of the check only while nobody else writes to the service.
        self.exclusive = not self._shared and (state.count, state.hash) == (own_count, own_hash)
        return True

    def _reading_fields(self) -> dict[str, float]:
        self._value += self._rng.gauss(0.0, 0.1)
        return {"t": round(time.time(), 3), "value": round(self._value, 2)}

    async def _post_reading(self) -> None:
        ledger = self.ledger
        assert ledger is not None
        fresh = ledger.pending is None
        payload = ledger.next_reading(**self._reading_fields())
        self._attempt = 1 if fresh else self._attempt + 1
        seq = ledger.next_seq
        record, answer = await self._send(RequestKind.POST, "POST", "sensor", payload, seq)
        if answer.outcome is RequestOutcome.OK:
            ledger.record(_post_result(answer))
        elif answer.code in PERMANENT_CODES:
            log.warning("device %s: reading %d refused (%s), dropped", self.name, seq, answer.code)
            ledger.abandon()
        outage = self._tracker.observe(record)
        if outage is not None:
            self.outages.append(outage)
            self._emit(outage)
            self._check_due = self._check_due or "outage"

    async def check(self, reason: str) -> ContinuityCheck:
        """Read ``/state`` and hold it against the ledger; emits and returns the verdict."""
        ledger = self.ledger
        assert ledger is not None
        state = await self._read_state()
        at = time.time()
        if isinstance(state, str):
            result = ContinuityCheck(
                self.name, self.service, self.gateway, at, reason, verified=False, detail=state
            )
        else:
            v = ledger.verify(state, exclusive=self.exclusive)
            result = ContinuityCheck(
                self.name,
                self.service,
                self.gateway,
                at,
                reason,
                verified=True,
                matches=v.matches,
                expected_count=v.expected_count,
                service_count=v.service_count,
                lost=v.lost,
                doubled=v.doubled,
                unacknowledged_applied=v.unacknowledged_applied,
                detail=v.reason,
            )
        self.checks.append(result)
        self._emit(result)
        return result

    async def run(self, stop: asyncio.Event, *, delay_s: float = 0.0) -> None:
        """Send readings until ``stop`` is set, then verify the service's state once more."""
        loop = asyncio.get_running_loop()
        interval = self.settings.interval_s
        next_at = loop.time() + delay_s
        while not stop.is_set():
            if await _wait(stop, next_at - loop.time()):
                break
            # Without a baseline nothing can be verified, so nothing is posted before it.
            if self.ledger is not None or await self._baseline():
                await self._post_reading()
                await self._maybe_check()
            now = loop.time()
            # Behind after a timeout: send at once, then keep the beat (no burst).
            next_at = max(next_at + interval, now)
        if self.ledger is not None:
            # A reading left unacknowledged may or may not have been applied: say so.
            self.ledger.abandon()
            await self.check("final")

    async def _maybe_check(self) -> None:
        assert self.ledger is not None
        if self.ledger.pending is not None:
            return  # the service is not answering; check once it is
        every = self.settings.check_every_s
        reason = self._check_due
        if reason is None and every is not None and time.monotonic() - self._last_check >= every:
            reason = "periodic"
        if reason is None:
            return
        result = await self.check(reason)
        if result.verified:
            self._check_due = None
            self._last_check = time.monotonic()


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` comes first; returns whether it did."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
