"""A fleet of simulated devices, each with its own bus connection and its own CoAP socket.

The library face of ``fogmig device-sim``: ``DeviceFleet(devices=..., gateways=..., buses=...,
out=...)``, ``await fleet.run(duration)``, ``on_event`` for a live view, ``summary()``. It moves
the devices on their roaming plans, announces every attachment on the bus and listens there
for migrations of the devices' services.

Log levels: WARNING an attachment that could not be published, a failing event callback;
INFO moves and migrations seen; DEBUG every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from fogmig.device_sim.coap import AiocoapPort, CoapPort, CoapThread
from fogmig.device_sim.device import Device, DeviceConfig, RequestSettings
from fogmig.device_sim.events import FleetEvent, MigrationSeen, RequestRecord, event_dict
from fogmig.device_sim.summary import FleetSummary, build_summary
from fogmig.device_sim.timeline import TimelineWriter
from fogmig.platform.base.errors import BusError, ConfigError
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import DeviceAttach, MigrationDone
from fogmig.platform.bus.topics import SchemaError, topics

log = logging.getLogger(__name__)

TIMELINE_FILE = "timeline.csv"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
ATTACH_TIMEOUT_S = 5.0

EventHandler = Callable[[FleetEvent], None]


def migration_seen(done: MigrationDone) -> MigrationSeen:
    """The device-side view of a node's MigrationDone event."""
    record = done.record
    return MigrationSeen(
        migration_id=done.migration_id,
        service=done.service,
        technique=record.technique,
        source=record.source,
        destination=record.destination,
        outcome=done.outcome,
        started_at=record.started_at,
        finished_at=record.finished_at,
        downtime_s=record.downtime_s,
        total_time_s=record.total_time_s,
    )


class DeviceFleet:
    """Devices that post to their services on their current gateways and measure what they see.

    ``gateways`` maps each gateway's name to its data address. ``buses`` (optional, opened by
    the caller) gives every device its own connection, with its own certificate: the broker
    lets a device announce only its own attachment. The first one also carries the migration
    events; without buses the devices still roam, silently. ``out`` receives
    ``timeline.csv``, ``events.jsonl`` and ``summary.json``.
    ``netns`` makes the devices' CoAP sockets in that network namespace (the device host's),
    so a caller outside it can still run the fleet in-process; ``port`` replaces the real CoAP
    contexts (tests).
    """

    def __init__(
        self,
        *,
        devices: Sequence[DeviceConfig],
        gateways: Mapping[str, str],
        buses: Mapping[str, Bus] | None = None,
        out: Path | None = None,
        settings: RequestSettings | None = None,
        on_event: EventHandler | None = None,
        netns: str | None = None,
        port: CoapPort | None = None,
        seed: int = 0,
    ) -> None:
        if not devices:
            raise ConfigError("a fleet needs at least one device")
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ConfigError(f"device names repeat: {', '.join(names)}")
        ports: dict[str, set[int]] = {}
        for d in devices:
            ports.setdefault(d.service, set()).add(d.port)
        for service, found in ports.items():
            if len(found) > 1:
                raise ConfigError(f"service {service} is given two ports: {sorted(found)}")
        self.settings = settings or RequestSettings()
        self.gateways = dict(gateways)
        self.out = out
        if buses is not None:
            lacking = [n for n in names if n not in buses]
            if lacking:
                raise ConfigError(f"no bus connection for device(s) {', '.join(lacking)}")
        self.buses = dict(buses) if buses is not None else None
        self.netns = netns
        self.migrations: list[MigrationSeen] = []
        self.attach_published = 0
        self.attach_failed = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._on_event = on_event
        self._port = port
        self._stop = asyncio.Event()
        self._timeline: TimelineWriter | None = None
        self._events: IO[str] | None = None
        users = [d.service for d in devices]
        self.devices = [
            Device(
                config,
                coap=port,
                addresses=self.gateways,
                settings=self.settings,
                emit=self._emit,
                shared_service=users.count(config.service) > 1,
                seed=seed + i,
            )
            for i, config in enumerate(devices)
        ]

    # --- events ------------------------------------------------------------------------------

    def _emit(self, event: FleetEvent) -> None:
        if isinstance(event, RequestRecord):
            if self._timeline is not None:
                self._timeline.write(event)
            log.debug("%s", event)
        elif self._events is not None:
            self._events.write(json.dumps(event_dict(event)) + "\n")
            self._events.flush()
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("the fleet's event callback failed on %s", type(event).__name__)

    # --- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """End the run: every device finishes its request, checks continuity once more, stops."""
        self._stop.set()

    async def run(self, duration: float | None = None) -> FleetSummary:
        """Run until ``duration`` seconds have passed (None: until :meth:`stop`); return the
        summary (also written to ``out``)."""
        if self.started_at is not None:
            raise ConfigError("a DeviceFleet runs once; make a new one")
        if duration is not None and not duration > 0:
            raise ConfigError(f"the duration must be positive, got {duration}")
        self.started_at = time.time()
        async with contextlib.AsyncExitStack() as stack:
            if self._port is None:
                thread = await stack.enter_async_context(CoapThread.running(netns=self.netns))
            for device in self.devices:
                device.coap = self._port or await stack.enter_async_context(
                    AiocoapPort.open(thread, ack_timeout_s=self.settings.ack_timeout_s)
                )
            stack.enter_context(self._files())
            await self._run_devices(duration)
        self.finished_at = time.time()
        summary = self.summary()
        if self.out is not None:
            (self.out / SUMMARY_FILE).write_text(summary.model_dump_json(indent=2) + "\n")
        return summary

    @contextlib.contextmanager
    def _files(self) -> Iterator[None]:
        if self.out is None:
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._timeline = TimelineWriter(self.out / TIMELINE_FILE)
        self._events = (self.out / EVENTS_FILE).open("w")
        try:
            yield
        finally:
            self._timeline.close()
            self._events.close()
            self._timeline = self._events = None

    async def _run_devices(self, duration: float | None) -> None:
        spread = self.settings.interval_s / len(self.devices)
        async with self._watching_migrations(), asyncio.TaskGroup() as tg:
            helpers = [
                tg.create_task(self._roam(device), name=f"roam:{device.name}")
                for device in self.devices
            ]
            if duration is not None:
                helpers.append(tg.create_task(self._stop_after(duration), name="fleet-timer"))
            # Staggered starts: a fleet must not send its readings in one burst each beat.
            loops = [
                tg.create_task(device.run(self._stop, delay_s=i * spread), name=device.name)
                for i, device in enumerate(self.devices)
            ]
            await asyncio.wait(loops)
            for task in helpers:
                task.cancel()

    async def _stop_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop()

    # --- roaming -----------------------------------------------------------------------------

    async def _publish_attach(self, device: Device) -> bool:
        if self.buses is None:
            return False
        attach = DeviceAttach(
            device=device.name, gateway=device.gateway, at=time.time(), service=device.service
        )
        try:
            await self.buses[device.name].publish(
                topics.attach(device.name), attach, timeout=ATTACH_TIMEOUT_S
            )
        except (BusError, SchemaError) as exc:
            self.attach_failed += 1
            log.warning(
                "device %s: attachment to %s not published: %s", device.name, attach.gateway, exc
            )
            return False
        self.attach_published += 1
        return True

    async def _roam(self, device: Device) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        roam = device.move_to(device.gateway)
        published = await self._publish_attach(device)
        device.record_roam(dataclasses.replace(roam, from_gateway=None, published=published))
        for hop in device.config.roaming.hops(device.gateway):
            # A stopping fleet moves no more: its final check must ask where it last was.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, t0 + hop.at_s - loop.time()))
            if self._stop.is_set():
                return
            roam = device.move_to(hop.gateway)
            log.info("device %s: %s -> %s", device.name, roam.from_gateway, roam.to_gateway)
            published = await self._publish_attach(device)
            device.record_roam(dataclasses.replace(roam, published=published))

    # --- migrations --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _watching_migrations(self) -> AsyncIterator[None]:
        if not self.buses:
            yield
            return
        bus = next(iter(self.buses.values()))
        async with bus.subscribe(topics.events()) as events:
            task = asyncio.create_task(self._watch(events), name="fleet-migrations")
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch(self, events: AsyncIterator[Any]) -> None:
        services = {d.service for d in self.devices}
        async for _, msg in events:
            if not isinstance(msg, MigrationDone) or msg.service not in services:
                continue
            seen = migration_seen(msg)
            log.info("migration %s of %s: %s", seen.migration_id, seen.service, seen.outcome)
            self.migrations.append(seen)
            self._emit(seen)
            for device in self.devices:
                if device.service == msg.service:
                    device.migration_seen()

    # --- results -----------------------------------------------------------------------------

    def summary(self) -> FleetSummary:
        """The figures so far (during a run too, for a live view)."""
        now = time.time()
        return build_summary(
            started_at=self.started_at or now,
            finished_at=self.finished_at or now,
            interval_s=self.settings.interval_s,
            devices=[(d.name, d.service, d.config.port, d.gateway) for d in self.devices],
            records=sorted((r for d in self.devices for r in d.records), key=lambda r: r.sent_at),
            outages=[o for d in self.devices for o in d.outages],
            checks=[c for d in self.devices for c in d.checks],
            roams=[r for d in self.devices for r in d.roams],
            migrations=self.migrations,
            attach_published=self.attach_published,
            attach_failed=self.attach_failed,
        )
