"""The embedded testbed for real: namespaces, the userspace link emulator, Mosquitto.

Brings it up with the paper's two profiles, checks the measured links against the profile,
cuts and restores a link, checks the broker's authentication and ACL, and checks that
``down`` leaves nothing behind, also after a crash of the link emulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fogmig.platform.base import paths
from fogmig.platform.security.identity import Identity
from fogmig.platform.testbed import (
    cut_link,
    load_identity,
    load_state,
    netns,
    restart_broker,
    restore_link,
    set_link,
    topology,
)
from fogmig.platform.testbed import pids as pids_mod
from fogmig.platform.testbed.broker import broker_needles
from fogmig.platform.testbed.devices import enroll_devices
from fogmig.platform.testbed.mqtt import mosquitto_client_args
from fogmig.platform.testbed.probe import measure_rtt, rtt_within
from fogmig.platform.testbed.state import TestbedState, exclusive_use, state_path
from fogmig.platform.testbed.status import collect_status, linkd_needles

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(300),
]

ENV = {**os.environ, "PYTHONSAFEPATH": "1"}
FREE_WAIT = 120.0


def fogmig(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fogmig.platform.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
        cwd="/",
        check=False,
    )


def assert_nothing_left(state: TestbedState | None) -> None:
    assert netns.testbed_namespaces() == []
    assert not netns.link_exists("fmbr0")
    assert not list(Path("/sys/class/net").glob("fmv-*"))
    assert not state_path().exists()
    if state is not None:
        assert not pids_mod.alive(state.broker.pid or -1)
        assert not pids_mod.alive(state.linkd.pid or -1)


@pytest.fixture(scope="module", autouse=True)
def clean_testbed() -> Iterator[None]:
    with exclusive_use(timeout=FREE_WAIT):
        # Someone who does not take the lease may still be using the testbed: wait a while
        # rather than tear theirs down.
        deadline = time.monotonic() + FREE_WAIT
        while state_path().exists():
            if time.monotonic() > deadline:
                pytest.skip("a testbed is up on this machine and stays in use elsewhere")
            time.sleep(1.0)
        fogmig("testbed", "down")  # leftovers of a crashed run
        yield
        fogmig("testbed", "down")


def processes_with(arg: str) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and arg in pids_mod.cmdline(int(p.name))
    ]


def up(profile: str) -> TestbedState:
    done = fogmig("testbed", "up", "--profile", profile, "--nodes", "2")
    assert done.returncode == 0, done.stderr + done.stdout
    return load_state()


def probe_ok(seconds: float) -> list[dict[str, object]]:
    done = fogmig("testbed", "probe", "--json", "--seconds", str(seconds), "--pings", "11")
    results: list[dict[str, object]] = json.loads(done.stdout)
    print(json.dumps(results, indent=1))  # the figures, for the test log
    assert len(results) == 3
    bad = [r for r in results if not (r["rtt_ok"] and r["rate_ok"])]
    assert not bad, f"links out of tolerance: {bad}"
    assert done.returncode == 0
    return results


def test_up_failing_halfway_cleans_up() -> None:
    # A bad calibration figure is only read when the link emulator is configured, after the
    # namespaces, links and broker exist: everything made so far must go again.
    done = fogmig("testbed", "up", env={"FOGMIG_LINK_OVERHEAD_MS": "fast"})
    assert done.returncode == 1
    assert "FOGMIG_LINK_OVERHEAD_MS" in done.stderr
    assert_nothing_left(None)
    broker_conf = str(topology.broker_info().config_path)
    assert processes_with(broker_conf) == []
    assert processes_with(str(topology.linkd_info().config_path)) == []


def test_mobility_up_probe_status_down() -> None:
    state = up("mobility")
    assert state.profile.name == "mobility"
    assert [n.netns for n in state.hosts] == ["fm-gw1", "fm-gw2", "fm-dev"]
    assert sorted(netns.testbed_namespaces()) == ["fm-broker", "fm-dev", "fm-gw1", "fm-gw2"]
    pki = Path(os.environ.get("FOGMIG_STATE_DIR", "/var/lib/fogmig"), "testbed", "pki")
    for stem in ("node-gw1", "node-gw2", "controller", "operator", "broker"):
        assert (pki / f"{stem}.key").stat().st_mode & 0o777 == 0o600

    again = fogmig("testbed", "up", "--profile", "mobility")
    assert again.returncode == 0
    assert "reusing" in again.stdout
    other = fogmig("testbed", "up", "--profile", "orchestration")
    assert other.returncode == 1
    assert "already up" in other.stderr

    # 123 ms RTT: iperf3 omits a 1 s warm-up, then 3 s are measured (about 24 round trips).
    results = probe_ok(3)
    assert {(r["a"], r["b"]) for r in results} == {("gw1", "gw2"), ("dev", "gw1"), ("dev", "gw2")}

    status = fogmig("testbed", "status", "--json")
    assert status.returncode == 0, status.stdout
    doc = json.loads(status.stdout)
    assert doc["broker"]["running"] is True
    assert doc["linkd"]["running"] is True
    assert doc["services"] == {"gw1": [], "gw2": []}
    assert all(link["up"] for link in doc["links"])
    # The probe's traffic went through the emulator.
    assert doc["links"][0]["counters"]["a_to_b"]["bytes"] > 1_000_000
    print(f"linkd CPU: {doc['linkd']['cpu_s']:.2f} s in {doc['linkd']['uptime_s']:.1f} s")

    done = fogmig("testbed", "down")
    assert done.returncode == 0, done.stderr
    assert_nothing_left(state)
    assert "nothing to remove" in fogmig("testbed", "down").stdout


@pytest.fixture(scope="module")
def orchestration() -> Iterator[TestbedState]:
    state = up("orchestration")
    yield state
    fogmig("testbed", "down")


def test_orchestration_probe(orchestration: TestbedState) -> None:
    probe_ok(2)


async def test_cut_restore_and_set_link(orchestration: TestbedState) -> None:
    state = orchestration
    gw1, gw2, dev = state.node("gw1"), state.node("gw2"), state.device_host
    rtt, lost = await measure_rtt(gw1, gw2, count=3, timeout=1.0)
    assert rtt is not None
    assert lost == 0

    await cut_link("gw1", "gw2")
    rtt, lost = await measure_rtt(gw1, gw2, count=3, timeout=0.3)
    assert (rtt, lost) == (None, 3)
    assert load_state().link("gw1", "gw2").up is False
    status = await collect_status()
    assert status.state.link("gw1", "gw2").up is False
    assert status.link_counters["gw1-gw2"]["a_to_b"]["dropped_cut"] >= 3
    # Other links are untouched.
    rtt, lost = await measure_rtt(dev, gw2, count=3, timeout=1.0)
    assert rtt is not None

    await restore_link("gw2", "gw1")
    rtt, lost = await measure_rtt(gw1, gw2, count=5, timeout=1.0)
    assert rtt is not None
    assert rtt_within(6.94, rtt), rtt
    assert load_state().link("gw1", "gw2").up is True

    await set_link("gw1", "gw2", rtt_ms=40.0)
    rtt, _ = await measure_rtt(gw1, gw2, count=5, timeout=1.0)
    assert rtt is not None
    assert rtt_within(40.0, rtt), rtt
    assert load_state().link("gw1", "gw2").rtt_ms == 40.0
    await set_link("gw1", "gw2", rtt_ms=6.94)

    # The CLI drives the same controls.
    assert fogmig("testbed", "cut", "dev", "gw1").returncode == 0
    assert (await measure_rtt(dev, gw1, count=2, timeout=0.3))[0] is None
    assert fogmig("testbed", "restore", "dev", "gw1").returncode == 0
    assert (await measure_rtt(dev, gw1, count=2, timeout=1.0))[0] is not None
    unknown = fogmig("testbed", "cut", "gw1", "gw7")
    assert unknown.returncode == 1
    assert "gw7" in unknown.stderr


def mqtt(
    state: TestbedState, host: str, tool: str, *args: str, user: str | None = None
) -> list[str]:  # fmt: skip
    """``tool`` in ``host``'s namespace, with ``user``'s certificate (None: with none)."""
    argv = ["nsenter", f"--net=/var/run/netns/{state.node(host).netns}", tool, *args]
    if user is None:
        return [*argv, "-h", state.broker.ip, "-p", str(state.broker.port)]
    if user == "controller":
        identity = Identity.controller()
    elif user == "operator":
        identity = Identity.operator()
    elif user in state.node_names:
        identity = Identity.node(user)
    else:
        identity = Identity.device(user)
    return [*argv, *mosquitto_client_args(identity, state)]


async def _sub_pub(
    state: TestbedState, *, sub_user: str, pub_user: str, topic: str, wait: float
) -> tuple[int, str]:
    sub = await asyncio.create_subprocess_exec(
        *mqtt(state, "gw2", "mosquitto_sub", "-t", topic, "-C", "1", "-W", f"{wait:g}",
              user=sub_user),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(0.5)  # let the subscription reach the broker
    pub = await asyncio.create_subprocess_exec(
        *mqtt(state, "gw1", "mosquitto_pub", "-t", topic, "-m", "hello", "-q", "1",
              user=pub_user),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, pub_err = await pub.communicate()
    assert pub.returncode == 0, pub_err
    out, _ = await sub.communicate()
    assert sub.returncode is not None
    return sub.returncode, out.decode().strip()


async def test_broker_authentication_and_acl(orchestration: TestbedState) -> None:
    state = orchestration
    anonymous = await asyncio.create_subprocess_exec(
        *mqtt(state, "gw1", "mosquitto_pub", "-t", "fogmig/v1/nodes/gw1/x", "-m", "x"),
        stderr=asyncio.subprocess.PIPE,
    )
    await anonymous.communicate()
    assert anonymous.returncode != 0  # no TLS, no certificate: no connection

    # A password is no way in: the broker only knows certificates.
    ca = str(load_identity(Identity.broker()).ca)
    wrong = await asyncio.create_subprocess_exec(
        *mqtt(state, "gw1", "mosquitto_pub", "-t", "fogmig/v1/nodes/gw1/x", "-m", "x",
              "-u", "gw1", "-P", "a-password", "--cafile", ca),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await wrong.communicate()
    assert wrong.returncode != 0

    code, got = await _sub_pub(
        state, sub_user="controller", pub_user="gw1", topic="fogmig/v1/nodes/gw1/status", wait=5
    )
    assert (code, got) == (0, "hello")
    # gw1 may not write under gw2's name: the broker drops it and the subscriber times out.
    code, got = await _sub_pub(
        state, sub_user="controller", pub_user="gw1", topic="fogmig/v1/nodes/gw2/status", wait=2
    )
    assert code != 0
    assert got == ""

    old_pid = state.broker.pid
    new_pid = await restart_broker()
    assert new_pid != old_pid
    assert load_state().broker.pid == new_pid
    assert pids_mod.is_ours(new_pid, broker_needles(state.broker))
    # A device (its own certificate, issued on demand) reads the tree and writes only its own
    # attachment; the operator commands nodes.
    enroll_devices({"d0": "s0"})
    code, got = await _sub_pub(
        state, sub_user="d0", pub_user="gw1", topic="fogmig/v1/nodes/gw1/events", wait=5
    )
    assert (code, got) == (0, "hello")
    code, got = await _sub_pub(
        state, sub_user="controller", pub_user="d0", topic="fogmig/v1/devices/d0/attach", wait=5
    )
    assert (code, got) == (0, "hello")
    code, got = await _sub_pub(
        state, sub_user="controller", pub_user="d0", topic="fogmig/v1/devices/d1/attach", wait=2
    )
    assert (code, got) != (0, "hello")
    code, got = await _sub_pub(
        state, sub_user="controller", pub_user="operator", topic="fogmig/v1/nodes/gw2/cmd", wait=5
    )
    assert (code, got) == (0, "hello")


def test_down_after_a_crash(orchestration: TestbedState) -> None:
    state = load_state()
    assert pids_mod.is_ours(state.linkd.pid, linkd_needles(state))
    assert state.linkd.pid is not None
    os.kill(state.linkd.pid, signal.SIGKILL)
    state_path().unlink()
    # A failed restore can leave CRIU's cgroup yard mounted in a node's work directory.
    yard = paths.node_dir("gw1") / "work-test" / ".criu.cgyard.test"
    yard.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(yard)], check=True)
    try:
        done = fogmig("testbed", "down")
        assert done.returncode == 0, done.stderr
        assert "namespaces" in done.stdout
        assert str(yard) not in Path("/proc/self/mounts").read_text()
    finally:
        subprocess.run(["umount", str(yard)], check=False, capture_output=True)
        yard.rmdir()
        yard.parent.rmdir()
    assert_nothing_left(state)
    assert not pids_mod.is_ours(state.broker.pid, broker_needles(state.broker))
