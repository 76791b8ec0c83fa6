"""The hold at a migration's destination, on namespaces of its own: a device host, a gateway
that DNATs+SNATs the service's port like an agent does, and the destination node.

Datagrams sent while no service runs are held; once an echo server (standing in for the
restored service, answering like aiocoap with the PKTINFO it received) runs and the hold is
released, every one gets its answer, from the address the device sent it to. With a discard
none does, and the bound keeps only the newest. Run with ``-s`` to see the release timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from fogmig.platform.agent.forwarding import Forwarder, Location
from fogmig.platform.agent.holding import HoldRelay, HoldSettings
from fogmig.platform.base.netns import entered_netns, netns_path

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(120),
]

# Names of our own, apart from the testbed's fm- namespaces and fd-/fmv- interfaces.
DEVICE_NS, GATEWAY_NS, DEST_NS = "fmhold-dev", "fmhold-gw", "fmhold-dst"
DEVICE_IP, GATEWAY_IP, DEST_IP = "10.231.0.100", "10.231.0.1", "10.231.0.2"
PORT = 5711
SERVICE = "held"

ECHO_SERVER = r"""
import socket, sys, time
port, family, delay_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
if family == "inet6":  # as aiocoap binds: dual-stack, SO_REUSEPORT, answers with PKTINFO
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    s.bind(("::ffff:0.0.0.0", port))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
    s.bind(("0.0.0.0", port))
print("ready", flush=True)
while True:
    data, anc, _, addr = s.recvmsg(65535, 256)
    if delay_s:
        time.sleep(delay_s)
    s.sendmsg([b"echo:" + data], anc, 0, addr)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def remove_namespaces() -> None:
    for ns in (DEVICE_NS, GATEWAY_NS, DEST_NS):
        if netns_path(ns).exists():
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def link(a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    """A point-to-point veth link between two (namespace, interface, address) ends, as the
    testbed makes them: one address per host on all its links."""
    (ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b) = a, b
    ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
    for ns, dev, own, peer in ((ns_a, dev_a, ip_a, ip_b), (ns_b, dev_b, ip_b, ip_a)):
        ip("-n", ns, "addr", "add", own, "peer", peer, "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")


@pytest.fixture(scope="module")
def topology() -> Iterator[None]:
    """Device host, gateway and destination; the device also reaches the destination directly.

    The destination's direct link comes first, so its local route names that interface: a
    relay that lost the ingress interface would send the gateway's replies out of it.
    """
    remove_namespaces()
    try:
        for ns in (DEVICE_NS, GATEWAY_NS, DEST_NS):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        # Strict reverse-path filtering at the destination: relayed datagrams must pass it.
        subprocess.run(
            ["nsenter", f"--net={netns_path(DEST_NS)}", "--", "sysctl", "-q", "-w"]
            + [f"net.ipv4.conf.{c}.rp_filter=1" for c in ("all", "default", "lo")],
            check=True,
        )
        link((DEST_NS, "fhd-dev", DEST_IP), (DEVICE_NS, "fhv-dst", DEVICE_IP))
        link((DEST_NS, "fhd-gw", DEST_IP), (GATEWAY_NS, "fhg-dst", GATEWAY_IP))
        link((GATEWAY_NS, "fhg-dev", GATEWAY_IP), (DEVICE_NS, "fhv-gw", DEVICE_IP))
        forwarder = Forwarder(node="gw", data_ip=GATEWAY_IP, netns=GATEWAY_NS)
        asyncio.run(forwarder.update({SERVICE: Location(SERVICE, "dst", DEST_IP, PORT)}))
        yield
    finally:
        remove_namespaces()


@contextlib.contextmanager
def echo_server(family: str, delay_s: float = 0.0) -> Iterator[None]:
    """The service: answers each datagram, after ``delay_s`` (a service's own work)."""
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net={netns_path(DEST_NS)}",
            "--",
            sys.executable,
            "-c",
            ECHO_SERVER,
            str(PORT),
            family,
            str(delay_s),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def device_socket() -> socket.socket:
    with entered_netns(DEVICE_NS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    return sock


async def replies(
    sock: socket.socket, count: int, timeout: float = 5.0
) -> list[tuple[bytes, tuple[str, int]]]:
    """Up to ``count`` datagrams received within ``timeout``."""
    loop = asyncio.get_running_loop()
    got: list[tuple[bytes, tuple[str, int]]] = []
    deadline = loop.time() + timeout
    while len(got) < count:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), remaining)
        except TimeoutError:
            break
        got.append((data, addr))
    return got


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.usefixtures("topology")
@pytest.mark.parametrize("family", ["inet6", "inet"])
async def test_held_datagrams_are_answered_after_release(family: str) -> None:
    relay = HoldRelay(port=PORT, netns=DEST_NS)
    relay.open()
    via_gateway, direct = device_socket(), device_socket()
    n = 20
    try:
        for i in range(n):
            via_gateway.sendto(b"g%d" % i, (GATEWAY_IP, PORT))
            direct.sendto(b"d%d" % i, (DEST_IP, PORT))
        await until(lambda: relay.stats.held == 2 * n)
        with echo_server(family):
            started = time.monotonic()
            release = asyncio.create_task(relay.release())
            from_gateway, from_dest = await asyncio.gather(
                replies(via_gateway, n), replies(direct, n)
            )
            answered_s = time.monotonic() - started
            stats = await release
            assert sorted(d for d, _ in from_gateway) == sorted(b"echo:g%d" % i for i in range(n))
            assert sorted(d for d, _ in from_dest) == sorted(b"echo:d%d" % i for i in range(n))
            assert {a for _, a in from_gateway} == {(GATEWAY_IP, PORT)}
            assert {a for _, a in from_dest} == {(DEST_IP, PORT)}
            assert (stats.released, stats.dropped) == (2 * n, 0)
            print(
                f"\n[{family}] {2 * n} held datagrams: all answered {answered_s * 1e3:.1f} ms "
                f"after release() (relay {stats.release_s * 1e3 if stats.release_s else 0:.1f} ms,"
                f" max held {stats.max_held_latency_s * 1e3:.0f} ms)"
            )
            # The hold is gone: the service answers by itself.
            via_gateway.sendto(b"after", (GATEWAY_IP, PORT))
            assert [d for d, _ in await replies(via_gateway, 1)] == [b"echo:after"]
    finally:
        relay.discard()
        via_gateway.close()
        direct.close()


@pytest.mark.usefixtures("topology")
async def test_a_burst_beyond_the_service_buffer_is_paced_not_lost() -> None:
    relay = HoldRelay(port=PORT, netns=DEST_NS)
    relay.open()
    devices = [device_socket() for _ in range(30)]
    per_device = 20
    try:
        for i in range(per_device):
            for d, sock in enumerate(devices):
                sock.sendto(b"%d.%d" % (d, i) + b"x" * 100, (GATEWAY_IP, PORT))
        total = per_device * len(devices)
        await until(lambda: relay.stats.held == total)
        # About as fast as an aiocoap service: 2000 requests a second.
        with echo_server("inet6", delay_s=0.0005):
            started = time.monotonic()
            release = asyncio.create_task(relay.release())
            got = await asyncio.gather(*(replies(s, per_device, timeout=10) for s in devices))
            answered_s = time.monotonic() - started
            stats = await release
        assert [len(g) for g in got] == [per_device] * len(devices)
        assert (stats.released, stats.dropped) == (total, 0)
        print(
            f"\n[burst] {total} held datagrams from {len(devices)} devices: all answered "
            f"{answered_s * 1e3:.1f} ms after release()"
        )
    finally:
        relay.discard()
        for sock in devices:
            sock.close()


@pytest.mark.usefixtures("topology")
async def test_discard_answers_nothing() -> None:
    relay = HoldRelay(port=PORT, netns=DEST_NS)
    relay.open()
    device = device_socket()
    try:
        for i in range(10):
            device.sendto(b"g%d" % i, (GATEWAY_IP, PORT))
        await until(lambda: relay.stats.held == 10)
        with echo_server("inet6"):
            stats = relay.discard()
            assert (stats.dropped_discard, stats.released) == (10, 0)
            assert await replies(device, 10, timeout=1.0) == []
            device.sendto(b"after", (GATEWAY_IP, PORT))
            assert [d for d, _ in await replies(device, 1)] == [b"echo:after"]
    finally:
        relay.discard()
        device.close()


@pytest.mark.usefixtures("topology")
async def test_the_bound_keeps_the_newest() -> None:
    relay = HoldRelay(port=PORT, netns=DEST_NS, settings=HoldSettings(max_count=5))
    relay.open()
    device = device_socket()
    try:
        for i in range(12):
            device.sendto(b"g%d" % i, (GATEWAY_IP, PORT))
        await until(lambda: relay.stats.held == 12)
        assert relay.buffered == 5
        with echo_server("inet6"):
            stats = await relay.release()
            got = await replies(device, 12, timeout=1.0)
        assert [d for d, _ in got] == [b"echo:g%d" % i for i in range(7, 12)]
        assert (stats.released, stats.dropped_overflow) == (5, 7)
    finally:
        relay.discard()
        device.close()
