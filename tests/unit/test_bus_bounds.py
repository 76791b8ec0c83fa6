"""Bounded, finite values on the bus and consumers that survive any one message: the schemas
refuse what a consumer cannot compute with, and random extreme but schema-valid statuses go
through the controller's real handlers without a crash."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.bus.schemas import (
    MAX_BYTES,
    MAX_RATE,
    MAX_RTT_S,
    DeviceAttach,
    NodeStatus,
    decode,
)
from fogmig.platform.bus.topics import Rejection, SchemaError, parse_topic, topics
from fogmig.platform.controller.actions import Launch
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.core import ControllerCore
from fogmig.platform.migration.record import MigrationRecord
from fogmig.policies.conditions import LinkConditions

CAPS = {"postcopy": True, "native_predump": False, "criu_version": "4.2.1"}


def status_doc(node: str, at: float, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "node": node,
        "online": True,
        "at": at,
        "load": 0.1,
        "mem_total_bytes": 8 << 30,
        "mem_free_bytes": 4 << 30,
        "services": [],
        "capabilities": CAPS,
        "links": [],
        "draining": False,
    }
    doc.update(fields)
    return doc


def service_doc(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "s1",
        "state_bytes": 4_000_000,
        "dirty_rate_bytes_per_s": 1e4,
        "data_ip": "10.79.0.1",
        "port": 5683,
    }
    doc.update(fields)
    return doc


def done_doc(**record: Any) -> dict[str, Any]:
    rec = MigrationRecord(
        migration_id="m1",
        service="s1",
        source="gw1",
        destination="gw2",
        technique=Technique.COLD,
        outcome=Outcome.COMPLETED,
    ).model_dump(mode="json")
    rec.update(record)
    return {
        "version": 1,
        "kind": "done",
        "node": "gw1",
        "command_id": "c1",
        "migration_id": "m1",
        "service": "s1",
        "outcome": "completed",
        "record": rec,
    }


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# --- the schemas refuse what no consumer can compute with ----------------------------------


def test_a_migration_done_with_a_huge_integer_is_refused() -> None:
    with pytest.raises(SchemaError) as caught:
        decode(topics.events("gw1"), raw(done_doc(dump_bytes=10**400)))
    assert caught.value.reason is Rejection.INVALID


def test_a_migration_done_with_an_infinite_time_is_refused() -> None:
    payload = raw(done_doc()).replace(b'"dump_time_s": 0.0', b'"dump_time_s": 1e400')
    with pytest.raises(SchemaError):
        decode(topics.events("gw1"), payload)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("dirty_rate_bytes_per_s", 1e308),
        ("state_bytes", 2**80),
    ],
)
def test_a_status_with_an_extreme_service_figure_is_refused(where: str, value: float) -> None:
    doc = status_doc("gw1", 1_000.0, services=[service_doc(**{where: value})])
    with pytest.raises(SchemaError):
        decode(topics.status("gw1"), raw(doc))


@pytest.mark.parametrize(
    ("where", "value"), [("rtt_s", 1e308), ("throughput_bytes_per_s", 1e308), ("at", 1e300)]
)
def test_a_status_with_an_extreme_link_is_refused(where: str, value: float) -> None:
    link = {"peer": "gw2", "rtt_s": 0.1, "throughput_bytes_per_s": 1e6, "at": 1_000.0}
    link[where] = value
    doc = status_doc("gw1", 1_000.0, links=[link])
    with pytest.raises(SchemaError):
        decode(topics.status("gw1"), raw(doc))


@pytest.mark.parametrize("field", ["load", "at", "mem_total_bytes"])
def test_a_status_with_an_extreme_number_is_refused(field: str) -> None:
    doc = status_doc("gw1", 1_000.0)
    doc[field] = 10**300
    with pytest.raises(SchemaError):
        decode(topics.status("gw1"), raw(doc))


def test_the_bounds_leave_room_for_real_figures() -> None:
    big = status_doc(
        "gw1",
        1.9e9,
        load=64.0,
        services=[service_doc(state_bytes=64 << 30, dirty_rate_bytes_per_s=1e9)],
        links=[{"peer": "gw2", "rtt_s": 2.0, "throughput_bytes_per_s": 1.25e9, "at": 1.9e9}],
    )
    assert isinstance(decode(topics.status("gw1"), raw(big)), NodeStatus)
    assert MAX_BYTES >= 1 << 50
    assert MAX_RATE >= 1e11
    assert MAX_RTT_S >= 60


@pytest.mark.parametrize(
    "topic",
    [
        "fogmig/v1/nodes/gw1\n/status",
        "fogmig/v1/nodes/gw1/services/s1\n",
        "fogmig/v1/devices/d1\n/attach",
    ],
)
def test_a_topic_name_ending_in_a_newline_is_refused(topic: str) -> None:
    with pytest.raises(SchemaError):
        parse_topic(topic)


@pytest.mark.parametrize("field", ["node", "service", "device", "gateway"])
def test_a_payload_name_ending_in_a_newline_is_refused(field: str) -> None:
    doc = {"version": 1, "device": "d1", "gateway": "gw1", "at": 1.0, "service": "s1"}
    if field in doc:
        doc[field] = f"{doc[field]}\n"
        with pytest.raises(SchemaError):
            decode(topics.attach("d1"), raw(doc))
    else:
        bad = status_doc("gw1\n", 1.0)
        with pytest.raises(SchemaError):
            decode(topics.status("gw1"), raw(bad))


def test_an_id_with_control_characters_is_refused() -> None:
    doc = {"version": 1, "kind": "undeploy", "command_id": "c1\n", "service": "s1"}
    with pytest.raises(SchemaError):
        decode(topics.cmd("gw1"), raw(doc))


# --- random extreme statuses through the controller's handlers -----------------------------

_FLOATS = st.one_of(
    st.floats(min_value=0, max_value=1e15, allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [0.0, 5e-324, 1e-300, 1e-12, 1.0, 1e9, 1e12, 1e15, 1e308, 1.7976931348623157e308]
    ),
)
_INTS = st.one_of(
    st.integers(min_value=0, max_value=2**64),
    st.sampled_from([0, 1, 2**53, 2**63 - 1, 10**30]),
)


@st.composite
def extreme_status(draw: st.DrawFn, node: str, at: float) -> bytes:
    services = (
        [
            service_doc(
                name="s1",
                state_bytes=draw(_INTS),
                dirty_rate_bytes_per_s=draw(_FLOATS),
            )
        ]
        if node == "gw1"
        else []
    )
    links = [
        {
            "peer": "gw2" if node == "gw1" else "gw1",
            "rtt_s": draw(_FLOATS),
            "throughput_bytes_per_s": draw(_FLOATS),
            "at": at,
        }
    ]
    doc = status_doc(
        node,
        at,
        load=draw(_FLOATS),
        mem_total_bytes=draw(_INTS),
        mem_free_bytes=draw(_INTS),
        services=services,
        links=links,
    )
    return raw(doc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_extreme_valid_statuses_never_crash_the_controller(data: st.DataObject) -> None:
    core = ControllerCore(
        ControllerConfig(default_link=LinkConditions.from_mbit(11.34, 122.95), debounce_s=0.0),
        wall_clock=lambda: 1_000.0,
    )
    accepted = 0
    for step, node in enumerate(["gw1", "gw2", "gw1", "gw2"]):
        payload = data.draw(extreme_status(node, 1_000.0 + step))
        try:
            msg = decode(topics.status(node), payload)
        except SchemaError:
            continue
        assert isinstance(msg, NodeStatus)
        accepted += 1
        core.on_status(msg, float(step))
        core.tick(float(step))
    assume(accepted > 0)
    attach = DeviceAttach(device="d1", gateway="gw2", at=1_000.0, service="s1")
    actions = core.on_attach(attach, 10.0) + core.tick(10.0) + core.tick(20.0)
    for action in actions:
        if isinstance(action, Launch):
            core.on_ack(action.command.service, action.command.command_id, 21.0)


def test_the_controller_loop_survives_any_exception_from_one_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fogmig.platform.controller.runner import Controller

    controller = Controller(ControllerConfig(), bus=None, devices={}.get)  # type: ignore[arg-type]

    def explode(msg: NodeStatus, now: float) -> list[Any]:
        raise OverflowError("x" * 10_000)

    controller.core.on_status = explode  # type: ignore[method-assign]
    msg = decode(topics.status("gw1"), raw(status_doc("gw1", 1.0)))
    with caplog.at_level(logging.WARNING):
        controller.handle(topics.status("gw1"), msg)
        controller.handle(topics.status("gw1"), msg)
    lines = [r for r in caplog.records if "OverflowError" in r.getMessage()]
    assert len(lines) == 2  # one line per message, no traceback storm
    assert all(len(r.getMessage()) < 1_000 for r in lines)
    assert controller.stats.rejected_messages == 2


def test_a_sender_bounds_its_own_record_before_it_goes_on_the_bus() -> None:
    from fogmig.platform.bus.schemas import MigrationDone, bounded_record
    from fogmig.platform.migration.record import Round

    record = MigrationRecord(
        migration_id="m1",
        service="s1",
        source="gw1",
        destination="gw2",
        technique=Technique.PRECOPY,
        outcome=Outcome.COMPLETED,
        link_rate_bit_per_s=float("inf"),
        dump_bytes=4096,
        rounds=[
            Round(
                index=0,
                dump_time_s=0.1,
                freeze_time_s=0.0,
                transfer_time_s=1e300,
                bytes_dumped=1,
                bytes_sent=1,
            )
        ],
    )
    with pytest.raises(ValueError, match="not a finite figure"):
        MigrationDone(
            node="gw1",
            command_id="c1",
            migration_id="m1",
            service="s1",
            outcome=Outcome.COMPLETED,
            record=record,
        )
    done = MigrationDone(
        node="gw1",
        command_id="c1",
        migration_id="m1",
        service="s1",
        outcome=Outcome.COMPLETED,
        record=bounded_record(record),
    )
    assert done.record.link_rate_bit_per_s == 0.0
    assert done.record.rounds == []
    assert done.record.dump_bytes == 4096
    assert decode(topics.events("gw1"), done.model_dump_json().encode()) == done
