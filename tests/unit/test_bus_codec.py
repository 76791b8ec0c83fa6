"""The bus's pure parts: topic builders and parser, the decoder under fuzzing, backoff, dispatch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fogmig.platform.base.errors import BusError, ConfigError
from fogmig.platform.base.vocabulary import NodeCapabilities
from fogmig.platform.bus.client import Bus, Received, Subscription, backoff_delay
from fogmig.platform.bus.schemas import Cleared, CommandAck, NodeStatus, decode, encode
from fogmig.platform.bus.topics import (
    PREFIX,
    Rejection,
    SchemaError,
    TopicKind,
    TopicRef,
    parse_topic,
    topics,
)

# --- topics --------------------------------------------------------------------------------


def test_topic_builders_and_parser_agree() -> None:
    cases = {
        topics.status("gw1"): TopicRef(TopicKind.STATUS, node="gw1"),
        topics.cmd("gw2"): TopicRef(TopicKind.CMD, node="gw2"),
        topics.events("gw3"): TopicRef(TopicKind.EVENTS, node="gw3"),
        topics.service("gw1", "sensor-2"): TopicRef(
            TopicKind.SERVICE, node="gw1", service="sensor-2"
        ),
        topics.attach("dev_7"): TopicRef(TopicKind.ATTACH, device="dev_7"),
        topics.decisions(): TopicRef(TopicKind.DECISIONS),
    }
    for topic, ref in cases.items():
        assert topic.startswith(PREFIX + "/")
        assert parse_topic(topic) == ref
    assert topics.status("gw1") == "fogmig/v1/nodes/gw1/status"
    assert topics.service("gw1", "sensor") == "fogmig/v1/nodes/gw1/services/sensor"
    assert topics.attach("d1") == "fogmig/v1/devices/d1/attach"
    assert topics.decisions() == "fogmig/v1/controller/decisions"
    kind, node, service, device = parse_topic(topics.service("gw2", "sensor"))
    assert (kind, node, service, device) == (TopicKind.SERVICE, "gw2", "sensor", None)


def test_topic_builders_make_subscription_patterns() -> None:
    assert topics.status() == "fogmig/v1/nodes/+/status"
    assert topics.events() == "fogmig/v1/nodes/+/events"
    assert topics.service("gw1") == "fogmig/v1/nodes/gw1/services/+"
    assert topics.attach() == "fogmig/v1/devices/+/attach"
    assert topics.everything() == "fogmig/v1/#"


@pytest.mark.parametrize(
    "topic",
    [
        "fogmig/v2/nodes/gw1/status",
        "other/v1/nodes/gw1/status",
        "fogmig/v1/nodes/gw1/reboot",
        "fogmig/v1/nodes/gw1/status/extra",
        "fogmig/v1/nodes/GW1/status",
        "fogmig/v1/nodes/+/status",
        "fogmig/v1/nodes//status",
        "fogmig/v1/nodes/gw1/services/Sensor",
        "fogmig/v1/devices/a b/attach",
        "fogmig/v1/controller",
        "",
    ],
)
def test_parse_topic_rejects_what_is_not_in_the_tree(topic: str) -> None:
    with pytest.raises(SchemaError) as info:
        parse_topic(topic)
    assert info.value.reason is Rejection.UNKNOWN_TOPIC
    assert info.value.topic == topic


@pytest.mark.parametrize("name", ["GW1", "gw/1", "#", "gw1+", "", "a" * 11])
def test_topic_builders_refuse_unsafe_names(name: str) -> None:
    with pytest.raises(SchemaError):
        topics.status(name)
    with pytest.raises(SchemaError):
        topics.cmd(name)


# --- decoding never crashes ----------------------------------------------------------------

ALL_TOPICS = [
    topics.status("gw1"),
    topics.cmd("gw1"),
    topics.events("gw1"),
    topics.service("gw1", "sensor"),
    topics.attach("d1"),
    topics.decisions(),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from(ALL_TOPICS), payload=st.binary(max_size=256))
def test_decode_of_random_bytes_raises_only_schema_errors(topic: str, payload: bytes) -> None:
    with contextlib.suppress(SchemaError):
        decode(topic, payload, known_nodes={"gw1", "gw2"})


@settings(max_examples=300, deadline=None)
@given(
    topic=st.sampled_from(ALL_TOPICS),
    fields=st.dictionaries(
        st.sampled_from(["kind", "node", "command_id", "accepted", "service", "at", "extra"]),
        json_values,
    ),
)
def test_decode_of_random_objects_raises_only_schema_errors(
    topic: str, fields: dict[str, object]
) -> None:
    payload = json.dumps({"version": 1, **fields}).encode()
    with contextlib.suppress(SchemaError):
        decode(topic, payload, known_nodes={"gw1", "gw2"})


@settings(max_examples=100, deadline=None)
@given(
    command_id=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:+-]{0,39}\Z"),
    reason=st.none() | st.text(max_size=200),
    accepted=st.booleans(),
)
def test_ack_round_trips_any_id_and_text(
    command_id: str, reason: str | None, accepted: bool
) -> None:
    ack = CommandAck(node="gw1", command_id=command_id, accepted=accepted, reason=reason)
    assert decode(topics.events("gw1"), encode(topics.events("gw1"), ack)) == ack


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    payload = b'{"version":1,"kind":"done","record":' + b"[" * 60_000 + b"]" * 60_000 + b"}"
    payload = payload[: 64 * 1024]
    with pytest.raises(SchemaError) as info:
        decode(topics.events("gw1"), payload)
    assert info.value.reason is Rejection.MALFORMED


# --- backoff -------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        base = min(5.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, initial=0.1, maximum=5.0, rng=rng) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays)
        assert len(set(delays)) > 100  # jittered, not a constant
    assert backoff_delay(10_000, initial=0.1, maximum=5.0) <= 5.0
    with pytest.raises(ValueError, match="backoff"):
        backoff_delay(-1, initial=0.1, maximum=5.0)
    with pytest.raises(ValueError, match="backoff"):
        backoff_delay(0, initial=1.0, maximum=0.5)


# --- dispatch (no broker) ------------------------------------------------------------------


def _status(node: str, *, online: bool = True) -> NodeStatus:
    return NodeStatus(
        node=node,
        online=online,
        at=time.time(),
        load=0.0,
        mem_total_bytes=1,
        mem_free_bytes=1,
        capabilities=NodeCapabilities(criu_version=None, postcopy=False, native_predump=False),
    )


def _bus(**kwargs: object) -> Bus:
    return Bus(
        host="127.0.0.1",
        port=1,
        username=None,
        password=None,
        client_id="fmbus-unit",
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_will_must_say_offline() -> None:
    with pytest.raises(ConfigError, match="online=false"):
        _bus(will=_status("gw1", online=True))
    _bus(will=_status("gw1", online=False))


async def test_dispatch_routes_valid_messages_and_reports_invalid_ones() -> None:
    reported: list[tuple[str, Rejection]] = []
    bus = _bus(
        known_nodes={"gw1", "gw2"},
        on_invalid=lambda topic, payload, exc: reported.append((topic, exc.reason)),
    )
    status_sub = Subscription(bus, topics.status(), 10)
    gw1_sub = Subscription(bus, topics.status("gw1"), 10)
    service_sub = Subscription(bus, topics.service(), 10)
    bus._subscriptions.update({status_sub, gw1_sub, service_sub})

    bus._dispatch(topics.status("gw1"), encode(topics.status("gw1"), _status("gw1")))
    bus._dispatch(topics.status("gw2"), encode(topics.status("gw2"), _status("gw2")))
    bus._dispatch(topics.status("gw2"), b"{broken")
    bus._dispatch(topics.status("gw9"), encode(topics.status("gw9"), _status("gw9")))
    bus._dispatch(topics.service("gw1", "sensor"), b"")
    bus._dispatch(topics.status("gw1"), b"")
    bus._dispatch(topics.cmd("gw1"), b"{broken}")  # nobody subscribed: not even decoded

    statuses = _drain(status_sub)
    assert [r.topic for r in statuses] == [topics.status(n) for n in ("gw1", "gw2", "gw1")]
    assert isinstance(statuses[-1].message, Cleared)
    assert [r.topic for r in _drain(gw1_sub)] == [topics.status("gw1")] * 2
    # An empty payload on a presence topic withdraws nothing: it is refused.
    assert _drain(service_sub) == []
    assert reported == [
        (topics.status("gw2"), Rejection.MALFORMED),
        (topics.status("gw9"), Rejection.UNKNOWN_NODE),
        (topics.service("gw1", "sensor"), Rejection.MALFORMED),
    ]
    assert bus.invalid == 3


async def test_a_failing_invalid_handler_does_not_escape_dispatch() -> None:
    def explode(topic: str, payload: bytes, exc: SchemaError) -> None:
        raise RuntimeError("handler bug")

    bus = _bus(on_invalid=explode)
    sub = Subscription(bus, topics.everything(), 10)
    bus._subscriptions.add(sub)
    bus._dispatch(topics.status("gw1"), b"nope")
    assert bus.invalid == 1
    assert _drain(sub) == []


async def test_a_full_subscription_drops_its_oldest_message() -> None:
    bus = _bus()
    sub = Subscription(bus, topics.status(), 3)
    bus._subscriptions.add(sub)
    for i in range(5):
        status = _status(f"gw{i}")
        bus._dispatch(topics.status(status.node), encode(topics.status(status.node), status))
    assert [r.topic for r in _drain(sub)] == [topics.status(f"gw{i}") for i in (2, 3, 4)]
    assert sub.dropped == 2


def _drain(sub: Subscription) -> list[Received]:
    out: list[Received] = []
    while not sub._queue.empty():
        item = sub._queue.get_nowait()
        assert isinstance(item, Received)
        out.append(item)
    return out


async def test_a_bug_in_the_connection_loop_fails_the_open_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus = _bus(connect_timeout=30)

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bus, "_new_client", broken)
    with pytest.raises(BusError, match="boom") as info:
        async with asyncio.timeout(5), bus:
            pass
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_an_unreachable_broker_fails_the_open_after_the_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        bus = Bus(
            host="127.0.0.1",
            port=port,
            username=None,
            password=None,
            client_id="fmbus-unit",
            connect_timeout=0.3,
            backoff_initial=0.05,
        )
        started = time.monotonic()
        with pytest.raises(BusError, match="cannot reach"):
            async with bus:
                pass
        assert 0.25 < time.monotonic() - started < 3


async def test_only_retained_topics_can_be_cleared() -> None:
    bus = _bus()
    for topic in (topics.cmd("gw1"), topics.events("gw1"), topics.decisions()):
        with pytest.raises(BusError, match="no retained message"):
            await bus.clear(topic)
