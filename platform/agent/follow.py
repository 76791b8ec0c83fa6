"""Following services through their migrations: presences in, forwarding rules and holds out.

Every agent keeps a :class:`~fogmig.platform.agent.presence.PresenceBook` of the services'
retained presences and forwards each service's UDP port to the node of its winning presence.
:class:`Follow` also implements the migration's :class:`~fogmig.platform.agent.hooks.
HandoverHooks`, so the devices' traffic moves with the service instead of at the commit:

1. ``freezing`` (source): publish ``moving`` to the destination, wait (bounded) until the
   destination holds and this gateway forwards there, then let the freeze go ahead.
2. The destination, on seeing it, opens a :class:`~fogmig.platform.agent.holding.HoldRelay` on
   the port, drops its own rule for the port and publishes ``holding``, which outranks
   ``moving``: every gateway forwards the port to it at once (one ``iptables-restore``, the
   port's conntrack entries dropped), so nothing reaches the frozen source.
3. ``running_here`` (destination, once the restored copy runs, lazy pages or not): release
   the hold (the held datagrams reach the service as from their senders) and publish
   ``running``. ``gave_up`` discards the hold and clears the destination's presence;
   ``resumed_here`` (source, after a rollback) publishes ``running`` above everything seen, so
   every gateway switches back; ``owned`` (commit) confirms, idempotently.

A hook never raises into the migration: what fails is logged, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fogmig.platform.agent.forwarding import Location
from fogmig.platform.agent.holding import HoldRelay, HoldSettings, HoldStats
from fogmig.platform.agent.presence import PresenceBook
from fogmig.platform.base import fmt
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import BusMessage, PresenceState, ServicePresence
from fogmig.platform.bus.topics import topics

log = logging.getLogger(__name__)

# Bounds on what a long-running agent remembers of past hand-overs.
HANDLED_KEPT = 1024
RELEASES_KEPT = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class FollowSettings:
    """How long the hand-over may wait, and the bounds of a hold."""

    holding_wait_s: float = 1.0
    """The longest ``freezing`` waits for the destination to hold (then the freeze goes on)."""
    switch_grace_s: float = 0.05
    """Once the destination holds, how much longer the source serves its other gateways'
    old flows before it switches too (they switch on the same message; this covers the
    spread of their rule updates)."""
    publish_wait_s: float = 1.0
    """The longest a hook waits for its presence to reach the broker (it goes on behind)."""
    sync_quiet_s: float = 0.2
    """After subscribing, the retained presences are taken as read after this long quiet..."""
    sync_max_s: float = 2.0
    """...or after this long at most; this node publishes nothing before."""
    max_skew_s: float = 30.0
    """A presence dated further ahead of this node's clock is refused: dated in the future,
    it would outrank every later claim in the controller's registry."""
    hold: HoldSettings = field(default_factory=HoldSettings)


class Publisher(Protocol):
    """Where presences go (the agent's :class:`~fogmig.platform.bus.client.Bus`)."""

    async def publish(self, topic: str, model: BusMessage, retain: bool = False) -> None: ...


class Routing(Protocol):
    """This gateway's forwarding rules (:class:`~fogmig.platform.agent.forwarding.Forwarder`)."""

    async def install(self) -> None: ...

    async def update(self, locations: Mapping[str, Location]) -> None: ...


class Hold(Protocol):
    """A port held for an arriving service (:class:`HoldRelay`)."""

    def open(self) -> None: ...

    async def release(self, target_ip: str | None = None) -> HoldStats: ...

    def discard(self) -> HoldStats: ...


HoldFactory = Callable[[int], Hold]
PortOf = Callable[[str], Awaitable[int | None]]


@dataclass(slots=True)
class _Held:
    migration_id: str
    port: int
    relay: Hold | None
    """None when the port could not be held (the traffic still comes here)."""


@dataclass(slots=True)
class _Waiter:
    service: str
    destination: str
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class Follow:
    """One node's view of where services run, its forwarding, and its side of hand-overs.

    ``routing`` is the node's forwarder; holds are made in network namespace ``netns`` (None:
    the caller's, as in the agent). ``port_of`` tells a service's port when this node has not
    announced it yet. ``addresses`` (node -> data address, this node's included) are the only
    addresses a presence may send traffic to: a presence naming another address than its own
    node's, or a node not listed, is refused (None: any, for tests of the order alone).
    """

    def __init__(
        self,
        *,
        node: str,
        data_ip: str,
        routing: Routing,
        settings: FollowSettings | None = None,
        netns: str | None = None,
        hold_factory: HoldFactory | None = None,
        port_of: PortOf | None = None,
        addresses: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.addresses = dict(addresses) if addresses is not None else None
        self._clock = clock
        self.data_ip = data_ip
        self.settings = settings or FollowSettings()
        self.book = PresenceBook()
        """Every presence this node knows of."""
        self._routing = routing
        self._hold_factory = hold_factory or (
            lambda port: HoldRelay(port=port, settings=self.settings.hold, netns=netns)
        )
        self._port_of = port_of
        self._bus: Publisher | None = None
        self._applied: dict[str, Location] = {}
        self._pinned: dict[str, Location] = {}  # service -> served here whatever the book says
        self._holds: dict[str, _Held] = {}  # service -> the hold for its arriving copy
        # Migrations this node reacted to as destination, the latest HANDLED_KEPT of them (a
        # dict as an ordered set): a presence seen again long after is settled by the book.
        self._handled: dict[str, None] = {}
        self._waiters: dict[str, _Waiter] = {}  # migration id -> a source waiting in freezing
        self._lock = asyncio.Lock()  # one forwarding update at a time
        self._publish_lock = asyncio.Lock()  # presences leave in the order they were made
        self._synced = asyncio.Event()
        self._last_message = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.releases: deque[HoldStats] = deque(maxlen=RELEASES_KEPT)
        """What the latest hold releases delivered (for tests and diagnostics)."""
        """What each released hold did (the latest last)."""

    # ------------------------------------------------------------------ the presence loop

    def attach(self, bus: Publisher) -> None:
        """Publish through ``bus`` from now on."""
        self._bus = bus

    def mark_synced(self) -> None:
        """Every retained presence has been read: this node may publish."""
        self._synced.set()

    async def run(self, bus: Bus) -> None:
        """Follow every service's presence and forward its traffic accordingly (forever)."""
        self.attach(bus)
        await self._routing.install()
        async with bus.subscribe(topics.service()) as presences:
            self._spawn(self._sync_when_quiet())
            async for topic, msg in presences:
                self._last_message = time.monotonic()
                try:
                    await self.on_message(msg)
                except Exception as exc:
                    log.warning(
                        "follow %s: presence on %s rejected: %s", self.node, topic, fmt.error(exc)
                    )

    async def on_message(self, msg: object) -> None:
        """A presence from the bus (a node withdraws one with ``present=False``)."""
        if not isinstance(msg, ServicePresence):
            return
        why = self.refusal(msg)
        if why is not None:
            log.warning("follow %s: presence of %s@%s refused: %s", self.node, msg.service,
                        msg.node, why)  # fmt: skip
            return
        changed = self.book.put(msg)
        self._log_notices()
        if changed:
            await self._settle()

    async def close(self) -> None:
        """Drop every hold (the agent stops) and stop what runs in the background."""
        for service in list(self._holds):
            self._end_hold(service, "the agent stops")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def refusal(self, msg: ServicePresence) -> str | None:
        """Why ``msg`` does not count (None: it does)."""
        if self.addresses is not None:
            own = self.addresses.get(msg.node)
            if own is None:
                return f"{msg.node} is not a node of this site"
            if msg.data_ip != own:
                return f"{msg.data_ip} is not the data address of {msg.node} ({own})"
        ahead = msg.at - self._clock()
        if ahead > self.settings.max_skew_s:
            return f"dated {ahead:.0f} s in this node's future"
        return None

    def tombstone(self, service: str) -> ServicePresence:
        """This node's withdrawal of ``service`` (retained on its topic): it outranks every
        presence of the service this node has seen, like any claim it makes."""
        own = self.book.get(self.node, service)
        return ServicePresence(
            service=service,
            node=self.node,
            data_ip=self.data_ip,
            port=own.port if own is not None else 5683,
            present=False,
            at=time.time(),
            seq=self.book.next_seq(service),
        )

    # ------------------------------------------------------------------ hooks

    async def freezing(self, service: str, destination: str, migration_id: str) -> None:
        """Source, just before the final freeze: traffic to the destination, bounded wait.

        This gateway switches last, ``switch_grace_s`` after the destination holds: until
        then what the other gateways still send here (on their old flows) reaches the service
        that still runs, instead of being passed on to the hold, whose answer would come after
        those gateways dropped the flow's NAT and be lost.
        """
        async with self._guard("freezing", service, migration_id):
            started = time.monotonic()
            waiter = self._waiters[migration_id] = _Waiter(service, destination)
            try:
                async with asyncio.timeout(self.settings.holding_wait_s):
                    port = await self._port(service)
                    if port is None:
                        log.warning("follow %s: no port known for %s", self.node, service)
                        return
                    self._pinned[service] = Location(service, self.node, self.data_ip, port)
                    await self._set_own(
                        service, "moving", port=port, migration_id=migration_id, to=destination
                    )
                    self._wake_waiters()
                    await waiter.arrived.wait()
                    held_after = time.monotonic() - started
                    await asyncio.sleep(self.settings.switch_grace_s)
            except TimeoutError:
                log.warning(
                    "follow %s: %s did not hold %s within %.1f s; freezing anyway",
                    self.node,
                    destination,
                    service,
                    self.settings.holding_wait_s,
                )
                return
            finally:
                self._waiters.pop(migration_id, None)
                if self._pinned.pop(service, None) is not None:
                    async with self._lock:
                        await self._forward()
            log.info(
                "follow %s: %s holds %s after %.0f ms, switched here after %.0f ms",
                self.node,
                destination,
                service,
                held_after * 1e3,
                (time.monotonic() - started) * 1e3,
            )

    async def running_here(self, service: str, migration_id: str) -> None:
        """Destination, the restored copy runs: release the hold, publish ``running``."""
        async with self._guard("running_here", service, migration_id):
            self._note_handled(migration_id)
            held = self._holds.pop(service, None)
            if held is not None and held.migration_id != migration_id:
                self._discard(service, held, f"held for {held.migration_id}")
                held = None
            if held is not None and held.relay is not None:
                self._spawn(self._release(service, held.relay))
            port = held.port if held is not None else await self._port(service)
            if port is None:
                log.warning("follow %s: no port known for %s", self.node, service)
                return
            await self._set_own(service, "running", port=port, migration_id=migration_id)

    async def resumed_here(self, service: str, migration_id: str) -> None:
        """Source, after a rollback resume: ``running`` here, above everything seen."""
        async with self._guard("resumed_here", service, migration_id):
            port = await self._port(service)
            if port is None:
                log.warning("follow %s: no port known for %s", self.node, service)
                return
            await self._set_own(service, "running", port=port, migration_id=migration_id)

    async def gave_up(self, service: str, migration_id: str) -> None:
        """Destination, its copy is gone: drop the hold and this node's presence."""
        async with self._guard("gave_up", service, migration_id):
            self._note_handled(migration_id)
            held = self._holds.get(service)
            if held is not None and held.migration_id == migration_id:
                self._end_hold(service, "the migration gave up")
            own = self.book.get(self.node, service)
            if own is not None and own.migration_id == migration_id and own.state != "moving":
                await self._withdraw(service)

    async def owned(self, service: str, migration_id: str) -> None:
        """Destination at commit: ``running`` here, unless that is what counts already."""
        async with self._guard("owned", service, migration_id):
            held = self._holds.pop(service, None)
            if held is not None and held.relay is not None:
                self._spawn(self._release(service, held.relay))
            await self._confirm(service, held.port if held else None, migration_id)

    async def announce(self, service: str, port: int) -> None:
        """The service runs here (deployed, restarted, committed, resumed): say so once."""
        async with self._guard("announce", service, None):
            await self._confirm(service, port, None)

    # ------------------------------------------------------------------ inside

    async def _confirm(self, service: str, port: int | None, migration_id: str | None) -> None:
        await self._wait_synced()
        own = self.book.get(self.node, service)
        port = port or (own.port if own is not None else None) or await self._port(service)
        if port is None:
            log.warning("follow %s: no port known for %s", self.node, service)
            return
        if (
            own is not None
            and own.state == "running"
            and own.port == port
            and self.book.winner(service) == own
        ):
            return
        await self._set_own(service, "running", port=port, migration_id=migration_id)

    async def _set_own(
        self,
        service: str,
        state: PresenceState,
        *,
        port: int,
        migration_id: str | None,
        to: str | None = None,
    ) -> ServicePresence:
        """Make this node's presence of ``service``, forward by it here, then publish it."""
        await self._wait_synced()
        msg = ServicePresence(
            service=service,
            node=self.node,
            data_ip=self.data_ip,
            port=port,
            present=True,
            at=time.time(),
            seq=self.book.next_seq(service),
            state=state,
            migration_id=migration_id,
            to=to,
        )
        self.book.put(msg)
        self._log_notices()
        async with self._lock:
            await self._forward()
        await self._publish(topics.service(self.node, service), msg)
        return msg

    async def _withdraw(self, service: str) -> None:
        gone = self.tombstone(service)
        if self.book.drop(self.node, service):
            async with self._lock:
                await self._forward()
        await self._publish(topics.service(self.node, service), gone)

    async def _settle(self) -> None:
        async with self._lock:
            await self._forward()
        self._wake_waiters()
        await self._react()

    async def _forward(self) -> None:
        locations = self.book.locations() | self._pinned
        if locations == self._applied:
            return
        try:
            await self._routing.update(locations)
        except FogmigError as exc:
            log.error("follow %s: forwarding not updated: %s", self.node, exc)
            return
        self._applied = locations

    def _wake_waiters(self) -> None:
        for mid, waiter in self._waiters.items():
            won = self.book.winner(waiter.service)
            if (
                won is not None
                and won.node == waiter.destination
                and won.migration_id == mid
                and won.state in ("holding", "running")
            ):
                waiter.arrived.set()

    async def _react(self) -> None:
        for service in sorted(self.book.services() | set(self._holds)):
            won = self.book.winner(service)
            held = self._holds.get(service)
            if held is not None and not (
                won is not None and won.node == self.node and won.migration_id == held.migration_id
            ):
                # The hand-over went another way (the source resumed, the move was withdrawn).
                self._end_hold(service, "the service's traffic goes elsewhere now")
                own = self.book.get(self.node, service)
                if own is not None and own.state == "holding":
                    await self._withdraw(service)
            if (
                won is not None
                and won.state == "moving"
                and won.to == self.node
                and won.migration_id is not None
                and won.migration_id not in self._handled
            ):
                await self._hold(won)

    def _note_handled(self, migration_id: str) -> None:
        self._handled[migration_id] = None
        while len(self._handled) > HANDLED_KEPT:
            del self._handled[next(iter(self._handled))]

    async def _hold(self, moving: ServicePresence) -> None:
        """A migration of ``moving.service`` to this node is about to freeze it: hold."""
        assert moving.migration_id is not None
        self._note_handled(moving.migration_id)
        relay: Hold | None = None
        try:
            relay = self._hold_factory(moving.port)
            relay.open()
        except (FogmigError, OSError, ValueError) as exc:
            # The switch still brings the traffic here; only what comes during the freeze is lost.
            log.warning("follow %s: cannot hold %s: %s", self.node, moving.service, exc)
            relay = None
        self._holds[moving.service] = _Held(moving.migration_id, moving.port, relay)
        await self._set_own(
            moving.service, "holding", port=moving.port, migration_id=moving.migration_id
        )
        log.info(
            "follow %s: holding %s (port %d) for %s from %s",
            self.node,
            moving.service,
            moving.port,
            moving.migration_id,
            moving.node,
        )

    async def _release(self, service: str, relay: Hold) -> None:
        try:
            stats = await relay.release()
        except (FogmigError, OSError) as exc:
            log.warning("follow %s: release of %s failed: %s", self.node, service, exc)
            relay.discard()
            return
        self.releases.append(stats)
        log.info("follow %s: released %s: %s", self.node, service, stats.as_dict())

    def _end_hold(self, service: str, why: str) -> None:
        held = self._holds.pop(service, None)
        if held is not None:
            self._discard(service, held, why)

    def _discard(self, service: str, held: _Held, why: str) -> None:
        if held.relay is not None:
            stats = held.relay.discard()
            log.info(
                "follow %s: hold of %s discarded (%s): %d datagrams dropped",
                self.node,
                service,
                why,
                stats.dropped_discard,
            )

    async def _port(self, service: str) -> int | None:
        for p in self.book.of(service):
            if p.node == self.node:
                return p.port
        return await self._port_of(service) if self._port_of is not None else None

    async def _publish(self, topic: str, msg: ServicePresence) -> None:
        """Publish ``msg`` (retained) on ``topic``; wait at most ``publish_wait_s`` for it."""
        bus = self._bus
        if bus is None:
            log.warning("follow %s: no bus; %s not published", self.node, topic)
            return
        task = self._spawn(self._send(bus, topic, msg))
        done, _ = await asyncio.wait({task}, timeout=self.settings.publish_wait_s)
        if not done:
            log.warning("follow %s: %s still not published", self.node, topic)

    async def _send(self, bus: Publisher, topic: str, msg: ServicePresence) -> None:
        async with self._publish_lock:
            try:
                await bus.publish(topic, msg, retain=True)
            except FogmigError as exc:
                log.warning("follow %s: %s not published: %s", self.node, topic, exc)

    async def _wait_synced(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), self.settings.sync_max_s)

    async def _sync_when_quiet(self) -> None:
        started = time.monotonic()
        while not self._synced.is_set():
            await asyncio.sleep(self.settings.sync_quiet_s / 2)
            now = time.monotonic()
            quiet = now - self._last_message >= self.settings.sync_quiet_s
            if quiet or now - started >= self.settings.sync_max_s:
                self._synced.set()

    def _log_notices(self) -> None:
        for notice in self.book.notices():
            # A stale presence is also the normal moment between a commit and the source
            # clearing its own; a conflict means two nodes published blind to each other.
            level = logging.WARNING if notice.kind == "conflict" else logging.INFO
            log.log(level, "follow %s: %s", self.node, notice)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("follow %s: %r failed", self.node, task, exc_info=task.exception())

    @contextlib.asynccontextmanager
    async def _guard(
        self, hook: str, service: str, migration_id: str | None
    ) -> AsyncIterator[None]:
        try:
            yield
        # A hook must never fail the migration it serves: whatever goes wrong is logged.
        except Exception:
            log.exception(
                "follow %s: %s of %s (%s) failed", self.node, hook, service, migration_id or "-"
            )
