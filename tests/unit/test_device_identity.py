"""Each device speaks only for itself and its own service: the controller's check of every
attachment (hostile ones too), its wiring in the controller loop, and the testbed's enrollment
that issues a certificate per device and records the service the controller holds it to."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fogmig.platform.base.errors import ConfigError, IdentityError
from fogmig.platform.bus.schemas import DeviceAttach
from fogmig.platform.bus.topics import topics
from fogmig.platform.controller.actions import EventKind
from fogmig.platform.controller.config import ControllerConfig
from fogmig.platform.controller.devices import attach_refusal
from fogmig.platform.controller.runner import Controller
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import certificate_identity, load_ca, load_certificate
from fogmig.platform.testbed import pki as testbed_pki
from fogmig.platform.testbed import state as state_mod
from fogmig.platform.testbed import topology
from fogmig.platform.testbed.devices import TestbedDevices, enroll_devices
from fogmig.platform.testbed.profiles import load_profile

DIRECTORY = {"d1": "s1", "d2": "s2"}
NODES = ("gw1", "gw2")


def attach(device: str = "d1", service: str = "s1", gateway: str = "gw2") -> DeviceAttach:
    return DeviceAttach(device=device, gateway=gateway, at=time.time(), service=service)


def refusal(topic_device: str | None, msg: DeviceAttach) -> str | None:
    return attach_refusal(topic_device, msg, DIRECTORY.get, nodes=NODES)


def test_a_device_speaking_for_itself_and_its_service_is_believed() -> None:
    assert refusal("d1", attach()) is None
    assert refusal("d2", attach("d2", "s2", "gw1")) is None


@pytest.mark.parametrize(
    ("topic_device", "msg", "why"),
    [
        # d1 (its certificate allows only its own topic) names d2 in the payload.
        ("d1", attach("d2", "s2"), "on the topic of device d1"),
        (None, attach(), "on the topic of device None"),
        # d1 claims a service it does not use, existing or not.
        ("d1", attach("d1", "s2"), "it uses service s1, not s2"),
        ("d1", attach("d1", "nothere"), "it uses service s1, not nothere"),
        # A device the site never enrolled (a certificate of another site cannot connect).
        ("d9", attach("d9", "s1"), "enrolled no such device"),
        # A node may write the attachment topic of its own name (the ACL's pattern).
        ("gw1", attach("gw1", "s1"), "a node's name"),
    ],
)
def test_hostile_attachments_are_refused(
    topic_device: str | None, msg: DeviceAttach, why: str
) -> None:
    reason = refusal(topic_device, msg)
    assert reason is not None
    assert why in reason


def test_a_node_name_is_refused_even_if_a_directory_lists_it() -> None:
    directory = {"gw1": "s1"}
    reason = attach_refusal("gw1", attach("gw1", "s1"), directory.get, nodes=NODES)
    assert reason is not None
    assert "node's name" in reason


def test_the_controller_loop_takes_only_believed_attachments() -> None:
    events: list[Any] = []
    bus: Any = SimpleNamespace(known_nodes=NODES)
    controller = Controller(ControllerConfig(), bus, devices=DIRECTORY.get, on_event=events.append)
    controller.handle(topics.attach("d1"), attach("d1", "s2"))
    controller.handle(topics.attach("d9"), attach("d9", "s9"))
    assert controller.core.registry.attachments == {}
    assert controller.stats.refused_attach == 2
    assert controller.stats.attach_events == 2
    assert [e.kind for e in events] == [EventKind.REFUSED, EventKind.REFUSED]
    assert "not s2" in events[0].message
    controller.handle(topics.attach("d1"), attach("d1", "s1"))
    assert set(controller.core.registry.attachments) == {"d1"}
    assert controller.stats.refused_attach == 2


# --- the testbed's enrollment ------------------------------------------------------------------


@pytest.fixture
def testbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> state_mod.TestbedState:
    monkeypatch.setenv("FOGMIG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FOGMIG_RUN_DIR", str(tmp_path / "run"))
    state = topology.plan(load_profile("lan"), 2)
    state_mod.save_state(state)
    testbed_pki.create_pki(state)
    return state


def test_enrollment_issues_one_certificate_per_device_and_records_its_service(
    testbed: state_mod.TestbedState,
) -> None:
    directory = TestbedDevices()
    assert directory("d0") is None
    files = enroll_devices({"d0": "s0", "d1": "s0"})
    assert set(files) == {"d0", "d1"}
    ca = load_ca(testbed_pki.pki_dir())
    for name, f in files.items():
        cert = load_certificate(f.cert)
        assert certificate_identity(cert) == Identity.device(name)
        cert.verify_directly_issued_by(ca.cert)
        assert f.key.stat().st_mode & 0o777 == 0o600
    assert state_mod.load_state().devices == {"d0": "s0", "d1": "s0"}
    # The controller sees devices enrolled after it started.
    assert directory("d0") == "s0"
    assert directory("d2") is None

    # Enrolling again keeps the certificate; another service rebinds the device.
    before = files["d0"].cert.read_bytes()
    enroll_devices({"d0": "s5"})
    assert files["d0"].cert.read_bytes() == before
    assert directory("d0") == "s5"
    assert directory("d1") == "s0"


def test_enrollment_refuses_node_names_and_invalid_names(
    testbed: state_mod.TestbedState,
) -> None:
    with pytest.raises(ConfigError, match="node names"):
        enroll_devices({"gw1": "s0"})
    with pytest.raises(IdentityError):
        enroll_devices({"Bad_Name": "s0"})
    with pytest.raises(IdentityError, match="reserved"):
        enroll_devices({"operator": "s0"})
    with pytest.raises(ConfigError, match="invalid service name"):
        enroll_devices({"d0": "S 0"})
    assert state_mod.load_state().devices == {}
    assert not (testbed_pki.pki_dir() / "device-gw1.pem").exists()


def test_a_testbed_of_an_earlier_fogmig_is_not_reused(testbed: state_mod.TestbedState) -> None:
    # Its broker lacks the options and ACL of this version, its PKI the operator.
    from fogmig.platform.testbed import broker

    files = broker._write_files(testbed, testbed_pki.load_identity(Identity.broker()))
    assert broker.stale_files(testbed) == []
    assert testbed_pki.missing_identities(testbed) == []
    old_acl = files.acl.read_text().replace("pattern write fogmig/v1/devices/%u/attach\n", "")
    files.acl.write_text(old_acl)
    conf = Path(testbed.broker.config_path)
    conf.write_text(conf.read_text().replace("use_username_as_clientid true\n", ""))
    assert broker.stale_files(testbed) == [conf.name, "acl"]
    testbed_pki.load_identity(Identity.operator()).cert.unlink()
    assert testbed_pki.missing_identities(testbed) == [Identity.operator()]
