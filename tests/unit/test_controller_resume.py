"""The controller's state across a restart, without a broker: what is saved and given back,
a command sent again under its own id, a migration whose end went by unseen, the schedule of
writes, and state files that are corrupt or of another site."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from fogmig.platform.base.durable import read_saved, write_atomic
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome
from fogmig.platform.bus.schemas import (
    DeviceAttach,
    MigrationDone,
    NodeStatus,
    ServiceInfo,
    ServicePresence,
)
from fogmig.platform.controller.actions import Action, ControllerEvent, EventKind, Launch
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.core import ControllerCore
from fogmig.platform.controller.saved import SavedController, give_back, take
from fogmig.platform.controller.store import ControllerStore, SaveSchedule, durable_key
from fogmig.platform.migration.record import MigrationRecord
from fogmig.policies.conditions import LinkConditions

LINK = LinkConditions.from_mbit(11.34, 122.95)


class Fog:
    """One core at a time over the same nodes and wall clock (a restart makes a new core)."""

    def __init__(self) -> None:
        self.wall = 1_000.0
        self.ids = itertools.count(1)
        self.where: dict[str, str] = {"s1": "gw1"}
        self.migrating: dict[str, list[str]] = {}
        self.draining: set[str] = set()
        self.core = self.new_core()

    def new_core(self) -> ControllerCore:
        return ControllerCore(
            ControllerConfig(default_link=LINK, debounce_s=1.0, retry_initial_s=1.0),
            wall_clock=lambda: self.wall,
            new_id=lambda: f"c{next(self.ids)}",
        )

    def status(self, node: str, now: float) -> list[Action]:
        self.wall += 0.01
        services = [
            ServiceInfo(
                name=s,
                state_bytes=4_000_000,
                dirty_rate_bytes_per_s=1e4,
                data_ip="10.0.0.1",
                port=5683,
            )
            for s, n in self.where.items()
            if n == node and s not in self.migrating.get(node, [])
        ]
        msg = NodeStatus(
            node=node,
            online=True,
            at=self.wall,
            load=0.1,
            mem_total_bytes=8 << 30,
            mem_free_bytes=4 << 30,
            services=services,
            capabilities=NodeCapabilities(
                criu_version="4.2.1", postcopy=True, native_predump=False
            ),
            draining=node in self.draining,
            migrating=self.migrating.get(node, []),
        )
        return self.core.on_status(msg, now) + self.core.tick(now)

    def up(self, now: float) -> list[Action]:
        out: list[Action] = []
        for node in ("gw1", "gw2", "gw3"):
            out += self.status(node, now)
        return out

    def attach(self, device: str, gateway: str, now: float) -> list[Action]:
        self.wall += 0.01
        msg = DeviceAttach(device=device, gateway=gateway, at=self.wall, service="s1")
        return self.core.on_attach(msg, now) + self.core.tick(now)

    def presence(self, service: str, node: str, now: float) -> list[Action]:
        self.wall += 0.01
        msg = ServicePresence(
            service=service, node=node, data_ip="10.0.0.2", port=5683, present=True, at=self.wall
        )
        return self.core.on_presence(msg, now) + self.core.tick(now)

    def restart(self, now: float, *, away_s: float = 5.0) -> list[Action]:
        """Save, lose the process, come back ``away_s`` later with a new core."""
        saved = SavedController.model_validate_json(
            take(self.core, now, site="t").model_dump_json()
        )
        self.wall += away_s
        self.core = self.new_core()
        return give_back(self.core, saved, now + 100.0)  # another process, another clock


def launches(actions: list[Action]) -> list[Launch]:
    return [a for a in actions if isinstance(a, Launch)]


def of(actions: list[Action], kind: EventKind) -> list[ControllerEvent]:
    return [a for a in actions if isinstance(a, ControllerEvent) and a.kind is kind]


def commanded(fog: Fog) -> Launch:
    fog.up(0.0)
    fog.attach("d1", "gw2", 0.0)
    [launch] = launches(fog.core.tick(1.0))
    assert launch.command.destination == "gw2"
    return launch


def test_attachments_drains_and_queued_moves_come_back() -> None:
    fog = Fog()
    fog.draining.add("gw3")
    fog.up(0.0)
    fog.attach("d1", "gw1", 0.0)
    fog.core.tick(1.5)  # settled where its service runs
    fog.core.pending["s9"] = fog.core.pending.get("s9") or _pending("s9", "gw2", not_before=9.0)
    fog.restart(2.0, away_s=3.0)
    core = fog.core
    att = core.registry.attachments["d1"]
    assert (att.gateway, att.service, att.settled) == ("gw1", "s1", True)
    assert core.registry.device_of("s1") is att
    assert core.draining == {"gw3": True}  # and its emptiness was said: not said again
    assert fog.status("gw3", 101.0) == []
    # 7 s of backoff were left; 3 s passed while the controller was away.
    assert core.pending["s9"].not_before == 102.0 + 4.0


def _pending(service: str, target: str, *, not_before: float) -> Any:
    from fogmig.platform.controller.actions import PendingMove

    return PendingMove(service, target, "mobility", "test", not_before, attempts=2)


def test_an_unanswered_command_goes_again_under_its_own_id() -> None:
    fog = Fog()
    launch = commanded(fog)
    [again] = launches(fog.restart(1.5))
    assert again.resend
    assert again.command == launch.command  # same id, same date: an agent that took it knows
    assert fog.core.inflight["s1"].resumed
    assert launches(fog.core.tick(200.0)) == []  # and nothing new while it waits


def test_a_replay_refusal_is_the_acknowledgement_it_missed() -> None:
    fog = Fog()
    launch = commanded(fog)
    fog.restart(1.5)
    cid = launch.command.command_id
    actions = fog.core.on_rejected(
        "s1", cid, "command was already taken: a replay", 101.0, error_type="CommandReplayedError"
    )
    assert of(actions, EventKind.ACCEPTED)
    assert fog.core.inflight["s1"].acked
    assert launches(fog.core.tick(150.0)) == []


def test_any_other_refusal_of_the_resent_command_is_a_failure_and_retried() -> None:
    fog = Fog()
    launch = commanded(fog)
    fog.restart(1.5)
    actions = fog.core.on_rejected(
        "s1", launch.command.command_id, "no such service", 101.0, error_type="ServiceError"
    )
    assert of(actions, EventKind.REJECTED)
    assert "s1" not in fog.core.inflight


def test_its_migration_done_after_the_restart_ends_it_as_usual() -> None:
    fog = Fog()
    launch = commanded(fog)
    fog.core.on_ack("s1", launch.command.command_id, 1.1)
    assert fog.restart(1.5) == []  # taken: not sent again
    cmd = launch.command
    record = MigrationRecord(
        migration_id="m1",
        service="s1",
        source="gw1",
        destination="gw2",
        technique=cmd.technique,
        outcome=Outcome.COMPLETED,
    )
    done = MigrationDone(
        node="gw1",
        command_id=cmd.command_id,
        migration_id="m1",
        service="s1",
        outcome=Outcome.COMPLETED,
        record=record,
    )
    [event] = of(fog.core.on_done(done, 110.0), EventKind.DONE)
    assert event.data["outcome"] == "completed"
    assert event.data.get("foreign") is None
    assert fog.core.inflight == {}


def test_an_end_that_went_by_unseen_is_learned_from_status_and_presence() -> None:
    fog = Fog()
    launch = commanded(fog)
    fog.core.on_ack("s1", launch.command.command_id, 1.1)
    fog.migrating["gw1"] = ["s1"]
    fog.status("gw1", 1.2)
    fog.restart(1.5)
    # Still under way: the source lists it as migrating.
    fog.status("gw1", 101.0)
    assert of(fog.core.tick(110.0), EventKind.DONE) == []
    # It completed while no controller listened.
    fog.migrating.clear()
    fog.where["s1"] = "gw2"
    fog.status("gw1", 111.0)
    fog.status("gw2", 111.0)
    fog.presence("s1", "gw2", 111.0)
    [event] = of(fog.core.tick(113.5), EventKind.DONE)
    assert event.data["outcome"] == "completed"
    assert event.data["learned"] is True
    assert fog.core.inflight == {}
    assert launches(fog.core.tick(200.0)) == []  # the device's gateway holds it: nothing to do


def test_a_resumed_migration_that_did_not_move_the_service_is_decided_again() -> None:
    fog = Fog()
    launch = commanded(fog)
    fog.core.on_ack("s1", launch.command.command_id, 1.1)
    fog.restart(1.5)
    fog.up(101.0)  # gw1 is not migrating it and still runs it: rolled back while away
    actions = fog.core.tick(103.5)
    [event] = of(actions, EventKind.DONE)
    assert event.data["outcome"] == "not_moved"
    [again] = launches(actions)  # the device is still on gw2: a new decision, a new command
    assert not again.resend
    assert again.command.command_id != launch.command.command_id


def test_a_status_from_before_the_restart_decides_nothing() -> None:
    fog = Fog()
    launch = commanded(fog)
    fog.core.on_ack("s1", launch.command.command_id, 1.1)
    fog.status("gw1", 1.2)
    fog.restart(1.5)
    assert fog.core.tick(150.0) == []
    assert "s1" in fog.core.inflight


def test_an_ended_migration_stays_ended_across_a_restart() -> None:
    fog = Fog()
    fog.core.remember_ended(["m-old"])
    fog.restart(0.0)
    assert "m-old" in fog.core.ended_ids()


# --- when it is written ----------------------------------------------------------------------


def test_moves_are_saved_at_once_attachments_debounced() -> None:
    fog = Fog()
    schedule = SaveSchedule(debounce_s=1.0)
    core = fog.core
    schedule.written(durable_key(core), core.registry.attach_revision)
    fog.up(0.0)
    assert schedule.decide(durable_key(core), core.registry.attach_revision, 0.0) == "no"
    fog.attach("d1", "gw1", 0.0)
    assert schedule.decide(durable_key(core), core.registry.attach_revision, 0.1) == "later"
    assert schedule.due == 1.1
    assert schedule.decide(durable_key(core), core.registry.attach_revision, 1.1) == "now"
    schedule.written(durable_key(core), core.registry.attach_revision)
    fog.attach("d1", "gw2", 2.0)
    core.tick(3.0)
    assert launches(core.tick(3.0)) == []
    assert core.inflight
    assert schedule.decide(durable_key(core), core.registry.attach_revision, 3.0) == "now"


# --- the file ----------------------------------------------------------------------------


def test_the_file_round_trips(tmp_path: Path) -> None:
    fog = Fog()
    commanded(fog)
    store = ControllerStore(path=tmp_path / "state.json", site="t")
    store.save(take(fog.core, 1.5, site="t"))
    saved, error = store.load()
    assert error is None
    assert saved is not None
    assert [f.command.service for f in saved.inflight] == ["s1"]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


def test_a_corrupt_file_is_set_aside_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"format": "fogmig-controller-state", "vers')
    saved, error = ControllerStore(path=path, site="t").load()
    assert saved is None
    assert error is not None
    assert error.kept == tmp_path / "state.json.rejected"
    assert error.kept.read_text().startswith('{"format"')
    assert "starting without it" in str(error)
    assert error.hint
    assert not path.exists()
    assert ControllerStore(path=path, site="t").load() == (None, None)  # the next start is clean


def test_a_file_of_another_site_or_format_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, SavedController(site="old-testbed", saved_at=1.0).model_dump_json().encode())
    saved, error = ControllerStore(path=path, site="t").load()
    assert saved is None
    assert error is not None
    assert "old-testbed" in str(error)
    assert (tmp_path / "state.json.rejected").exists()
    write_atomic(path, json.dumps({"format": "something-else", "version": 1}).encode())
    saved, error = ControllerStore(path=path, site="t").load()
    assert saved is None
    assert error is not None


def test_read_saved_of_a_missing_file_is_nothing(tmp_path: Path) -> None:
    assert read_saved(tmp_path / "none", bytes.decode, what="x", hint="y") == (None, None)


# --- the runner's side -----------------------------------------------------------------------


def test_the_runner_writes_before_sending_and_resumes_from_the_file(tmp_path: Path) -> None:
    from fogmig.platform.controller.runner import Controller

    fog = Fog()
    path = tmp_path / "state.json"
    config = ControllerConfig(default_link=LINK, state_file=path, site="t", debounce_s=1.0)
    events: list[ControllerEvent] = []
    first = Controller(config, bus=None, devices={}.get, on_event=events.append)  # type: ignore[arg-type]
    first.core = fog.core
    launch = commanded(fog)
    first._persist(1.0)  # what handle() does right after the launch is handed out
    assert path.exists()
    second = Controller(config, bus=None, devices={}.get, on_event=events.append)  # type: ignore[arg-type]
    second._resume()
    [again] = launches(second._resend)
    assert again.command == launch.command
    assert again.resend
    [resumed] = [e for e in events if e.kind is EventKind.RESUMED]
    assert resumed.data["inflight"] == ["s1"]
    path.write_text("not json")
    third = Controller(config, bus=None, devices={}.get, on_event=events.append)  # type: ignore[arg-type]
    third._resume()
    assert third.core.inflight == {}
    assert [e.kind for e in events][-1] is EventKind.STATE_REJECTED


def test_an_attachment_saved_before_it_settled_settles_after_the_restart() -> None:
    fog = Fog()
    fog.up(0.0)
    fog.attach("d1", "gw2", 0.0)
    fog.restart(0.5, away_s=0.2)  # 0.5 s on gw2 before, 0.2 s away: 0.3 s of debounce left
    fog.up(100.5)  # the new process's clock: the restart came back at 100.5
    att = fog.core.registry.attachments["d1"]
    assert not att.settled
    assert launches(fog.core.tick(100.75)) == []
    [launch] = launches(fog.core.tick(100.81))
    assert launch.command.destination == "gw2"


def test_a_status_retained_from_after_the_acknowledgement_decides_at_once() -> None:
    fog = Fog()
    launch = commanded(fog)
    fog.core.on_ack("s1", launch.command.command_id, 1.1)
    fog.where["s1"] = "gw2"  # it completed; the nodes said so in statuses the broker kept
    stamped = fog.wall
    fog.restart(1.5)
    later = fog.wall
    fog.wall = stamped  # the retained statuses, as the new subscriber gets them
    fog.up(101.0)
    fog.presence("s1", "gw2", 101.0)
    assert fog.wall < later
    fog.wall = later
    [event] = of(fog.core.tick(103.5), EventKind.DONE)
    assert event.data["outcome"] == "completed"
