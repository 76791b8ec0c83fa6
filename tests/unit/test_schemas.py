"""Every bus payload: valid round trips and each way a payload is rejected, with its reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Phase, Technique
from fogmig.platform.bus.schemas import (
    MAX_PAYLOAD_BYTES,
    BusMessage,
    Cleared,
    CommandAck,
    Decision,
    DeployCommand,
    DeviceAttach,
    DrainCommand,
    LinkMeasurement,
    MigrateCommand,
    MigrationDone,
    MigrationProgress,
    NodeStatus,
    ServiceInfo,
    ServicePresence,
    UndeployCommand,
    accept,
    check_fits,
    command_id_of,
    decode,
    encode,
    reject,
)
from fogmig.platform.bus.topics import Rejection, SchemaError, topics
from fogmig.platform.migration.record import MigrationRecord, PhaseTimestamp, Round
from fogmig.policies.conditions import PrecopyStopRules

KNOWN = frozenset({"gw1", "gw2", "gw3"})
AT = 1_700_000_000.5


def _status(node: str = "gw1", **changes: Any) -> NodeStatus:
    values: dict[str, Any] = {
        "node": node,
        "online": True,
        "at": AT,
        "load": 0.5,
        "mem_total_bytes": 2 << 30,
        "mem_free_bytes": 1 << 30,
        "services": [
            ServiceInfo(
                name="sensor",
                state_bytes=8 << 20,
                dirty_rate_bytes_per_s=2e5,
                data_ip="10.0.1.2",
                port=5683,
            )
        ],
        "capabilities": NodeCapabilities(criu_version="4.2.1", postcopy=True, native_predump=False),
        "links": [LinkMeasurement(peer="gw2", rtt_s=0.02, throughput_bytes_per_s=1e6, at=AT)],
        "draining": False,
    }
    values.update(changes)
    return NodeStatus(**values)


# (topic, model) of every payload type; each names gw1/gw2 only.
SAMPLES: list[tuple[str, BusMessage]] = [
    (topics.status("gw1"), _status()),
    (topics.status("gw2"), _status("gw2", online=False, services=[], links=[], draining=True)),
    (
        topics.cmd("gw1"),
        MigrateCommand(
            command_id="c-1",
            service="sensor",
            destination="gw2",
            technique="precopy",
            compression=True,
            precopy=PrecopyStopRules(
                max_rounds=3, min_changed_bytes=4096, stop_when_not_shrinking=False
            ),
            reason="device d1 roamed to gw2",
        ),
    ),
    (
        topics.cmd("gw1"),
        DeployCommand(command_id="c-2", service="sensor", state_mb=16, dirty_kbps=64),
    ),
    (topics.cmd("gw1"), UndeployCommand(command_id="c-3", service="sensor")),
    (topics.cmd("gw1"), DrainCommand(command_id="c-4")),
    (topics.events("gw1"), CommandAck(node="gw1", command_id="c-1", accepted=True)),
    (
        topics.events("gw1"),
        CommandAck(
            node="gw1",
            command_id="c-2",
            accepted=False,
            reason="no such image",
            error_type="ServiceError",
        ),
    ),
    (
        topics.events("gw1"),
        MigrationProgress(
            node="gw1",
            command_id="c-1",
            migration_id="m-1",
            service="sensor",
            phase=Phase.PRECOPY,
            bytes_done=1 << 20,
            bytes_total=8 << 20,
            rate_bytes_per_s=1.2e6,
            at=AT,
        ),
    ),
    (
        topics.events("gw1"),
        MigrationDone(
            node="gw1",
            command_id="c-1",
            migration_id="m-1",
            service="sensor",
            outcome=Outcome.ROLLED_BACK,
            record=MigrationRecord(
                migration_id="m-1",
                service="sensor",
                source="gw1",
                destination="gw2",
                technique=Technique.PRECOPY,
                outcome=Outcome.ROLLED_BACK,
                dump_time_s=1.5,
                rounds=[
                    Round(
                        index=0,
                        final=True,
                        dump_time_s=1.5,
                        freeze_time_s=1.5,
                        transfer_time_s=0.0,
                        bytes_dumped=4096,
                        bytes_sent=4096,
                    )
                ],
                phases=[PhaseTimestamp(phase=Phase.PENDING, at=AT)],
            ),
            error="transfer failed",
        ),
    ),
    (
        topics.service("gw2", "sensor"),
        ServicePresence(
            service="sensor", node="gw2", data_ip="fd00::2", port=5683, present=True, at=AT
        ),
    ),
    (topics.attach("d1"), DeviceAttach(device="d1", gateway="gw2", at=AT, service="sensor")),
    (
        topics.decisions(),
        Decision(
            service="sensor",
            source="gw1",
            destination="gw2",
            technique="hybrid",
            reason="least predicted downtime",
            predicted={"hybrid": {"downtime_s": 0.3}, "cold": {"downtime_s": 4.0}},
            trigger="mobility",
            at=AT,
        ),
    ),
]
IDS = [f"{type(m).__name__}-{i}" for i, (_, m) in enumerate(SAMPLES)]


def _reason(topic: str, payload: bytes, known: frozenset[str] | None = KNOWN) -> Rejection:
    with pytest.raises(SchemaError) as info:
        decode(topic, payload, known_nodes=known)
    assert info.value.topic == topic
    assert str(info.value.reason) in str(info.value)
    return info.value.reason


def _wire(model: BusMessage, **changes: Any) -> bytes:
    obj = json.loads(model.model_dump_json())
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(("topic", "model"), SAMPLES, ids=IDS)
def test_round_trip(topic: str, model: BusMessage) -> None:
    data = encode(topic, model, known_nodes=KNOWN)
    assert json.loads(data)["version"] == 1
    assert decode(topic, data, known_nodes=KNOWN) == model
    assert decode(topic, data) == model  # without a node list too


@pytest.mark.parametrize(("topic", "model"), SAMPLES, ids=IDS)
def test_malformed_json_is_rejected(topic: str, model: BusMessage) -> None:
    data = encode(topic, model)
    assert _reason(topic, data[:-1]) is Rejection.MALFORMED
    assert _reason(topic, b"\xff\xfe" + data) is Rejection.MALFORMED
    assert _reason(topic, b"[" + data + b"]") is Rejection.MALFORMED
    assert _reason(topic, b'"text"') is Rejection.MALFORMED


@pytest.mark.parametrize(("topic", "model"), SAMPLES, ids=IDS)
def test_oversized_payload_is_rejected_before_parsing(topic: str, model: BusMessage) -> None:
    data = encode(topic, model)
    padded = data[:-1] + b" " * (MAX_PAYLOAD_BYTES + 1 - len(data)) + b"}"
    assert len(padded) == MAX_PAYLOAD_BYTES + 1
    assert _reason(topic, padded) is Rejection.OVERSIZE
    # Not even JSON: the size alone decides.
    assert _reason(topic, b"\x00" * (MAX_PAYLOAD_BYTES + 1)) is Rejection.OVERSIZE
    # Exactly at the limit it is still accepted.
    at_limit = data[:-1] + b" " * (MAX_PAYLOAD_BYTES - len(data)) + b"}"
    assert decode(topic, at_limit) == model


@pytest.mark.parametrize(("topic", "model"), SAMPLES, ids=IDS)
def test_unknown_or_missing_version_is_rejected(topic: str, model: BusMessage) -> None:
    for version in (2, 0, "1", True, None, 1.0, [1]):
        assert _reason(topic, _wire(model, version=version)) is Rejection.UNKNOWN_VERSION
    obj = json.loads(model.model_dump_json())
    del obj["version"]
    assert _reason(topic, json.dumps(obj).encode()) is Rejection.UNKNOWN_VERSION


@pytest.mark.parametrize(
    ("topic", "model"),
    [(t, m) for t, m in SAMPLES if t.endswith(("/cmd", "/events"))],
)
def test_unknown_kind_is_rejected(topic: str, model: BusMessage) -> None:
    assert _reason(topic, _wire(model, kind="reboot")) is Rejection.UNKNOWN_KIND
    obj = json.loads(model.model_dump_json())
    del obj["kind"]
    assert _reason(topic, json.dumps(obj).encode()) is Rejection.UNKNOWN_KIND


def test_a_command_is_no_event_and_an_event_no_command() -> None:
    cmd = encode(topics.cmd("gw1"), DrainCommand(command_id="x"))
    ack = encode(topics.events("gw1"), CommandAck(node="gw1", command_id="x", accepted=True))
    assert _reason(topics.events("gw1"), cmd) is Rejection.UNKNOWN_KIND
    assert _reason(topics.cmd("gw1"), ack) is Rejection.UNKNOWN_KIND


@pytest.mark.parametrize(
    ("topic", "payload_of"),
    [
        (topics.status("gw2"), topics.status("gw1")),
        (topics.events("gw2"), topics.events("gw1")),
        (topics.service("gw1", "sensor"), topics.service("gw2", "sensor")),
        (topics.service("gw2", "other"), topics.service("gw2", "sensor")),
        (topics.attach("d2"), topics.attach("d1")),
    ],
)
def test_the_node_in_the_topic_must_be_the_node_in_the_payload(topic: str, payload_of: str) -> None:
    for sample_topic, model in SAMPLES:
        if sample_topic == payload_of:
            data = encode(sample_topic, model)
            assert _reason(topic, data) is Rejection.TOPIC_MISMATCH
            with pytest.raises(SchemaError) as info:
                encode(topic, model)
            assert info.value.reason is Rejection.TOPIC_MISMATCH


def test_a_model_on_a_topic_of_another_kind_is_a_mismatch() -> None:
    with pytest.raises(SchemaError) as info:
        check_fits(topics.cmd("gw1"), _status())
    assert info.value.reason is Rejection.TOPIC_MISMATCH
    # Same wire shape checks apply to receivers: a status sent on the decisions topic fails.
    assert _reason(topics.decisions(), encode(topics.status("gw1"), _status())) is (
        Rejection.INVALID
    )


def test_a_node_cannot_be_told_to_migrate_to_itself() -> None:
    cmd = MigrateCommand(command_id="c", service="s", destination="gw1", technique="cold")
    with pytest.raises(SchemaError) as info:
        encode(topics.cmd("gw1"), cmd)
    assert info.value.reason is Rejection.TOPIC_MISMATCH
    assert _reason(topics.cmd("gw1"), cmd.model_dump_json().encode()) is Rejection.TOPIC_MISMATCH


_LINK = {"peer": "gw9", "rtt_s": 0.02, "throughput_bytes_per_s": 1e6, "at": AT}


@pytest.mark.parametrize(
    ("topic", "model", "change"),
    [
        (topics.status("gw1"), SAMPLES[0][1], {"links": [_LINK]}),
        (topics.cmd("gw1"), SAMPLES[2][1], {"destination": "gw9"}),
        (topics.events("gw1"), SAMPLES[6][1], {"node": "gw9"}),
        (topics.service("gw2", "sensor"), SAMPLES[10][1], {"node": "gw9"}),
        (topics.attach("d1"), SAMPLES[11][1], {"gateway": "gw9"}),
        (topics.decisions(), SAMPLES[12][1], {"source": "gw9"}),
        (topics.decisions(), SAMPLES[12][1], {"destination": "gw9"}),
    ],
)
def test_unknown_node_names_are_rejected(
    topic: str, model: BusMessage, change: dict[str, Any]
) -> None:
    topic = topic.replace("/gw1/", "/gw9/") if change.get("node") == "gw9" else topic
    topic = topic.replace("/gw2/", "/gw9/") if change.get("node") == "gw9" else topic
    payload = _wire(model, **change)
    assert _reason(topic, payload) is Rejection.UNKNOWN_NODE
    # Without a list of known nodes the same payload is fine.
    assert not isinstance(decode(topic, payload, known_nodes=None), Cleared)


def test_a_topic_naming_an_unknown_node_is_rejected() -> None:
    data = encode(topics.status("gw9"), _status("gw9", links=[]))
    assert _reason(topics.status("gw9"), data) is Rejection.UNKNOWN_NODE
    with pytest.raises(SchemaError) as info:
        encode(topics.status("gw9"), _status("gw9", links=[]), known_nodes=KNOWN)
    assert info.value.reason is Rejection.UNKNOWN_NODE
    assert "gw9" in str(info.value)


@pytest.mark.parametrize(
    ("topic", "model", "change"),
    [
        (topics.status("gw1"), _status(), {"load": -1}),
        (topics.status("gw1"), _status(), {"mem_free_bytes": "12"}),
        (topics.status("gw1"), _status(), {"online": "true"}),
        (topics.status("gw1"), _status(), {"extra_field": 1}),
        (topics.status("gw1"), _status(), {"at": 1e400}),
        (topics.cmd("gw1"), SAMPLES[2][1], {"technique": "teleport"}),
        (topics.cmd("gw1"), SAMPLES[2][1], {"service": "Bad/Name"}),
        (topics.cmd("gw1"), SAMPLES[2][1], {"command_id": ""}),
        (topics.events("gw1"), SAMPLES[8][1], {"phase": "sleeping"}),
        (topics.events("gw1"), SAMPLES[9][1], {"outcome": "maybe"}),
        (topics.service("gw2", "sensor"), SAMPLES[10][1], {"data_ip": "10.0.0.300"}),
        (topics.service("gw2", "sensor"), SAMPLES[10][1], {"port": 0}),
        (topics.decisions(), SAMPLES[12][1], {"trigger": "whim"}),
    ],
)
def test_invalid_fields_are_rejected(topic: str, model: BusMessage, change: dict[str, Any]) -> None:
    payload = _wire(model, **change)
    assert _reason(topic, payload) in (Rejection.INVALID, Rejection.MALFORMED)


def test_nan_and_infinity_are_not_json() -> None:
    data = _status().model_dump_json().replace('"load":0.5', '"load":NaN').encode()
    assert _reason(topics.status("gw1"), data) is Rejection.MALFORMED
    data = _status().model_dump_json().replace('"load":0.5', '"load":Infinity').encode()
    assert _reason(topics.status("gw1"), data) is Rejection.MALFORMED


def test_models_refuse_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        _status(load=float("nan"))


def test_an_empty_retained_payload_clears_a_status_only() -> None:
    cleared = decode(topics.status("gw1"), b"")
    assert isinstance(cleared, Cleared)
    assert cleared.topic.node == "gw1"
    for topic in (
        topics.service("gw2", "sensor"),
        topics.cmd("gw1"),
        topics.events("gw1"),
        topics.attach("d1"),
        topics.decisions(),
    ):
        assert _reason(topic, b"") is Rejection.MALFORMED


def test_encode_refuses_an_oversized_model() -> None:
    big = MigrationDone(
        node="gw1",
        command_id="c",
        migration_id="m",
        service="s",
        outcome=Outcome.COMPLETED,
        record=MigrationRecord(
            migration_id="m",
            service="s",
            source="gw1",
            destination="gw2",
            technique=Technique.COLD,
            error="x" * MAX_PAYLOAD_BYTES,
        ),
    )
    with pytest.raises(SchemaError) as info:
        encode(topics.events("gw1"), big)
    assert info.value.reason is Rejection.OVERSIZE


def test_models_are_frozen_and_carry_version_1() -> None:
    status = _status()
    assert status.version == 1
    with pytest.raises(ValueError, match="frozen"):
        status.online = False


def test_acknowledgements_carry_the_error_class_and_message() -> None:
    assert accept("gw1", "c1") == CommandAck(node="gw1", command_id="c1", accepted=True)
    ack = reject("gw1", "c2", ConfigError("no such service 'x'"))
    assert (ack.accepted, ack.error_type, ack.reason) == (
        False,
        "ConfigError",
        "no such service 'x'",
    )
    assert reject("gw1", "c3", "busy").error_type is None
    long = reject("gw1", "c4", RuntimeError("x" * 10_000))
    assert long.reason is not None
    assert len(encode(topics.events("gw1"), long)) < MAX_PAYLOAD_BYTES


def test_the_command_id_of_an_invalid_command_can_be_salvaged() -> None:
    bad = _wire(SAMPLES[2][1], technique="teleport")
    assert _reason(topics.cmd("gw1"), bad) is Rejection.INVALID
    assert command_id_of(bad) == "c-1"
    for payload in (b"", b"{", b"[]", b'{"command_id": 5}', b'{"command_id": ""}', b"\xff"):
        assert command_id_of(payload) is None
    assert command_id_of(b'{"command_id":"a"}' + b" " * MAX_PAYLOAD_BYTES) is None
