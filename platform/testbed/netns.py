"""Network namespaces, the management bridge, veth pairs and TUN devices of the testbed.

Thin wrappers over ``ip`` (batched per namespace), and TUN devices opened inside a namespace
(:mod:`fogmig.platform.base.netns` enters it for one thread).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from fogmig.platform.base.errors import TestbedError
from fogmig.platform.base.netns import entered_netns, netns_path
from fogmig.platform.base.nodes import NETNS_PREFIX
from fogmig.platform.base.proc import NETNS_DIR, run

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(netns: str, ifname: str) -> int:
    """Attach to the persistent TUN device ``ifname`` in ``netns``; a non-blocking fd."""
    with entered_netns(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            raise TestbedError(f"cannot attach to TUN device {ifname} in {netns}: {exc}") from exc
    return fd


def socket_in_netns(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
) -> socket.socket:
    """A socket that lives in ``netns`` (bind it to one of that namespace's addresses)."""
    with entered_netns(netns):
        return socket.socket(family, kind)


async def ip_batch(commands: Sequence[str], *, netns: str | None = None) -> None:
    """Run ``ip`` commands in one process (``ip -batch``), inside ``netns`` if given."""
    if not commands:
        return
    argv = ["ip", *(("-n", netns) if netns else ()), "-batch", "-"]
    await run(
        argv,
        input_bytes=("\n".join(commands) + "\n").encode(),
        what=f"ip -batch{' in ' + netns if netns else ''}",
    )


async def add_netns(netns: str) -> None:
    await run(["ip", "netns", "add", netns], what=f"create namespace {netns}")
    await ip_batch(["link set lo up"], netns=netns)


def testbed_namespaces() -> list[str]:
    """Every namespace with the testbed's prefix, including those a crashed run left behind."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NETNS_PREFIX))


def namespace_pids(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns`` (as ``ip netns pids`` finds them)."""
    try:
        target = os.stat(netns_path(netns))
    except FileNotFoundError:
        return []
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry.name))
    return pids


async def del_netns(netns: str) -> None:
    done = await run(["ip", "netns", "del", netns], check=False)
    if done.returncode != 0 and netns_path(netns).exists():
        raise TestbedError(f"cannot delete namespace {netns}: {done.stderr.strip()}")


def link_exists(ifname: str) -> bool:
    return Path("/sys/class/net", ifname).exists()


async def del_link(ifname: str) -> None:
    """Delete an interface of the root namespace if it exists."""
    if link_exists(ifname):
        await run(["ip", "link", "del", ifname], check=False)


def root_links(prefix: str) -> list[str]:
    base = Path("/sys/class/net")
    return sorted(p.name for p in base.iterdir() if p.name.startswith(prefix))
