"""The controller on the bus: the asyncio side of :class:`ControllerCore`.

:class:`Controller` subscribes to the nodes' status, presence and events and the devices'
attachments, feeds them to the core, sends the commands it asks for, and writes the JSON-lines
decision log. :func:`run_controller` runs one on the testbed until SIGTERM or SIGINT.

Log levels: INFO decisions, accepted commands, finished migrations (predicted against measured),
drains; WARNING rejected or unanswered commands, rollbacks, migrations given up or lost;
DEBUG holds (a move that cannot happen now, and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fogmig.platform.base import fmt, paths
from fogmig.platform.base.errors import BusError, ConfigError, FogmigError
from fogmig.platform.bus.client import Bus, CommandRejectedError, Subscription
from fogmig.platform.bus.schemas import (
    BusMessage,
    Cleared,
    Decision,
    DeviceAttach,
    MigrationDone,
    MigrationProgress,
    NodeStatus,
    ServicePresence,
)
from fogmig.platform.bus.topics import TopicKind, parse_topic, topics
from fogmig.platform.controller.access import open_testbed_bus
from fogmig.platform.controller.actions import (
    WARNINGS,
    Action,
    ControllerEvent,
    EventKind,
    Launch,
)
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.core import ControllerCore
from fogmig.platform.controller.devices import DeviceDirectory, attach_refusal
from fogmig.platform.controller.saved import give_back, take
from fogmig.platform.controller.store import ControllerStore, SaveSchedule, durable_key

log = logging.getLogger(__name__)

EventCallback = Callable[[ControllerEvent], None]


@dataclass(slots=True)
class ControllerStats:
    """Counters of what the controller has processed (for the benchmark and a live view)."""

    attach_events: int = 0
    status_events: int = 0
    presence_events: int = 0
    done_events: int = 0
    decisions: int = 0
    accepted: int = 0
    rejected: int = 0
    send_failed: int = 0
    dropped: int = 0
    """Messages the bus dropped because the controller did not keep up."""
    rejected_messages: int = 0
    """Messages whose handling failed: each rejected with one log line, the loop went on."""
    refused_attach: int = 0
    """Attachments of unknown devices or naming a service their device does not use."""

    def to_dict(self) -> dict[str, int]:
        return {
            "attach_events": self.attach_events,
            "status_events": self.status_events,
            "presence_events": self.presence_events,
            "done_events": self.done_events,
            "decisions": self.decisions,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "send_failed": self.send_failed,
            "dropped": self.dropped,
            "rejected_messages": self.rejected_messages,
            "refused_attach": self.refused_attach,
        }


class _Stopped(Exception):
    """Ends the controller's task group on a requested stop."""


class Controller:
    """The controller on a bus: ``await Controller(config, bus, devices=...).run(stop)``.

    ``devices`` says which service each device may speak for (attachments naming another, or
    of a device it does not know, are refused); ``on_event`` receives every
    :class:`ControllerEvent` (decisions, outcomes, holds, drain progress and migration
    progress) for a live view; ``ready`` is set once the subscriptions
    are in place.
    """

    def __init__(
        self,
        config: ControllerConfig,
        bus: Bus,
        *,
        devices: DeviceDirectory,
        on_event: EventCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.bus = bus
        self.devices = devices
        self.core = ControllerCore(config, wall_clock=wall_clock)
        self.stats = ControllerStats()
        self.ready = asyncio.Event()
        self._on_event = on_event
        self._clock = clock
        self._wall = wall_clock
        self._wake = asyncio.Event()
        self._sleep_until: float | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._log_file: IO[str] | None = None
        self._subs: list[Subscription] = []
        self._halt = asyncio.Event()
        self._error: FogmigError | None = None
        self.store = (
            ControllerStore(path=config.state_file, site=config.site)
            if config.state_file is not None
            else None
        )
        """The state file, if the controller keeps one."""
        self._schedule = SaveSchedule(debounce_s=config.save_debounce_s)
        self._resend: list[Action] = []

    def counters(self) -> dict[str, int]:
        """The counters now, including messages the bus had to drop so far."""
        if self._subs:
            self.stats.dropped = sum(s.dropped for s in self._subs)
        return self.stats.to_dict()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises :class:`BusError` if the bus closes under it."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.config.decision_log is not None:
                    path = self.config.decision_log
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._log_file = stack.enter_context(path.open("a", buffering=1))
                # After the log is open: what was resumed or set aside goes into it too.
                self._resume()
                # Status and presence first: their retained messages give the picture the
                # first attach events are judged against.
                for pattern in (
                    topics.status(),
                    topics.service(),
                    topics.events(),
                    topics.attach(),
                ):
                    sub = await stack.enter_async_context(self.bus.subscribe(pattern))
                    self._subs.append(sub)
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    for sub in self._subs:
                        tg.create_task(self._read(sub, stop), name=f"controller:{sub.pattern}")
                    tg.create_task(self._clock_loop(), name="controller:clock")
                    self._apply(self._resend)
                    self._resend = []
                    stopped = tg.create_task(stop.wait())
                    halted = tg.create_task(self._halt.wait())
                    self.ready.set()
                    await asyncio.wait({stopped, halted}, return_when=asyncio.FIRST_COMPLETED)
                    raise _Stopped
        except* _Stopped:
            pass
        finally:
            self._tg = None
            self._persist(self._clock(), force=True)
            self.stats.dropped = sum(s.dropped for s in self._subs)
            self._subs.clear()
            self._log_file = None
        if self._error is not None:
            raise self._error

    # --- input -------------------------------------------------------------------------

    async def _read(self, sub: Subscription, stop: asyncio.Event) -> None:
        async for topic, msg in sub:
            self.handle(topic, msg)
        if not stop.is_set() and self._error is None:
            self._error = BusError("the bus closed under the controller")
            self._halt.set()

    def handle(self, topic: str, msg: BusMessage | Cleared) -> None:
        """One message from the bus into the core, and what the core asks for out.

        Whatever one message makes fail, it is rejected with one (truncated) log line and the
        controller goes on with the next: a sender must not be able to stop the controller.
        """
        now = self._clock()
        try:
            actions = self._dispatch(topic, msg, now)
            actions += self.core.tick(now)
            self._apply(actions)
            self._persist(now)
            self._rearm()
        except Exception as exc:
            self.stats.rejected_messages += 1
            log.warning("controller: rejected a message on %s: %s", topic, fmt.error(exc))
            log.debug("controller: the rejected message: %r", msg, exc_info=exc)

    def _dispatch(self, topic: str, msg: BusMessage | Cleared, now: float) -> list[Action]:
        core, stats = self.core, self.stats
        match msg:
            case DeviceAttach():
                stats.attach_events += 1
                nodes = self.bus.known_nodes or ()
                refusal = attach_refusal(parse_topic(topic).device, msg, self.devices, nodes=nodes)
                if refusal is not None:
                    stats.refused_attach += 1
                    return [ControllerEvent(EventKind.REFUSED, self._wall(), refusal)]
                return core.on_attach(msg, now)
            case NodeStatus():
                stats.status_events += 1
                return core.on_status(msg, now)
            case ServicePresence():
                stats.presence_events += 1
                return core.on_presence(msg, now)
            case MigrationDone():
                stats.done_events += 1
                return core.on_done(msg, now)
            case MigrationProgress():
                self._emit(
                    ControllerEvent(
                        EventKind.PROGRESS,
                        self._wall(),
                        f"{msg.service}: {msg.phase} {msg.bytes_done}/{msg.bytes_total} B",
                        msg.service,
                        msg.node,
                        msg.model_dump(mode="json"),
                    )
                )
            case Cleared(ref) if ref.kind is TopicKind.STATUS and ref.node is not None:
                return core.on_status_cleared(ref.node, now)
            case _:
                pass
        return []

    # --- the state file --------------------------------------------------------------

    def _resume(self) -> None:
        """Take the saved state, if any, before the first message."""
        if self.store is None:
            return
        saved, error = self.store.load()
        if error is not None:
            log.error("controller: %s (%s)", error, error.hint)
            self._emit(
                ControllerEvent(
                    EventKind.STATE_REJECTED,
                    self._wall(),
                    str(error),
                    data={"kept": str(error.kept) if error.kept else None, "hint": error.hint},
                )
            )
        if saved is None:
            return
        self._resend = give_back(self.core, saved, self._clock())
        core = self.core
        self._emit(
            ControllerEvent(
                EventKind.RESUMED,
                self._wall(),
                f"resumed from {self.store.path}: {len(core.registry.attachments)} device(s), "
                f"{len(core.pending)} move(s) queued, {len(core.inflight)} in flight "
                f"({len(self._resend)} to ask again), "
                f"{len(core.draining)} node(s) draining",
                data={
                    "devices": len(core.registry.attachments),
                    "pending": sorted(core.pending),
                    "inflight": sorted(core.inflight),
                    "draining": sorted(core.draining),
                },
            )
        )
        self._schedule.written(durable_key(core), core.registry.attach_revision)

    def _persist(self, now: float, *, force: bool = False) -> None:
        """Write the state when the schedule says so; before any command it names is sent
        (the sends run as tasks after this returns)."""
        if self.store is None:
            return
        core = self.core
        key, revision = durable_key(core), core.registry.attach_revision
        when = self._schedule.decide(key, revision, now)
        if when == "no" or (when == "later" and not force):
            return
        try:
            self.store.save(take(core, now, site=self.config.site))
        except (OSError, ValueError) as exc:
            log.error("controller: its state was not saved to %s: %s", self.store.path, exc)
            return
        self._schedule.written(key, revision)

    def _next_due(self) -> float | None:
        due, save = self.core.next_due(), self._schedule.due
        if due is None or (save is not None and save < due):
            return save
        return due

    # --- output ------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Launch):
                if not action.resend:
                    self.stats.decisions += 1
                assert self._tg is not None
                self._tg.create_task(self._send(action), name=f"send:{action.command.service}")
            else:
                self._emit(action)

    async def _send(self, launch: Launch) -> None:
        cmd = launch.command
        assert self._tg is not None
        if not launch.resend:
            # Alongside, not before: the command must not wait for the decision's PUBACK.
            self._tg.create_task(self._publish_decision(launch.decision))
        try:
            await self.bus.request(launch.source, cmd, self.config.ack_timeout_s)
        except CommandRejectedError as exc:
            actions = self.core.on_rejected(
                cmd.service,
                cmd.command_id,
                exc.ack.reason or "no reason given",
                self._clock(),
                error_type=exc.ack.error_type,
            )
            # A command sent again after a restart and refused as a replay was taken before.
            taken = any(
                isinstance(a, ControllerEvent) and a.kind is EventKind.ACCEPTED for a in actions
            )
            if taken:
                self.stats.accepted += 1
            else:
                self.stats.rejected += 1
        except FogmigError as exc:
            self.stats.send_failed += 1
            actions = self.core.on_send_failed(cmd.service, cmd.command_id, str(exc), self._clock())
        else:
            self.stats.accepted += 1
            actions = self.core.on_ack(cmd.service, cmd.command_id, self._clock())
        try:
            actions += self.core.tick(self._clock())
            self._apply(actions)
            self._persist(self._clock())
            self._rearm()
        except Exception as exc:
            log.warning("controller: after the answer to %s: %s", cmd.command_id, fmt.error(exc))

    async def _publish_decision(self, decision: Decision) -> None:
        try:
            await self.bus.publish(topics.decisions(), decision)
        except FogmigError as exc:
            log.warning("controller: decision on %s not published: %s", decision.service, exc)

    def _emit(self, event: ControllerEvent) -> None:
        if event.kind is not EventKind.PROGRESS:
            level = logging.WARNING if event.kind in WARNINGS else logging.INFO
            if event.kind is EventKind.HOLD:
                level = logging.DEBUG
            log.log(level, "controller %s: %s", event.kind.value, event.message)
            if self._log_file is not None:
                self._log_file.write(event.to_json() + "\n")
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("the controller's event callback failed")

    # --- timers ------------------------------------------------------------------------

    def _rearm(self) -> None:
        """Wake the clock loop if the core now has work earlier than the loop sleeps."""
        due = self._next_due()
        if due is not None and (self._sleep_until is None or due < self._sleep_until):
            self._wake.set()

    async def _clock_loop(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            try:
                self._apply(self.core.tick(now))
                self._persist(now)
            except Exception as exc:
                log.warning("controller: a timer failed: %s", fmt.error(exc))
            due = self._next_due()
            self._sleep_until = due
            timeout = None if due is None else max(0.0, due - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)


@contextlib.contextmanager
def single_instance(path: Path) -> Iterator[None]:
    """One controller per machine: two would send competing commands for the same services."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(
                f"another controller is running (pid {other})", hint=f"lock file {path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def run_controller(
    config: ControllerConfig, *, on_event: EventCallback | None = None
) -> None:
    """Run the controller on the testbed until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from fogmig.platform.testbed.devices import TestbedDevices

    with single_instance(paths.run_dir() / "controller.lock"):
        async with open_testbed_bus("controller") as bus:
            controller = Controller(config, bus, devices=TestbedDevices(), on_event=on_event)
            await controller.run(stop)
