"""The sensor service: a CoAP server with a measurable memory state, run inside the container.

It keeps ``state_mb`` MiB of random data that a background writer dirties at a set rate, and a
running hash over every reading it applied, so a migration's cost and its correctness show.
Runs with Debian 12's python3 and aiocoap only; the pure helpers are shared with the host side.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

PAGE_SIZE = 4096  # fogmig.platform.base.vocabulary.PAGE_SIZE: this file runs without fogmig
INITIAL_HASH = "0" * 64
CONTENT_FORMAT_JSON = 50
MAX_PAYLOAD = 1024
MAX_DEVICE_LEN = 64
MAX_DEVICES = 1024
"""Devices the service keeps a record of; a new one beyond is refused (5.03), never a known
one evicted: a forgotten device's old readings would be applied again."""
MAX_SEQ = 2**53
"""The highest seq: exact in every JSON reader."""
MAX_SEQ_JUMP = 10_000
"""How far one reading's seq may lead the device's last applied one (a device's first reading:
its seq itself). Bounds what a forged seq does: without it one huge seq made every later
reading of the device a duplicate, forever."""
DEFAULT_STATE_MB = 75
DEFAULT_DIRTY_KBPS = 10
DEFAULT_PORT = 5683
DEFAULT_LOG = "/tmp/sensor.log"
WRITER_PERIOD_S = 0.1
# Window over which the dirty rate is measured; short enough to follow a change of load,
# long enough to smooth the writer's 100 ms steps.
RATE_WINDOW_S = 5.0

log = logging.getLogger("fogmig.sensor")


# ---- pure helpers (shared with clients and tests) -------------------------------------------


def chain_hash(previous: str, payload: bytes) -> str:
    """One step of the running hash: ``sha256(previous_hex_ascii || payload)`` as hex.

    The previous value enters as its 64 hex characters, so anyone holding the same payloads
    (a device's ledger, a test) recomputes the same chain from :data:`INITIAL_HASH`.
    """
    return hashlib.sha256(previous.encode("ascii") + payload).hexdigest()


class InvalidReading(ValueError):
    """A payload that is not a valid reading; the message says why (sent back with 4.00)."""


class DeviceTableFull(ValueError):
    """A reading of a new device when the table holds ``MAX_DEVICES`` (sent back with 5.03)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """A validated reading: who sent it and its per-device sequence number."""

    device: str
    seq: int


def validate_reading(payload: bytes) -> Reading:
    """Parse and check a reading ``{"device": str, "seq": int, ...}``; extra fields are kept
    in the payload (and the hash) but not interpreted."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidReading(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidReading("a reading must be a JSON object")
    device = doc.get("device")
    seq = doc.get("seq")
    if not isinstance(device, str) or not device:
        raise InvalidReading("'device' must be a non-empty string")
    if len(device) > MAX_DEVICE_LEN:
        raise InvalidReading(f"'device' is longer than {MAX_DEVICE_LEN} characters")
    # bool is an int in Python; a reading with "seq": true is malformed.
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise InvalidReading(f"'seq' must be an integer from 0 to {MAX_SEQ}")
    return Reading(device, seq)


def should_apply(last_seq: int | None, seq: int) -> bool:
    """The dedup rule: apply a reading only if its seq is beyond the last applied one."""
    return last_seq is None or seq > last_seq


@dataclass(slots=True)
class DeviceRecord:
    """What the service applied for one device: its own counter and running hash."""

    last_seq: int
    count: int = 0
    hash: str = INITIAL_HASH


@dataclass(slots=True)
class SensorState:
    """The service's logical state: a counter and running hash over the applied readings.

    At most ``max_devices`` devices, each of whose seq moves on by at most ``max_seq_jump``
    per reading.
    """

    count: int = 0
    hash: str = INITIAL_HASH
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    max_devices: int = MAX_DEVICES
    max_seq_jump: int = MAX_SEQ_JUMP
    _json: dict[str, dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    """The devices as ``/state`` shows them, kept until the next applied reading."""

    def apply(self, reading: Reading, payload: bytes) -> bool:
        """Apply a reading once; a repeated or older seq is acknowledged but not applied.

        Raises :class:`InvalidReading` for a seq too far ahead and :class:`DeviceTableFull` for
        a new device that does not fit.
        """
        rec = self.devices.get(reading.device)
        last = None if rec is None else rec.last_seq
        if not should_apply(last, reading.seq):
            return False
        if reading.seq - (last or 0) > self.max_seq_jump:
            raise InvalidReading(
                f"seq {reading.seq} of {reading.device} is more than {self.max_seq_jump} "
                f"ahead of its last one ({last if last is not None else 'none yet'})"
            )
        if rec is None:
            if len(self.devices) >= self.max_devices:
                raise DeviceTableFull(
                    f"the service keeps {self.max_devices} devices and knows no {reading.device!r}"
                )
            rec = self.devices[reading.device] = DeviceRecord(last_seq=reading.seq)
        self._json = None
        rec.last_seq = reading.seq
        rec.count += 1
        rec.hash = chain_hash(rec.hash, payload)
        self.count += 1
        self.hash = chain_hash(self.hash, payload)
        return True

    def devices_json(self) -> dict[str, dict[str, Any]]:
        if self._json is None:
            self._json = {
                name: {"last_seq": r.last_seq, "count": r.count, "hash": r.hash}
                for name, r in sorted(self.devices.items())
            }
        return self._json


def pages_per_second(dirty_kbps: float) -> float:
    """Pages of 4 KiB to change per second to dirty ``dirty_kbps`` KB/s (KB = 1024 bytes)."""
    return dirty_kbps * 1024 / PAGE_SIZE


# ---- memory state and its writer ------------------------------------------------------------


def allocate_state(state_mb: int, chunk: int = 1 << 20) -> bytearray:
    """``state_mb`` MiB of random bytes, filled in chunks so the peak stays at the size."""
    size = state_mb * 1024 * 1024
    buf = bytearray(size)
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        buf[off : off + n] = os.urandom(n)
    return buf


class DirtyWriter:
    """Changes the content of ``dirty_kbps`` KB of pages per second, walking the buffer.

    Each touched page gets a new 8-byte generation number at an offset that moves with the
    generation, so its content really differs from any earlier dump of it.
    """

    def __init__(self, buf: bytearray, dirty_kbps: float) -> None:
        self.buf = buf
        self.pages = len(buf) // PAGE_SIZE
        self.rate = pages_per_second(dirty_kbps)
        self.cursor = 0
        self.generation = 0
        self.total_pages = 0
        self._owed = 0.0
        self._last: float | None = None
        self._window: collections.deque[tuple[float, int]] = collections.deque()

    def step(self, now: float) -> int:
        """Dirty the pages owed since the last step; returns how many were changed."""
        if self.pages == 0 or self.rate <= 0:
            self._last = now
            return 0
        if self._last is None:
            self._last = now
            return 0
        elapsed = now - self._last
        self._last = now
        # A long gap (the process was frozen for a checkpoint) must not cause a burst.
        self._owed += self.rate * min(max(elapsed, 0.0), 1.0)
        n = int(self._owed)
        self._owed -= n
        for _ in range(n):
            self.generation += 1
            off = self.cursor * PAGE_SIZE + (self.generation * 8) % PAGE_SIZE
            struct.pack_into("<Q", self.buf, off, self.generation)
            self.cursor = (self.cursor + 1) % self.pages
        self.total_pages += n
        self._window.append((now, n))
        while self._window and now - self._window[0][0] > RATE_WINDOW_S:
            self._window.popleft()
        return n

    def measured_kbps(self) -> float:
        """KB/s actually dirtied over the last few seconds."""
        if len(self._window) < 2:
            return 0.0
        span = self._window[-1][0] - self._window[0][0]
        # The first entry's pages were owed for the time before the window: leave them out.
        pages = sum(n for _, n in list(self._window)[1:])
        return pages * PAGE_SIZE / 1024 / span if span > 0 else 0.0

    async def run(self) -> None:
        while True:
            self.step(time.monotonic())
            await asyncio.sleep(WRITER_PERIOD_S)


# ---- the CoAP server ------------------------------------------------------------------------


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass(slots=True)
class Service:
    """Everything the resources share: config, logical state, memory state, clocks."""

    state_mb: int
    dirty_kbps: float
    writer: DirtyWriter
    started_at: float
    state: SensorState = field(default_factory=SensorState)
    requests: int = 0

    def state_json(self) -> dict[str, Any]:
        now = time.time()
        devices = self.state.devices_json()
        return {
            "count": self.state.count,
            "hash": self.state.hash,
            "requests": self.requests,
            "state_mb": self.state_mb,
            "dirty_kbps": self.dirty_kbps,
            "dirty_kbps_measured": round(self.writer.measured_kbps(), 3),
            "dirtied_pages": self.writer.total_pages,
            "uptime_s": round(now - self.started_at, 3),
            "started_at": self.started_at,
            "pid": os.getpid(),
            "rss_kb": _rss_kb(),
            "last_seq": {name: d["last_seq"] for name, d in devices.items()},
            "devices": devices,
        }


def _json_message(code: Any, doc: dict[str, Any]) -> Any:
    import aiocoap

    return aiocoap.Message(
        code=code,
        payload=json.dumps(doc, separators=(",", ":")).encode(),
        content_format=CONTENT_FORMAT_JSON,
    )


def build_site(service: Service) -> Any:
    """The CoAP resource tree: POST /sensor, GET /state, GET /ping (aiocoap answers 4.04 and
    4.05)."""
    import aiocoap
    import aiocoap.error
    import aiocoap.resource

    class SensorResource(aiocoap.resource.Resource):  # type: ignore[misc]
        async def render_post(self, request: Any) -> Any:
            service.requests += 1
            payload = bytes(request.payload)
            if len(payload) > MAX_PAYLOAD:
                raise aiocoap.error.RequestEntityTooLarge(
                    f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}"
                )
            if request.opt.content_format != CONTENT_FORMAT_JSON:
                raise aiocoap.error.UnsupportedContentFormat("use application/json (50)")
            try:
                reading = validate_reading(payload)
                applied = service.state.apply(reading, payload)
            except InvalidReading as exc:
                raise aiocoap.error.BadRequest(str(exc)) from None
            except DeviceTableFull as exc:
                raise aiocoap.error.ServiceUnavailable(str(exc)) from None
            if not applied:
                log.info("duplicate %s seq %d acknowledged", reading.device, reading.seq)
            return _json_message(
                aiocoap.CHANGED,
                {"count": service.state.count, "hash": service.state.hash, "applied": applied},
            )

    class StateResource(aiocoap.resource.Resource):  # type: ignore[misc]
        async def render_get(self, request: Any) -> Any:
            return _json_message(aiocoap.CONTENT, service.state_json())

    class PingResource(aiocoap.resource.Resource):  # type: ignore[misc]
        """An empty 2.05 for probes that send many requests a second: it reads no state and
        counts nothing, so probing leaves ``/state`` and the devices' ledgers as they were."""

        async def render_get(self, request: Any) -> Any:
            return aiocoap.Message(code=aiocoap.CONTENT)

    site = aiocoap.resource.Site()
    site.add_resource(["sensor"], SensorResource())
    site.add_resource(["state"], StateResource())
    site.add_resource(["ping"], PingResource())
    return site


async def serve(args: argparse.Namespace) -> None:
    import aiocoap

    started_at = time.time()
    t0 = time.monotonic()
    buf = allocate_state(args.state_mb)
    writer = DirtyWriter(buf, args.dirty_kbps)
    service = Service(
        args.state_mb,
        args.dirty_kbps,
        writer,
        started_at,
        SensorState(max_devices=args.max_devices),
    )
    log.info("allocated %d MiB in %.2f s", args.state_mb, time.monotonic() - t0)
    ctx = await aiocoap.Context.create_server_context(
        build_site(service), bind=(args.host, args.port)
    )
    log.info("listening on [%s]:%d, dirtying %s KB/s", args.host, args.port, args.dirty_kbps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    writer_task = asyncio.create_task(writer.run(), name="dirty-writer")
    try:
        await stop.wait()
    finally:
        writer_task.cancel()
        await ctx.shutdown()
        log.info("stopped after %d readings", service.state.count)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fogmig sensor service (CoAP)")
    p.add_argument("--state-mb", type=int, default=DEFAULT_STATE_MB, help="MiB of memory state")
    p.add_argument("--dirty-kbps", type=float, default=DEFAULT_DIRTY_KBPS, help="KB/s dirtied")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-devices", type=int, default=MAX_DEVICES, help="devices kept at most")
    p.add_argument("--host", default="::", help="bind address (default: all, IPv4 and IPv6)")
    p.add_argument("--log", default=DEFAULT_LOG, help="log file (stdout may be /dev/null)")
    p.add_argument("--check", action="store_true", help="print aiocoap's version and exit")
    args = p.parse_args(argv)
    if args.state_mb < 0 or args.dirty_kbps < 0:
        p.error("--state-mb and --dirty-kbps must not be negative")
    if args.max_devices < 1:
        p.error("--max-devices must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        import aiocoap.meta

        print(aiocoap.meta.version)
        return 0
    handler: logging.Handler
    try:
        handler = logging.FileHandler(args.log)
    except OSError:
        # A read-only or missing /tmp must not stop the service; stderr may be /dev/null.
        handler = logging.StreamHandler(sys.stderr)
    logging.basicConfig(
        handlers=[handler],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
