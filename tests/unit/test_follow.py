"""Three gateways' :class:`Follow` over an in-memory broker: where each forwards a service
through a hand-over, a rollback and a missing destination, with holds and rules faked."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

import pytest

from fogmig.platform.agent.follow import Follow, FollowSettings
from fogmig.platform.agent.forwarding import Location
from fogmig.platform.agent.holding import HoldStats
from fogmig.platform.base.errors import RuntimeToolError, ServiceError
from fogmig.platform.bus.schemas import BusMessage, ServicePresence, decode, encode
from fogmig.platform.bus.topics import parse_topic

IPS = {"gw1": "10.79.0.1", "gw2": "10.79.0.2", "gw3": "10.79.0.3"}
PORT = 5683
SVC = "svc"


class Broker:
    """Retains the last payload per topic and delivers every publish to every subscriber,
    in order, through the real codec."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[tuple[str, bytes]]] = []
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, ServicePresence | None]] = []
        self.delay_s = 0.0

    def client(self, node: str) -> BrokerClient:
        return BrokerClient(self, node)

    async def deliver(self, topic: str, payload: bytes) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if payload:
            self.retained[topic] = payload
        else:
            self.retained.pop(topic, None)
        for q in self.queues:
            q.put_nowait((topic, payload))


class BrokerClient:
    def __init__(self, broker: Broker, node: str) -> None:
        self.broker = broker
        self.node = node

    async def publish(self, topic: str, model: BusMessage, retain: bool = False) -> None:
        assert retain
        assert isinstance(model, ServicePresence)
        assert parse_topic(topic).node == self.node
        self.broker.published.append((topic, model))
        await self.broker.deliver(topic, encode(topic, model))


class Rules:
    """The forwarding rules of one gateway, as a list of every state they were put in."""

    def __init__(self) -> None:
        self.history: list[dict[str, str]] = []
        self.times: list[float] = []
        self.fail = False

    async def install(self) -> None:
        pass

    async def update(self, locations: Mapping[str, Location]) -> None:
        if self.fail:
            raise RuntimeToolError(
                "rejected", cmd=["iptables-restore"], returncode=1, stderr="line 2 failed"
            )
        self.history.append({s: loc.node for s, loc in locations.items()})
        self.times.append(time.monotonic())

    @property
    def now(self) -> dict[str, str]:
        return self.history[-1] if self.history else {}


class FakeHold:
    def __init__(self, port: int, log: list[str]) -> None:
        self.port = port
        self.log = log

    def open(self) -> None:
        self.log.append("open")

    async def release(self, target_ip: str | None = None) -> HoldStats:
        self.log.append("release")
        return HoldStats(released=3)

    def discard(self) -> HoldStats:
        self.log.append("discard")
        return HoldStats(dropped_discard=2)


class Gateway:
    def __init__(self, broker: Broker, node: str, settings: FollowSettings) -> None:
        self.node = node
        self.rules = Rules()
        self.holds: list[str] = []
        self.follow = Follow(
            node=node,
            data_ip=IPS[node],
            routing=self.rules,
            settings=settings,
            hold_factory=lambda port: FakeHold(port, self.holds),
            port_of=self._port_of,
            addresses=IPS,
        )
        self.follow.attach(broker.client(node))
        self.follow.mark_synced()
        self.broker = broker
        self.subscribe()

    def subscribe(self) -> None:
        """(Re)subscribe: the retained presences first, as a broker sends them."""
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for item in self.broker.retained.items():
            self.queue.put_nowait(item)
        self.broker.queues.append(self.queue)
        self.task = asyncio.create_task(self._pump())

    def unsubscribe(self) -> None:
        self.task.cancel()
        self.broker.queues.remove(self.queue)

    async def _port_of(self, service: str) -> int | None:
        return PORT

    async def _pump(self) -> None:
        while True:
            topic, payload = await self.queue.get()
            await self.follow.on_message(decode(topic, payload))
            self.queue.task_done()


class Fog:
    def __init__(self, **settings: float) -> None:
        self.broker = Broker()
        s = FollowSettings(**settings)  # type: ignore[arg-type]
        self.gw = {n: Gateway(self.broker, n, s) for n in IPS}

    async def quiet(self) -> None:
        for _ in range(3):
            for g in self.gw.values():
                if g.task.done() and not g.task.cancelled():
                    g.task.result()  # a presence loop that died fails the test here
                await asyncio.wait_for(g.queue.join(), 5.0)
            await asyncio.sleep(0)

    def routes(self) -> dict[str, str | None]:
        """Where each gateway forwards the service (its own name: served or held there)."""
        out: dict[str, str | None] = {}
        for n, g in self.gw.items():
            loc = g.follow.book.locations().get(SVC)
            out[n] = None if loc is None else loc.node
            assert g.rules.now.get(SVC) == out[n], (n, g.rules.now)
        return out

    def states(self) -> list[tuple[str, str | None, int | None]]:
        return [
            (
                parse_topic(t).node or "",
                None if m is None or not m.present else m.state,
                None if m is None else m.seq,
            )
            for t, m in self.broker.published
        ]


@pytest.fixture
async def fog() -> AsyncIterator[Fog]:
    fog = Fog(holding_wait_s=1.0, publish_wait_s=0.5, sync_max_s=0.1)
    yield fog
    for g in fog.gw.values():
        g.task.cancel()
        await g.follow.close()


async def withdraw(fog: Fog, node: str) -> None:
    """What a source does after the commit: withdraw its presence (``present=False``)."""
    topic = f"fogmig/v1/nodes/{node}/services/{SVC}"
    await fog.broker.client(node).publish(topic, fog.gw[node].follow.tombstone(SVC), retain=True)


def withdrawn(fog: Fog, node: str) -> bool:
    """The node's retained presence of the service is a withdrawal."""
    payload = fog.broker.retained[f"fogmig/v1/nodes/{node}/services/{SVC}"]
    msg = decode(f"fogmig/v1/nodes/{node}/services/{SVC}", payload)
    return isinstance(msg, ServicePresence) and not msg.present


async def deployed_on_gw1(fog: Fog) -> None:
    await fog.gw["gw1"].follow.announce(SVC, PORT)
    await fog.quiet()
    assert fog.routes() == {"gw1": "gw1", "gw2": "gw1", "gw3": "gw1"}


async def test_traffic_moves_to_the_destination_before_the_freeze(fog: Fog) -> None:
    await deployed_on_gw1(fog)
    gw1, gw2 = fog.gw["gw1"].follow, fog.gw["gw2"].follow

    started = time.monotonic()
    await gw1.freezing(SVC, "gw2", "m1")
    waited = time.monotonic() - started

    # freezing returned once gw2 held and gw1's own rules sent the port there.
    assert waited < 0.5
    assert fog.gw["gw2"].holds == ["open"]
    assert fog.gw["gw1"].rules.now == {SVC: "gw2"}
    await fog.quiet()
    assert fog.routes() == {"gw1": "gw2", "gw2": "gw2", "gw3": "gw2"}
    # gw2 dropped its rule (forward to gw1) before it said it holds.
    assert fog.gw["gw2"].rules.history[-2:] == [{SVC: "gw1"}, {SVC: "gw2"}]
    # The source switched last, a grace after the others (their old flows still reached
    # the running service meanwhile).
    source_at, other_at = fog.gw["gw1"].rules.times[-1], fog.gw["gw3"].rules.times[-1]
    assert source_at - other_at >= 0.8 * gw1.settings.switch_grace_s

    await gw2.running_here(SVC, "m1")
    await fog.quiet()
    assert fog.gw["gw2"].holds == ["open", "release"]
    assert fog.routes() == {"gw1": "gw2", "gw2": "gw2", "gw3": "gw2"}

    await gw2.owned(SVC, "m1")  # already running there: nothing new
    await gw2.announce(SVC, PORT)
    await fog.quiet()
    assert fog.states() == [
        ("gw1", "running", 1),
        ("gw1", "moving", 2),
        ("gw2", "holding", 3),
        ("gw2", "running", 4),
    ]


async def test_commit_path_without_the_early_hooks_still_converges(fog: Fog) -> None:
    await deployed_on_gw1(fog)
    await fog.gw["gw2"].follow.owned(SVC, "m1")
    await withdraw(fog, "gw1")
    await fog.quiet()
    assert fog.routes() == {"gw1": "gw2", "gw2": "gw2", "gw3": "gw2"}
    assert fog.gw["gw2"].holds == []


async def test_a_rollback_switches_everyone_back(fog: Fog) -> None:
    await deployed_on_gw1(fog)
    gw1, gw2 = fog.gw["gw1"].follow, fog.gw["gw2"].follow
    await gw1.freezing(SVC, "gw2", "m1")
    await gw2.running_here(SVC, "m1")
    await fog.quiet()
    assert fog.routes()["gw3"] == "gw2"

    await gw2.gave_up(SVC, "m1")
    await gw1.resumed_here(SVC, "m1")
    await fog.quiet()
    assert fog.routes() == {"gw1": "gw1", "gw2": "gw1", "gw3": "gw1"}
    topic, gone = fog.broker.published[-2]
    assert topic == "fogmig/v1/nodes/gw2/services/svc"
    assert gone is not None
    assert not gone.present
    # gw2's withdrawal took seq 5 (it outranks its holding one), gw1's running outranks it.
    assert fog.states()[-1] == ("gw1", "running", 6)

    # Again, back and forth: the newest presence wins wherever the topics first appeared.
    await gw1.freezing(SVC, "gw2", "m2")
    await gw2.running_here(SVC, "m2")
    await withdraw(fog, "gw1")
    await fog.quiet()
    assert fog.routes() == {"gw1": "gw2", "gw2": "gw2", "gw3": "gw2"}
    await gw2.freezing(SVC, "gw1", "m3")
    await gw1.running_here(SVC, "m3")
    await fog.quiet()
    assert fog.routes() == {"gw1": "gw1", "gw2": "gw1", "gw3": "gw1"}


async def test_a_source_that_resumes_before_the_destination_gives_up_wins(fog: Fog) -> None:
    await deployed_on_gw1(fog)
    await fog.gw["gw1"].follow.freezing(SVC, "gw2", "m1")
    await fog.gw["gw1"].follow.resumed_here(SVC, "m1")
    await fog.quiet()
    # gw2 sees it lost: its hold goes and its holding presence is withdrawn by itself.
    assert fog.gw["gw2"].holds == ["open", "discard"]
    assert fog.routes() == {"gw1": "gw1", "gw2": "gw1", "gw3": "gw1"}
    assert withdrawn(fog, "gw2")


async def test_freezing_waits_at_most_its_bound_for_a_silent_destination() -> None:
    fog = Fog(holding_wait_s=0.2, publish_wait_s=0.5, sync_max_s=0.1)
    try:
        await deployed_on_gw1(fog)
        fog.gw["gw2"].unsubscribe()  # gw2's agent does not answer
        started = time.monotonic()
        await fog.gw["gw1"].follow.freezing(SVC, "gw2", "m1")
        assert 0.15 < time.monotonic() - started < 0.4
        await fog.quiet()
        assert fog.routes()["gw3"] == "gw1"
        # The restore still moves everyone there, at once.
        fog.gw["gw2"].subscribe()
        await fog.gw["gw2"].follow.running_here(SVC, "m1")
        await fog.quiet()
        assert fog.routes() == {"gw1": "gw2", "gw2": "gw2", "gw3": "gw2"}
    finally:
        for g in fog.gw.values():
            g.task.cancel()
            await g.follow.close()


async def test_a_slow_broker_bounds_every_hook() -> None:
    fog = Fog(holding_wait_s=0.2, publish_wait_s=0.1, sync_max_s=0.1)
    try:
        await deployed_on_gw1(fog)
        fog.broker.delay_s = 5.0
        for hook in (
            fog.gw["gw1"].follow.freezing(SVC, "gw2", "m1"),
            fog.gw["gw2"].follow.running_here(SVC, "m1"),
            fog.gw["gw2"].follow.owned(SVC, "m1"),
            fog.gw["gw1"].follow.resumed_here(SVC, "m1"),
        ):
            started = time.monotonic()
            await hook
            assert time.monotonic() - started < 0.35
    finally:
        for g in fog.gw.values():
            g.task.cancel()
            await g.follow.close()


async def test_hook_failures_are_logged_never_raised(
    fog: Fog, caplog: pytest.LogCaptureFixture
) -> None:
    await deployed_on_gw1(fog)
    gw3 = fog.gw["gw3"]
    gw3.rules.fail = True

    def broken(port: int) -> FakeHold:
        raise ServiceError("port in use")

    gw2 = fog.gw["gw2"].follow
    gw2._hold_factory = broken
    with caplog.at_level(logging.INFO, logger="fogmig.platform.agent.follow"):
        await fog.gw["gw1"].follow.freezing(SVC, "gw2", "m1")
        await fog.quiet()
    # No hold at gw2, but the switch happened; gw3's rules failed and are retried later.
    assert fog.gw["gw2"].rules.now == {SVC: "gw2"}
    assert "cannot hold svc" in caplog.text
    assert "forwarding not updated" in caplog.text

    async def port_of(service: str) -> int | None:
        raise RuntimeError("boom")

    fog.gw["gw3"].follow._port_of = port_of
    await fog.gw["gw3"].follow.resumed_here("unknown", "m9")
    assert "resumed_here of unknown (m9) failed" in caplog.text

    gw3.rules.fail = False
    await fog.gw["gw2"].follow.running_here(SVC, "m1")
    await fog.quiet()
    assert fog.routes() == {"gw1": "gw2", "gw2": "gw2", "gw3": "gw2"}


async def test_a_late_copy_of_an_older_presence_changes_nothing(fog: Fog) -> None:
    await deployed_on_gw1(fog)
    await fog.gw["gw1"].follow.freezing(SVC, "gw2", "m1")
    await fog.gw["gw2"].follow.running_here(SVC, "m1")
    await fog.quiet()
    holding = next(m for _, m in fog.broker.published if m is not None and m.state == "holding")
    await fog.gw["gw3"].follow.on_message(holding)  # replayed after the running one
    await fog.gw["gw3"].follow.on_message(
        next(m for _, m in fog.broker.published if m is not None and m.state == "moving")
    )
    assert fog.routes()["gw3"] == "gw2"
    # A second moving for a migration already handled does not open a second hold.
    assert fog.gw["gw2"].holds == ["open", "release"]
