"""System tests of the service image and the sensor service run from it (root, no runc).

The service runs from the image's rootfs under chroot, in a network namespace of its own, with a
private tmpfs on /tmp; clients (aiocoap, libcoap's coap-client, raw UDP) reach it from a second
namespace over a veth pair.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from fogmig.services import image
from fogmig.services.client import (
    DeviceLedger,
    PostResult,
    SensorClient,
    ServiceState,
    ServiceUnreachableError,
    encode_reading,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, chroot)"),
]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SERVER_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.2"
NETNS_DIR = Path("/var/run/netns")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def run_in_netns(netns: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async function on its own loop in a fresh thread that lives in ``netns``.

    setns applies to the calling thread only, so the test's own thread and loop stay put.
    """
    box: dict[str, object] = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                box["error"] = OSError(ctypes.get_errno(), "setns failed")
                return
        finally:
            os.close(fd)
        try:
            box["result"] = asyncio.run(fn())
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name=f"in-{netns}")
    t.start()
    t.join(120)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def coap_client_binary() -> str:
    for name in ("coap-client", "coap-client-notls", "coap-client-gnutls", "coap-client-openssl"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip("libcoap's coap-client is not installed")


@dataclass
class RunningSensor:
    server_ns: str
    client_ns: str
    proc: subprocess.Popen[bytes]
    rootfs: Path

    def client(self, fn: Callable[[SensorClient], Awaitable[T]], timeout: float = 3.0) -> T:
        async def session() -> T:
            async with SensorClient(timeout=timeout) as c:
                return await fn(c)

        return run_in_netns(self.client_ns, session)

    def state(self) -> ServiceState:
        return self.client(lambda c: c.get_state(SERVER_IP))

    def coap_client(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net={NETNS_DIR / self.client_ns}", coap_client_binary(), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def log_text(self) -> str:
        # The log lives on the service's private tmpfs; /proc/PID/root sees its mounts.
        return Path(f"/proc/{self.proc.pid}/root/tmp/sensor.log").read_text()


@pytest.fixture(scope="module")
def rootfs() -> Path:
    return asyncio.run(image.ensure_image())


def _make_namespaces(tag: str) -> tuple[str, str]:
    server, client = f"fmsvc-{tag}-s", f"fmsvc-{tag}-c"
    _sh("ip", "netns", "add", server)
    _sh("ip", "netns", "add", client)
    _sh("ip", "-n", server, "link", "add", f"fmsvc{tag}s", "type", "veth",
        "peer", "name", f"fmsvc{tag}c", "netns", client)  # fmt: skip
    for ns, ifname, ip in (
        (server, f"fmsvc{tag}s", SERVER_IP),
        (client, f"fmsvc{tag}c", CLIENT_IP),
    ):
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
        _sh("ip", "-n", ns, "link", "set", ifname, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    return server, client


def _start_sensor(server_ns: str, rootfs: Path, *args: str) -> subprocess.Popen[bytes]:
    # A private mount namespace: the tmpfs on /tmp and /proc vanish with the process and never
    # touch the shared image.
    script = (
        f"mount -t tmpfs tmpfs {rootfs}/tmp && mount -t proc proc {rootfs}/proc && "
        f"exec chroot {rootfs} /usr/bin/python3 /opt/fogmig/sensor.py {' '.join(args)}"
    )
    return subprocess.Popen(
        ["nsenter", f"--net={NETNS_DIR / server_ns}", "unshare", "--mount",
         "--propagation", "private", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_ready(sensor: RunningSensor, limit: float = 20.0) -> ServiceState:
    deadline = time.monotonic() + limit
    while True:
        assert sensor.proc.poll() is None, "the sensor exited during start-up"
        try:
            return sensor.client(lambda c: c.get_state(SERVER_IP, timeout=1.0))
        except ServiceUnreachableError:
            if time.monotonic() > deadline:
                raise


@pytest.fixture(scope="module")
def sensor_service(rootfs: Path) -> Iterator[RunningSensor]:
    tag = uuid.uuid4().hex[:4]
    server, client = _make_namespaces(tag)
    proc = None
    try:
        proc = _start_sensor(server, rootfs, "--state-mb", "4", "--dirty-kbps", "400")
        running = RunningSensor(server, client, proc, rootfs)
        _wait_ready(running)
        yield running
    finally:
        if proc is not None:
            _stop(proc)
        for ns in (server, client):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


# ---- the image ------------------------------------------------------------------------------


def test_image_is_current_and_self_contained(rootfs: Path) -> None:
    assert image.find_image() == rootfs
    info = image.image_info()
    assert info is not None
    assert info.image_id == image.image_id()
    assert info.aiocoap_version == "0.4.17"
    in_image = rootfs / "opt/fogmig/sensor.py"
    assert in_image.read_bytes() == image.SENSOR_SOURCE.read_bytes()
    assert hashlib.sha256(in_image.read_bytes()).hexdigest() == info.sensor_sha256
    # The image's own interpreter runs the service's imports: nothing comes from the host.
    out = subprocess.run(
        ["chroot", str(rootfs), "/usr/bin/python3", "-c",
         "import sys, aiocoap.meta, asyncio; print(sys.version.split()[0], aiocoap.meta.version)"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()  # fmt: skip
    assert out == ["3.11.2", "0.4.17"]


def test_warm_build_is_quick_and_idempotent(rootfs: Path) -> None:
    t0 = time.monotonic()
    again = asyncio.run(image.ensure_image())
    assert again == rootfs
    assert time.monotonic() - t0 < 2.0
    names = sorted(p.name for p in image.images_dir().iterdir() if p.is_dir())
    assert names == sorted([f"base-{image.base_id()}", f"sensor-{image.image_id()}"])


# ---- the service from the image -------------------------------------------------------------


def test_service_runs_from_the_image(sensor_service: RunningSensor) -> None:
    st = sensor_service.state()
    assert st.pid == sensor_service.proc.pid
    assert st.state_mb == 4
    assert st.dirty_kbps == 400
    assert st.rss_kb is not None
    assert st.rss_kb > 4 * 1024
    log = sensor_service.log_text()
    assert "listening on" in log


def test_posts_match_the_ledger(sensor_service: RunningSensor) -> None:
    ledger = DeviceLedger(f"dev-{uuid.uuid4().hex[:6]}")

    async def session(c: SensorClient) -> tuple[ServiceState, bool | None]:
        for i in range(20):
            res = await c.post_reading(SERVER_IP, ledger.next_reading(temp=20 + i / 10))
            assert res.ok, res
            assert res.applied
            assert ledger.record(res)
        # A retry of an already applied reading: acknowledged, not applied again.
        dup = await c.post_reading(
            SERVER_IP, encode_reading({"device": ledger.device, "seq": 5, "temp": 20.4})
        )
        return await c.get_state(SERVER_IP), dup.applied

    st, dup_applied = sensor_service.client(session)
    assert dup_applied is False
    check = ledger.verify(st)
    assert check.matches, check
    assert st.last_seq[ledger.device] == 20
    assert st.devices[ledger.device].count == 20


def test_libcoap_client_interoperates(sensor_service: RunningSensor) -> None:
    device = f"lib-{uuid.uuid4().hex[:6]}"
    ledger = DeviceLedger(device)
    uri = f"coap://{SERVER_IP}/sensor"
    for _ in range(3):
        payload = ledger.next_reading(temp=21)
        done = sensor_service.coap_client("-m", "post", "-t", "50", "-e", payload.decode(), uri)
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert body["applied"] is True
        assert ledger.record(PostResult("2.04", 0.0, body["count"], body["hash"], True))
    got = sensor_service.coap_client("-m", "get", f"coap://{SERVER_IP}/state")
    assert got.returncode == 0, got.stderr
    st = ServiceState.model_validate_json(got.stdout)
    assert st.devices[device].count == 3
    assert ledger.verify(st).matches
    # The same state through aiocoap: two independent implementations agree.
    assert sensor_service.state().devices[device] == st.devices[device]


def test_dirty_rate_is_measured(sensor_service: RunningSensor) -> None:
    # Let the writer fill its measuring window.
    time.sleep(max(0.0, 6.0 - sensor_service.state().uptime_s))
    st = sensor_service.state()
    assert st.dirty_kbps_measured == pytest.approx(400, rel=0.1)
    assert st.dirtied_pages > 0


# ---- bad input ------------------------------------------------------------------------------

GARBAGE = [
    b"",
    b"\x00",
    b"\xff" * 3,
    os.urandom(200),
    b"\x40\x01\x12",  # truncated CoAP header
    b"\x80\x02\x00\x01",  # version 2
    b"\x41\x02\x00\x01\xaa\xb4sensor\xff",  # marker with no payload
    os.urandom(1400),
]


def test_garbage_datagrams_are_ignored(sensor_service: RunningSensor) -> None:
    before = sensor_service.state()

    async def spray() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for dgram in GARBAGE * 5:
                s.sendto(dgram, (SERVER_IP, 5683))
        await asyncio.sleep(0.2)

    run_in_netns(sensor_service.client_ns, spray)
    after = sensor_service.state()
    assert sensor_service.proc.poll() is None
    assert after.count == before.count
    assert after.hash == before.hash


BadRequest = tuple[str, str, bytes, int | None, str]


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "sensor", b'{"device":"x","seq":1}', None, "4.15"),
        ("POST", "sensor", b'{"device":"x","seq":1}', 0, "4.15"),
        ("POST", "sensor", b"{not json", 50, "4.00"),
        ("POST", "sensor", b'{"device":"x"}', 50, "4.00"),
        ("POST", "sensor", b'{"device":"x","seq":-3}', 50, "4.00"),
        ("POST", "sensor", b"\xff\xfe\xfd", 50, "4.00"),
        ("POST", "sensor", encode_reading({"device": "x", "seq": 1, "p": "y" * 1500}), 50, "4.13"),
        ("GET", "nowhere", b"", None, "4.04"),
        ("DELETE", "sensor", b"", None, "4.05"),
        ("PUT", "state", b"{}", 50, "4.05"),
    ],
)
def test_bad_requests_get_coap_errors(sensor_service: RunningSensor, case: BadRequest) -> None:
    method, path, payload, cf, code = case
    before = sensor_service.state()
    reply = sensor_service.client(
        lambda c: c.request(SERVER_IP, method=method, path=path, payload=payload, content_format=cf)
    )
    assert reply.code == code
    after = sensor_service.state()
    assert (after.count, after.hash) == (before.count, before.hash)


def test_libcoap_bad_input(sensor_service: RunningSensor) -> None:
    uri = f"coap://{SERVER_IP}/sensor"
    cases = [
        (["-m", "post", "-t", "0", "-e", '{"device":"z","seq":1}', uri], "4.15"),
        (["-m", "post", "-t", "50", "-e", "[1,2", uri], "4.00"),
        (["-m", "post", "-t", "50", "-e", "a" * 1100, uri], "4.13"),
        (["-m", "get", f"coap://{SERVER_IP}/missing"], "4.04"),
    ]
    for args, code in cases:
        done = sensor_service.coap_client(*args)
        assert code in done.stdout + done.stderr, (args, done.stdout, done.stderr)
    assert sensor_service.state().devices.get("z") is None


# ---- memory footprint -----------------------------------------------------------------------


def test_rss_follows_state_size(rootfs: Path) -> None:
    tag = uuid.uuid4().hex[:4]
    server, client = _make_namespaces(tag)
    proc = None
    try:
        proc = _start_sensor(server, rootfs, "--state-mb", "32", "--dirty-kbps", "0")
        st = _wait_ready(RunningSensor(server, client, proc, rootfs))
        assert st.rss_kb is not None
        # The random state is resident; the interpreter and aiocoap add some tens of MB.
        assert 32 * 1024 < st.rss_kb < (32 + 64) * 1024
    finally:
        if proc is not None:
            _stop(proc)
        for ns in (server, client):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
