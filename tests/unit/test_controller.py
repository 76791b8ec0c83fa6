"""The controller's core without a broker: debounce, coalescing, one migration per service at a
time, the mobility, load and drain triggers, retries, and the decision's wire form."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Technique
from fogmig.platform.bus.schemas import (
    CommandAck,
    Decision,
    DeviceAttach,
    LinkMeasurement,
    MigrateCommand,
    MigrationDone,
    NodeStatus,
    ServiceInfo,
    ServicePresence,
    decode,
    encode,
)
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.actions import Action, ControllerEvent, EventKind, Launch
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.core import ControllerCore
from fogmig.platform.controller.drain import DrainWatch
from fogmig.platform.migration.record import MigrationRecord
from fogmig.policies.choice import choose_technique
from fogmig.policies.conditions import LinkConditions, Objective, ServiceConditions

MB = 1_000_000
LINK = LinkConditions.from_mbit(11.34, 122.95)


class World:
    """A core with a fake wall clock and a few nodes that report like agents."""

    def __init__(self, **config: Any) -> None:
        self.wall = 1_000.0
        ids = itertools.count(1)
        self.core = ControllerCore(
            ControllerConfig(default_link=LINK, **config),
            wall_clock=lambda: self.wall,
            new_id=lambda: f"c{next(ids)}",
        )
        self.services: dict[str, dict[str, ServiceInfo]] = {}
        self.load: dict[str, float] = {}
        self.draining: set[str] = set()

    def status(
        self,
        node: str,
        now: float,
        *,
        online: bool = True,
        links: list[LinkMeasurement] | None = None,
        postcopy: bool = True,
    ) -> list[Action]:
        self.wall += 0.01
        msg = NodeStatus(
            node=node,
            online=online,
            at=self.wall,
            load=self.load.get(node, 0.1),
            mem_total_bytes=8 << 30,
            mem_free_bytes=4 << 30,
            services=list(self.services.get(node, {}).values()),
            capabilities=NodeCapabilities(
                criu_version="4.2.1", postcopy=postcopy, native_predump=False
            ),
            links=links or [],
            draining=node in self.draining,
        )
        return self.core.on_status(msg, now) + self.core.tick(now)

    def place(self, service: str, node: str, state_bytes: int = 4 * MB, dirty: float = 1e4) -> None:
        for where in self.services.values():
            where.pop(service, None)
        self.services.setdefault(node, {})[service] = ServiceInfo(
            name=service,
            state_bytes=state_bytes,
            dirty_rate_bytes_per_s=dirty,
            data_ip="10.79.0.1",
            port=5683,
        )

    def attach(self, device: str, gateway: str, service: str, now: float) -> list[Action]:
        self.wall += 0.01
        msg = DeviceAttach(device=device, gateway=gateway, at=self.wall, service=service)
        return self.core.on_attach(msg, now) + self.core.tick(now)

    def done(
        self,
        launch: Launch,
        now: float,
        outcome: Outcome = Outcome.COMPLETED,
        *,
        downtime: float = 0.4,
    ) -> list[Action]:
        cmd = launch.command
        record = MigrationRecord(
            migration_id=f"m-{cmd.command_id}",
            service=cmd.service,
            source=launch.source,
            destination=cmd.destination,
            technique=cmd.technique,
            outcome=outcome,
            dump_time_s=downtime / 2,
            dump_transfer_time_s=downtime / 2,
            dump_bytes=4 * MB,
        )
        if outcome is Outcome.COMPLETED:
            self.place(cmd.service, cmd.destination)
        msg = MigrationDone(
            node=launch.source,
            command_id=cmd.command_id,
            migration_id=record.migration_id,
            service=cmd.service,
            outcome=outcome,
            record=record,
            error=None if outcome is Outcome.COMPLETED else "restore failed",
        )
        return self.core.on_done(msg, now) + self.core.tick(now)

    def up(self, *nodes: str, now: float = 0.0) -> None:
        for node in nodes:
            self.status(node, now)


def launches(actions: list[Action]) -> list[Launch]:
    return [a for a in actions if isinstance(a, Launch)]


def events(actions: list[Action], kind: EventKind) -> list[ControllerEvent]:
    return [a for a in actions if isinstance(a, ControllerEvent) and a.kind is kind]


def one_launch(actions: list[Action]) -> Launch:
    found = launches(actions)
    assert len(found) == 1, actions
    return found[0]


@pytest.fixture
def world() -> World:
    w = World()
    w.place("s1", "gw1")
    w.up("gw1", "gw2", "gw3", "gw4")
    return w


# --- mobility, debounce, coalescing ------------------------------------------------------


def test_attach_to_another_gateway_migrates_after_the_debounce(world: World) -> None:
    assert world.attach("d1", "gw1", "s1", 0.0) == []
    assert world.core.tick(2.0) == []  # settled on the gateway the service is on: nothing to do
    assert world.attach("d1", "gw2", "s1", 10.0) == []
    assert launches(world.core.tick(11.4)) == []
    actions = world.core.tick(11.5)
    launch = one_launch(actions)
    assert launch.source == "gw1"
    assert launch.command.destination == "gw2"
    assert launch.command.service == "s1"
    expected = choose_technique(
        ServiceConditions(state_bytes=4 * MB, dirty_rate_bytes_per_s=1e4),
        LINK,
        NodeCapabilities(postcopy=True, native_predump=False),
        NodeCapabilities(postcopy=True, native_predump=False),
        Objective.least_downtime(),
    )
    assert launch.command.technique == expected.technique.value
    assert launch.decision.trigger == "mobility"
    [decision] = events(actions, EventKind.DECISION)
    assert decision.data["command_id"] == launch.command.command_id


def test_repeated_attach_to_the_same_gateway_does_not_restart_the_debounce(world: World) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    for t in (0.5, 1.0, 1.4):
        assert world.attach("d1", "gw2", "s1", t) == []
    one_launch(world.core.tick(1.5))


def test_flapping_device_causes_one_migration_to_where_it_stays(world: World) -> None:
    sent: list[Launch] = []
    t = 0.0
    for gw in ("gw2", "gw3", "gw2", "gw4", "gw3", "gw2"):
        sent += launches(world.attach("d1", gw, "s1", t))
        t += 0.4
    for step in range(60):
        sent += launches(world.core.tick(t + step * 0.1))
    assert len(sent) == 1
    assert sent[0].command.destination == "gw2"


def test_flapping_back_to_the_service_gateway_causes_none(world: World) -> None:
    world.attach("d1", "gw1", "s1", 0.0)
    world.core.tick(2.0)
    sent: list[Launch] = []
    for i, gw in enumerate(("gw2", "gw3", "gw1", "gw2", "gw1")):
        sent += launches(world.attach("d1", gw, "s1", 3.0 + i * 0.3))
    for step in range(50):
        sent += launches(world.core.tick(5.0 + step * 0.1))
    assert sent == []


def test_late_attach_message_is_ignored(world: World) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    stale = DeviceAttach(device="d1", gateway="gw3", at=1.0, service="s1")
    assert world.core.on_attach(stale, 0.5) == []
    assert one_launch(world.core.tick(2.0)).command.destination == "gw2"


def test_one_migration_per_service_and_moves_coalesce_to_the_latest_target(
    world: World,
) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    first = one_launch(world.core.tick(1.5))
    world.core.on_ack("s1", first.command.command_id, 1.6)
    # The device roams twice while the migration runs: nothing is sent meanwhile.
    assert launches(world.attach("d1", "gw3", "s1", 2.0)) == []
    assert launches(world.core.tick(3.5)) == []
    assert launches(world.attach("d1", "gw4", "s1", 4.0)) == []
    assert launches(world.core.tick(6.0)) == []
    second = one_launch(world.done(first, 7.0))
    assert (second.source, second.command.destination) == ("gw2", "gw4")
    assert launches(world.core.tick(8.0)) == []


def test_a_move_waiting_for_its_retry_takes_the_latest_target() -> None:
    w = World(retry_initial_s=5.0)
    w.place("s1", "gw1")
    w.up("gw1", "gw2", "gw3", "gw4")
    w.attach("d1", "gw2", "s1", 0.0)
    first = one_launch(w.core.tick(1.5))
    w.core.on_rejected("s1", first.command.command_id, "busy", 2.0)
    assert w.core.pending["s1"].target == "gw2"
    w.attach("d1", "gw3", "s1", 3.0)
    w.attach("d1", "gw4", "s1", 3.5)
    assert launches(w.core.tick(5.0)) == []
    assert w.core.pending["s1"].target == "gw4"
    assert len(w.core.pending) == 1
    assert launches(w.core.tick(6.9)) == []  # the backoff still applies
    assert one_launch(w.core.tick(7.0)).command.destination == "gw4"


def test_device_returning_during_a_migration_cancels_the_queued_move(world: World) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    first = one_launch(world.core.tick(1.5))
    world.attach("d1", "gw3", "s1", 2.0)
    world.core.tick(3.5)
    world.attach("d1", "gw2", "s1", 4.0)  # back where the service is going
    world.core.tick(5.5)
    assert launches(world.done(first, 6.0)) == []
    assert world.core.pending == {}


def test_gateway_that_is_draining_or_offline_does_not_receive_the_service(world: World) -> None:
    world.draining.add("gw2")
    world.status("gw2", 0.0)
    world.status("gw3", 0.0, online=False)
    actions = world.attach("d1", "gw2", "s1", 0.0) + world.core.tick(1.5)
    assert launches(actions) == []
    [hold] = events(actions, EventKind.HOLD)
    assert "draining" in hold.message
    actions = world.attach("d1", "gw3", "s1", 2.0) + world.core.tick(3.5)
    assert launches(actions) == []
    assert "offline" in events(actions, EventKind.HOLD)[0].message
    # The gateway comes back: the service follows the device now.
    assert one_launch(world.status("gw3", 5.0)).command.destination == "gw3"


def test_unknown_service_location_is_a_hold_until_it_is_known(world: World) -> None:
    actions = world.attach("d9", "gw2", "s9", 0.0) + world.core.tick(1.5)
    assert launches(actions) == []
    assert "unknown" in events(actions, EventKind.HOLD)[0].message
    presence = ServicePresence(
        service="s9", node="gw3", data_ip="10.79.0.3", port=5700, present=True, at=world.wall
    )
    world.core.on_presence(presence, 2.0)
    launch = one_launch(world.core.tick(2.0))
    assert (launch.source, launch.command.destination) == ("gw3", "gw2")


def test_presence_newer_than_a_status_list_decides_the_location(world: World) -> None:
    world.wall += 5
    presence = ServicePresence(
        service="s1", node="gw3", data_ip="10.79.0.3", port=5683, present=True, at=world.wall
    )
    world.core.on_presence(presence, 0.0)
    assert world.core.registry.location("s1") == "gw3"
    gone = presence.model_copy(update={"present": False, "at": world.wall + 0.1, "seq": 1})
    world.core.on_presence(gone, 0.1)
    assert world.core.registry.location("s1") == "gw1"


# --- commands: acknowledgement, rejection, retries ---------------------------------------


def test_rejection_is_retried_with_backoff_and_then_given_up() -> None:
    w = World(max_attempts=3, retry_initial_s=1.0)
    w.place("s1", "gw1")
    w.up("gw1", "gw2")
    w.attach("d1", "gw2", "s1", 0.0)
    first = one_launch(w.core.tick(1.5))
    actions = w.core.on_rejected("s1", first.command.command_id, "busy", 1.6)
    [rejected] = events(actions, EventKind.REJECTED)
    assert rejected.data["retry_in_s"] == 1.0
    assert launches(w.core.tick(2.5)) == []
    assert w.core.next_due() == pytest.approx(2.6)
    second = one_launch(w.core.tick(2.6))
    assert second.command.command_id != first.command.command_id
    assert second.command.destination == "gw2"
    actions = w.core.on_send_failed("s1", second.command.command_id, "no ack", 3.0)
    assert events(actions, EventKind.SEND_FAILED)[0].data["retry_in_s"] == 2.0
    assert launches(w.core.tick(4.9)) == []
    third = one_launch(w.core.tick(5.0))
    actions = w.core.on_rejected("s1", third.command.command_id, "busy", 5.1)
    assert events(actions, EventKind.GAVE_UP)
    assert launches(w.core.tick(100.0)) == []
    assert w.core.inflight == {}
    assert w.core.pending == {}


def test_answer_to_an_old_command_is_ignored(world: World) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    one_launch(world.core.tick(1.5))
    assert world.core.on_rejected("s1", "not-this-one", "busy", 1.6) == []
    assert "s1" in world.core.inflight


def test_rolled_back_migration_is_retried(world: World) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    first = one_launch(world.core.tick(1.5))
    world.core.on_ack("s1", first.command.command_id, 1.6)
    actions = world.done(first, 3.0, Outcome.ROLLED_BACK)
    assert events(actions, EventKind.DONE)[0].data["outcome"] == "rolled_back"
    assert launches(actions) == []
    assert one_launch(world.core.tick(4.0)).command.destination == "gw2"


def test_accepted_migration_without_done_is_lost_after_the_timeout() -> None:
    w = World(done_timeout_s=30.0)
    w.place("s1", "gw1")
    w.up("gw1", "gw2")
    w.attach("d1", "gw2", "s1", 0.0)
    first = one_launch(w.core.tick(1.5))
    assert events(w.core.on_ack("s1", first.command.command_id, 2.0), EventKind.ACCEPTED)
    assert w.core.tick(31.9) == []
    actions = w.core.tick(32.0)
    assert events(actions, EventKind.LOST)
    # Still not where the device is: it is tried again.
    assert one_launch(actions).command.destination == "gw2"


def test_done_compares_prediction_with_measurement(world: World) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    first = one_launch(world.core.tick(1.5))
    [done] = events(world.done(first, 5.0, downtime=0.8), EventKind.DONE)
    cmp = done.data["comparison"]
    assert cmp["downtime_s"]["measured"] == pytest.approx(0.8)
    assert cmp["downtime_s"]["predicted"] == first.decision.predicted["downtime_s"]
    assert cmp["downtime_s"]["error"] == pytest.approx(0.8 - cmp["downtime_s"]["predicted"])
    assert cmp["transferred_bytes"]["measured"] == 4 * MB
    assert "predicted" in done.message
    assert world.core.registry.location("s1") == "gw2"


# --- load ---------------------------------------------------------------------------------


def test_load_balancing_needs_k_consecutive_reports_above_the_threshold() -> None:
    w = World(load_threshold=0.8, load_target=0.6, load_reports=3)
    w.place("s1", "gw1")
    w.place("s2", "gw1", state_bytes=8 * MB)
    w.up("gw1", "gw2")
    w.load["gw1"] = 0.9
    assert launches(w.status("gw1", 5.0)) == []
    assert launches(w.status("gw1", 10.0)) == []
    w.load["gw1"] = 0.5  # one report below resets the count
    assert launches(w.status("gw1", 15.0)) == []
    w.load["gw1"] = 0.9
    assert launches(w.status("gw1", 20.0)) == []
    assert launches(w.status("gw1", 25.0)) == []
    launch = one_launch(w.status("gw1", 30.0))
    assert launch.decision.trigger == "load"
    assert (launch.source, launch.command.destination) == ("gw1", "gw2")
    assert launch.command.service == "s1"  # the smallest that relieves the node enough


def test_load_balancing_leaves_a_device_companion_on_its_gateway() -> None:
    w = World(load_reports=1)
    w.place("s1", "gw1")
    w.up("gw1", "gw2")
    w.attach("d1", "gw1", "s1", 0.0)
    w.core.tick(2.0)
    w.load["gw1"] = 1.5
    actions = w.status("gw1", 5.0)
    assert launches(actions) == []
    assert "no service that can be moved" in events(actions, EventKind.HOLD)[0].message


# --- drain --------------------------------------------------------------------------------


def test_drain_moves_every_service_off_one_at_a_time_and_reports_empty() -> None:
    w = World()
    w.place("s1", "gw1", state_bytes=4 * MB)
    w.place("s2", "gw1", state_bytes=8 * MB)
    w.up("gw1", "gw2", "gw3")
    w.draining.add("gw1")
    actions = w.status("gw1", 1.0)
    assert events(actions, EventKind.DRAIN_STARTED)
    first = one_launch(actions)
    assert first.decision.trigger == "drain"
    assert first.command.destination in {"gw2", "gw3"}
    assert launches(w.status("gw1", 2.0)) == []  # the node is busy with the first one
    second = one_launch(w.done(first, 3.0))
    assert {first.command.service, second.command.service} == {"s1", "s2"}
    assert second.command.destination != "gw1"
    w.done(second, 4.0)
    [empty] = events(w.status("gw1", 5.0), EventKind.NODE_EMPTY)
    assert empty.node == "gw1"
    assert "ready to power down" in empty.message
    assert events(w.status("gw1", 6.0), EventKind.NODE_EMPTY) == []  # said once


def test_drained_node_is_reported_empty_when_its_last_migration_ends() -> None:
    w = World()
    w.place("s1", "gw1")
    w.up("gw1", "gw2")
    w.draining.add("gw1")
    launch = one_launch(w.status("gw1", 1.0))
    w.services["gw1"] = {}
    assert events(w.status("gw1", 2.0), EventKind.NODE_EMPTY) == []  # s1 is still leaving
    [empty] = events(w.done(launch, 3.0), EventKind.NODE_EMPTY)
    assert empty.node == "gw1"
    assert "ready to power down" in empty.message
    assert events(w.status("gw1", 6.0), EventKind.NODE_EMPTY) == []  # said once


def test_no_service_lands_on_a_draining_node() -> None:
    w = World()
    w.place("s1", "gw1")
    w.place("s2", "gw2")
    w.up("gw1", "gw2", "gw3")
    w.draining.add("gw3")
    w.status("gw3", 0.0)
    w.draining.add("gw1")
    launch = one_launch(w.status("gw1", 1.0))
    assert launch.command.destination == "gw2"


def test_drain_without_a_target_holds_and_says_why() -> None:
    w = World()
    w.place("s1", "gw1")
    w.up("gw1")
    w.draining.add("gw1")
    actions = w.status("gw1", 1.0)
    assert launches(actions) == []
    assert "no node can take it" in events(actions, EventKind.HOLD)[0].message


# --- technique inputs and the decision's wire form ----------------------------------------


def test_measured_link_is_preferred_over_the_profile(world: World) -> None:
    fast = LinkMeasurement(peer="gw2", rtt_s=0.002, throughput_bytes_per_s=50e6, at=world.wall)
    world.status("gw1", 0.0, links=[fast])
    world.attach("d1", "gw2", "s1", 0.0)
    launch = one_launch(world.core.tick(1.5))
    inputs = launch.decision.predicted["inputs"]
    assert isinstance(inputs, dict)
    assert inputs["link_source"] == "measured"
    assert inputs["throughput_bytes_per_s"] == 50e6
    world.attach("d2", "gw3", "s2", 2.0)


def test_lazy_techniques_are_not_chosen_without_userfaultfd() -> None:
    w = World(objective="downtime")
    w.place("s1", "gw1", state_bytes=200 * MB, dirty=500_000)
    w.status("gw1", 0.0, postcopy=False)
    w.status("gw2", 0.0)
    w.attach("d1", "gw2", "s1", 0.0)
    launch = one_launch(w.core.tick(1.5))
    assert launch.command.technique in {"cold", "precopy"}
    excluded = launch.decision.predicted["excluded"]
    assert isinstance(excluded, dict)
    assert set(excluded) == {"postcopy", "hybrid"}


def test_decision_is_valid_on_the_bus_and_in_the_log(world: World) -> None:
    world.attach("d1", "gw2", "s1", 0.0)
    actions = world.core.tick(1.5)
    launch = one_launch(actions)
    payload = encode(topics.decisions(), launch.decision)
    back = decode(topics.decisions(), payload)
    assert isinstance(back, Decision)
    assert back == launch.decision
    assert back.trigger == "mobility"
    assert "attached to gw2" in back.reason
    for key in ("downtime_s", "total_time_s", "transferred_bytes", "alternatives", "inputs"):
        assert key in back.predicted
    [event] = events(actions, EventKind.DECISION)
    line = json.loads(event.to_json())
    assert line["event"] == "decision"
    assert line["decision"]["technique"] == launch.command.technique
    assert line["choice"]["technique"] == launch.command.technique
    assert line["command_id"] == launch.command.command_id
    encode(topics.cmd("gw1"), launch.command)  # the command fits its topic too


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        ControllerConfig(load_threshold=0.5, load_target=0.7)
    with pytest.raises(ConfigError):
        ControllerConfig(debounce_s=-1)
    with pytest.raises(ConfigError):
        ControllerConfig(objective="fastest")  # type: ignore[arg-type]
    assert ControllerConfig().retry_delay(1) == 1.0
    assert ControllerConfig().retry_delay(10) == 30.0


def test_a_decision_that_cannot_be_built_is_a_hold_not_a_crash() -> None:
    w = World()
    w.core = ControllerCore(ControllerConfig(default_link=LINK), new_id=lambda: "")
    w.place("s1", "gw1")
    w.up("gw1", "gw2")
    actions = w.attach("d1", "gw2", "s1", 0.0) + w.core.tick(1.5)
    assert launches(actions) == []
    [hold] = events(actions, EventKind.HOLD)
    assert "cannot decide how to move s1" in hold.message
    assert w.core.pending == {}
    assert w.core.inflight == {}
    assert w.core.tick(5.0) == []


# --- fogmig drain's view of the node ------------------------------------------------------


def _drain_status(w: World, node: str) -> NodeStatus:
    w.wall += 1
    return NodeStatus(
        node=node,
        online=True,
        at=w.wall,
        load=0.1,
        mem_total_bytes=1 << 30,
        mem_free_bytes=1 << 29,
        services=list(w.services.get(node, {}).values()),
        capabilities=NodeCapabilities(criu_version=None, postcopy=True, native_predump=False),
        draining=node in w.draining,
    )


def test_drain_watch_waits_for_the_last_migration_to_end(world: World) -> None:
    watch = DrainWatch("gw1")
    assert watch.update(_drain_status(world, "gw1")) == []  # not draining yet
    assert not watch.empty
    world.draining.add("gw1")
    assert watch.update(_drain_status(world, "gw1")) == ["gw1 still runs 1: s1"]
    world.attach("d1", "gw2", "s1", 0.0)
    launch = one_launch(world.core.tick(1.5))
    [line] = watch.update(launch.decision)
    assert line.startswith("moving s1 to gw2 by ")
    watch.update(launch.command)
    world.services["gw1"] = {}
    assert watch.update(_drain_status(world, "gw1")) == []
    assert not watch.empty  # the container is gone, the migration has not ended (post-copy)
    done = MigrationDone(
        node="gw1",
        command_id=launch.command.command_id,
        migration_id="m1",
        service="s1",
        outcome=Outcome.COMPLETED,
        record=MigrationRecord(
            migration_id="m1",
            service="s1",
            source="gw1",
            destination="gw2",
            technique=Technique.COLD,
            outcome=Outcome.COMPLETED,
        ),
    )
    assert watch.update(done) == ["s1 left gw1 for gw2: completed"]
    assert watch.empty


def test_drain_watch_forgets_a_rejected_command(world: World) -> None:
    watch = DrainWatch("gw1")
    world.draining.add("gw1")
    world.services["gw1"] = {}
    watch.update(MigrateCommand(command_id="c9", service="s1", destination="gw2", technique="cold"))
    watch.update(_drain_status(world, "gw1"))
    assert not watch.empty
    assert "migrations of s1 not ended" in watch.describe()
    watch.update(CommandAck(node="gw1", command_id="c9", accepted=False, reason="busy"))
    assert watch.empty


def test_a_presence_its_node_no_longer_confirms_is_ignored(world: World) -> None:
    # A service removed without clearing its retained presence must not look alive.
    presence = ServicePresence(
        service="gone", node="gw2", data_ip="10.79.0.2", port=5683, present=True, at=world.wall
    )
    world.core.on_presence(presence, 0.0)
    assert world.core.registry.location("gone") == "gw2"
    world.wall += 0.2
    world.status("gw2", 1.0)  # within the grace: an agent may have listed before it arrived
    assert world.core.registry.location("gone") == "gw2"
    world.wall += 1.0
    world.status("gw2", 6.0)
    assert world.core.registry.location("gone") is None
    world.draining.add("gw2")
    assert launches(world.status("gw2", 7.0)) == []  # nothing to drain


def test_a_repeated_migration_done_changes_nothing(world: World) -> None:
    world.up("gw1", "gw2")
    world.place("s1", "gw1")
    world.attach("d1", "gw2", "s1", 0.0)
    launch = one_launch(world.core.tick(1.5))
    world.core.on_ack("s1", launch.command.command_id, 1.6)
    first = world.done(launch, 2.0, Outcome.ROLLED_BACK)
    assert events(first, EventKind.DONE)
    # The agent restarted before it journaled the publication and sends the same end again.
    again = world.done(launch, 2.5, Outcome.ROLLED_BACK)
    assert events(again, EventKind.DONE) == []
    assert launches(again) == []


def test_decisions_use_the_configured_cost_constants() -> None:
    from fogmig.policies.costmodel import CostConstants

    def predicted(constants: CostConstants | None) -> dict[str, Any]:
        w = World(cost_constants=constants)
        w.place("s1", "gw1", state_bytes=40 * MB)
        w.up("gw1", "gw2")
        w.attach("d1", "gw2", "s1", 0.0)
        return one_launch(w.core.tick(1.5)).decision.predicted

    # a platform whose every restore takes 5 s: every technique's downtime grows by it
    slow = CostConstants(restore_fixed_s=5.0)
    default, fitted = predicted(None), predicted(slow)
    for t, alt in fitted["alternatives"].items():
        base = default["alternatives"][t]["downtime_s"]
        assert alt["downtime_s"] == pytest.approx(base + 5.0 - CostConstants().restore_fixed_s)
