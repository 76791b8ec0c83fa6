"""Testbed configuration without root: link profiles, the topology plan and the broker ACL."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogmig.platform.base.errors import ConfigError, TestbedError, UnknownNodeError
from fogmig.platform.testbed import state as state_mod
from fogmig.platform.testbed.broker import (
    CONTROLLER_USER,
    OPERATOR_USER,
    acl_allows,
    acl_rules,
    render_acl,
    topic_matches,
)
from fogmig.platform.testbed.netem import netem_argv
from fogmig.platform.testbed.profiles import LinkProfile, builtin_profiles, load_profile
from fogmig.platform.testbed.topology import plan, same_shape


def test_builtin_profiles_are_the_papers_table_2() -> None:
    profiles = builtin_profiles()
    assert profiles["mobility"] == LinkProfile(name="mobility", rate_mbit=11.34, rtt_ms=122.95)
    assert profiles["orchestration"] == LinkProfile(
        name="orchestration", rate_mbit=72.41, rtt_ms=6.94
    )
    assert profiles["lan"].rate_mbit == 100
    assert profiles["lan"].rtt_ms == 1


def test_load_profile_by_name_and_from_file(tmp_path: Path) -> None:
    assert load_profile("orchestration").rtt_ms == 6.94
    single = tmp_path / "slow.toml"
    single.write_text("rate_mbit = 2\nrtt_ms = 300\n")
    assert load_profile(str(single)) == LinkProfile(name="slow", rate_mbit=2, rtt_ms=300)
    several = tmp_path / "many.toml"
    several.write_text("[a]\nrate_mbit = 1\nrtt_ms = 1\n[b]\nrate_mbit = 2\nrtt_ms = 2\n")
    assert load_profile(f"{several}:b").rate_mbit == 2
    with pytest.raises(ConfigError, match="several profiles"):
        load_profile(str(several))
    with pytest.raises(ConfigError, match="no profile 'c'"):
        load_profile(f"{several}:c")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rate_mbit = 0\nrtt_ms = 10\n", "rate_mbit"),
        ("rate_mbit = -3\nrtt_ms = 10\n", "rate_mbit"),
        ("rate_mbit = 10\nrtt_ms = -1\n", "rtt_ms"),
        ("rate_mbit = 10\n", "rtt_ms"),
        ('rate_mbit = "fast"\nrtt_ms = 1\n', "rate_mbit"),
        ("rate_mbit = 10\nrtt_ms = 1\njitter = 3\n", "jitter"),
        ("rate_mbit = 10\nrtt_ms = [1\n", "not valid TOML"),
        ("", "defines no profile"),
        ("[p]\nrate = 3\n", "invalid profile 'p'"),
        ("p = 3\n", "must be a table"),
    ],
)
def test_bad_profiles_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_profile(str(path))


def test_unknown_profile_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile") as info:
        load_profile("satellite")
    assert info.value.hint is not None
    assert "mobility" in info.value.hint
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(str(tmp_path / "missing.toml"))


def test_plan_addresses_and_full_mesh() -> None:
    st = plan(load_profile("mobility"), 3)
    assert st.node_names == ["gw1", "gw2", "gw3"]
    assert [n.netns for n in st.nodes] == ["fm-gw1", "fm-gw2", "fm-gw3"]
    assert [n.mgmt_ip for n in st.nodes] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert [n.data_ip for n in st.nodes] == ["10.79.0.1", "10.79.0.2", "10.79.0.3"]
    assert (st.device_host.netns, st.device_host.mgmt_ip, st.device_host.data_ip) == (
        "fm-dev",
        "10.77.0.10",
        "10.79.0.100",
    )
    assert (st.broker.netns, st.broker.ip, st.broker.port) == ("fm-broker", "10.77.0.2", 1883)
    assert [link.name for link in st.links] == [
        "gw1-gw2", "gw1-gw3", "gw2-gw3", "dev-gw1", "dev-gw2", "dev-gw3",
    ]  # fmt: skip
    link = st.link("gw2", "gw1")
    assert link.devices == {"gw1": "fd-gw2", "gw2": "fd-gw1"}
    assert (link.rate_mbit, link.rtt_ms) == (11.34, 122.95)
    assert [x.name for x in st.links_of("dev")] == ["dev-gw1", "dev-gw2", "dev-gw3"]
    with pytest.raises(UnknownNodeError):
        st.node("gw9")
    with pytest.raises(ConfigError):
        plan(load_profile("lan"), 0)


def test_same_shape() -> None:
    a = plan(load_profile("mobility"), 2)
    assert same_shape(a, plan(load_profile("mobility"), 2))
    assert not same_shape(a, plan(load_profile("mobility"), 3))
    assert not same_shape(a, plan(load_profile("orchestration"), 2))


def test_state_round_trip_and_absent_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOGMIG_RUN_DIR", str(tmp_path))
    with pytest.raises(TestbedError, match="the testbed is not up") as info:
        state_mod.load_state()
    assert info.value.hint == "fogmig testbed up"
    st = plan(load_profile("orchestration"), 2)
    st.broker.pid = 1234
    state_mod.save_state(st)
    assert state_mod.load_state() == st

    def cut(s: state_mod.TestbedState) -> None:
        s.link("gw1", "gw2").up = False

    state_mod.update_state(cut)
    assert state_mod.load_state().link("gw1", "gw2").up is False
    state_mod.state_path().write_text("{}")
    with pytest.raises(TestbedError, match="unreadable"):
        state_mod.load_state()


def test_acl_nodes_write_only_their_own_tree() -> None:
    rules = acl_rules(["gw1", "gw2"])
    assert acl_allows(rules, "gw1", "write", "fogmig/v1/nodes/gw1/status")
    assert not acl_allows(rules, "gw1", "write", "fogmig/v1/migrations/m1/events")
    assert not acl_allows(rules, "gw1", "write", "fogmig/v1/nodes/gw2/status")
    assert not acl_allows(rules, "gw1", "write", "fogmig/v1/devices/d1/attach")
    assert acl_allows(rules, "gw1", "read", "fogmig/v1/nodes/gw2/status")
    assert not acl_allows(rules, "gw1", "read", "other/topic")
    assert acl_allows(rules, CONTROLLER_USER, "write", "fogmig/v1/nodes/gw1/cmd")
    assert acl_allows(rules, CONTROLLER_USER, "read", "fogmig/v1/devices/d1/attach")
    assert not acl_allows(rules, "anyone", "write", "fogmig/v1/nodes/gw1/status")


def test_acl_a_device_writes_only_its_own_attachment() -> None:
    rules = acl_rules(["gw1", "gw2"])
    assert acl_allows(rules, "d1", "write", "fogmig/v1/devices/d1/attach")
    assert acl_allows(rules, "d1", "read", "fogmig/v1/nodes/gw1/events")
    assert not acl_allows(rules, "d1", "write", "fogmig/v1/devices/d2/attach")
    assert not acl_allows(rules, "d1", "write", "fogmig/v1/devices/+/attach")
    assert not acl_allows(rules, "d1", "write", "fogmig/v1/devices/d1/other")
    assert not acl_allows(rules, "d1", "write", "fogmig/v1/nodes/gw1/cmd")
    assert not acl_allows(rules, "d1", "write", "fogmig/v1/nodes/gw1/services/s1")
    assert not acl_allows(rules, "d1", "write", "fogmig/v1/controller/decisions")
    # A user name that is a filter widens no pattern (Mosquitto refuses to substitute it).
    assert not acl_allows(rules, "+", "write", "fogmig/v1/devices/d2/attach")
    assert not acl_allows(rules, "#", "write", "fogmig/v1/devices/d2/attach")


def test_acl_the_operator_commands_nodes_and_nothing_else() -> None:
    rules = acl_rules(["gw1"])
    assert acl_allows(rules, OPERATOR_USER, "write", "fogmig/v1/nodes/gw1/cmd")
    assert acl_allows(rules, OPERATOR_USER, "read", "fogmig/v1/nodes/gw1/events")
    for topic in (
        "fogmig/v1/nodes/gw1/status",
        "fogmig/v1/nodes/gw1/events",
        "fogmig/v1/nodes/gw1/services/s1",
        "fogmig/v1/controller/decisions",
        "fogmig/v1/devices/d1/attach",
    ):
        assert not acl_allows(rules, OPERATOR_USER, "write", topic), topic


def test_acl_renders_as_mosquitto_acl_file() -> None:
    text = render_acl(acl_rules(["gw1"]))
    assert "user gw1\ntopic read fogmig/v1/#\ntopic write fogmig/v1/nodes/gw1/#\n" in text
    assert "user controller\ntopic readwrite fogmig/v1/#" in text
    assert "user operator\ntopic read fogmig/v1/#\ntopic write fogmig/v1/nodes/+/cmd" in text
    assert "pattern read fogmig/v1/#\npattern write fogmig/v1/devices/%u/attach\n" in text
    # Patterns come before any user line (Mosquitto applies them to every client anyway).
    assert text.index("\npattern ") < text.index("\nuser ")
    assert "user dev" not in text


def test_broker_config_takes_certificates_limits_packets_and_persists(tmp_path: Path) -> None:
    from fogmig.platform.testbed.broker import MAX_PACKET_BYTES, BrokerFiles, render_config
    from fogmig.platform.testbed.state import BrokerInfo

    files = BrokerFiles.of(tmp_path)
    info = BrokerInfo(netns="fm-broker", ip="10.77.0.2", port=1883, config_path="c", log_path="l")
    lines = render_config(info, files).splitlines()
    settings = dict(line.split(None, 1) for line in lines if line and not line.startswith("#"))
    assert settings["allow_anonymous"] == "false"
    assert settings["require_certificate"] == "true"
    assert settings["use_identity_as_username"] == "true"
    assert settings["use_username_as_clientid"] == "true"
    assert settings["tls_version"] == "tlsv1.3"
    assert (settings["cafile"], settings["certfile"], settings["keyfile"]) == (
        str(files.ca),
        str(files.cert),
        str(files.key),
    )
    assert "password_file" not in settings
    assert int(settings["max_packet_size"]) == MAX_PACKET_BYTES > 64 * 1024
    assert settings["persistence"] == "true"
    assert settings["persistence_location"] == f"{files.data}/"
    # The listener comes before its TLS settings, which belong to it.
    assert lines.index("listener 1883 10.77.0.2") < lines.index(f"cafile {files.ca}")


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matching(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_netem_commands() -> None:
    argv = netem_argv("fd-gw2", rate_mbit=11.34, rtt_ms=122.95)
    assert argv[:7] == ["tc", "qdisc", "replace", "dev", "fd-gw2", "root", "netem"]
    assert argv[argv.index("delay") + 1] == "61.475ms"
    assert argv[argv.index("rate") + 1] == "11340kbit"
    assert "loss" not in argv
    assert netem_argv("x", rate_mbit=1, rtt_ms=1, cut=True)[-2:] == ["loss", "100%"]
