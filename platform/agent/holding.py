"""Holding a migrating service's datagrams at its destination until the service runs there.

While the service is frozen, every gateway already forwards its UDP port to the destination
node; a :class:`HoldRelay` there binds the port and keeps what arrives (bounded, oldest dropped
first). Once the restored service runs, :meth:`HoldRelay.release` hands each datagram to it as
if it came straight from its sender, so its replies go back the way the request came (to a
gateway's SNAT address and port, whose conntrack maps them back to the device, or to a device
that talks to this node itself); :meth:`HoldRelay.discard` is the rollback.

What the release relies on (measured on Linux 6.18 in network namespaces; no sysctl and no
extra route is needed, ``rp_filter`` does not apply to datagrams sent to a local address):

- The hold socket (IPv4, as the nodes' addresses are) binds with SO_REUSEADDR+SO_REUSEPORT,
  so that the restored service can bind the port beside it: aiocoap binds an AF_INET6
  dual-stack socket with SO_REUSEPORT, and CRIU sets both options before it binds a restored
  socket. While both are bound the kernel prefers the AF_INET socket: every IPv4 datagram
  lands in the hold socket. (Two AF_INET sockets of one reuseport group share flows by hash.)
- Fence first: :meth:`~HoldRelay.release` connects the hold socket to a peer that never sends
  (:data:`FENCE_PEER`), which takes it out of the port's lookup at once while what it already
  queued stays readable. Without the fence a relayed datagram, having the same addresses as
  the original, would land in the hold socket again.
- Each datagram leaves a socket with IP_TRANSPARENT (needs CAP_NET_ADMIN) bound to its
  sender's address and port, towards the address it was first sent to (IP_PKTINFO on the
  hold socket records it), over loopback. The conntrack entry its original made on this node
  matches it too, so this node must not NAT the port itself (its own forwarding rule for the
  service goes once the service is located here).
- It is sent with IP_PKTINFO naming the interface the original arrived on: aiocoap answers
  with the PKTINFO it received, interface included. Without it the service sees the interface
  that owns the local route of the address, and on a node whose address sits on several links
  a reply to a sender on another link left by the wrong one and was lost.
- Pacing: a socket's default receive buffer (212992 bytes) takes about 250 small datagrams;
  500 sent at once lost half of them. The relay reads the service's receive queue from
  ``/proc/thread-self/net/udp{,6}`` and sends only while it is under ``queue_limit``.
- A sender whose address is this node's own and whose socket is still bound cannot be
  impersonated (EADDRINUSE): its datagrams are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

from fogmig.platform.base.errors import ServiceError, SetupError
from fogmig.platform.base.netns import entered_netns

log = logging.getLogger(__name__)

IP_TRANSPARENT = 19
"""Linux ``IP_TRANSPARENT``: bind to and send from an address that is not this host's."""
IP_PKTINFO = 8
"""Linux ``IP_PKTINFO`` (missing from Python 3.11's socket module)."""
SO_RCVBUFFORCE = 33
"""Linux ``SO_RCVBUFFORCE``: a receive buffer above ``rmem_max`` (root only)."""
FENCE_PEER = ("127.0.0.1", 9)
"""Where the hold socket is connected at release: no datagram ever comes from there."""

_PKTINFO = struct.Struct("i4s4s")
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
_MAX_DATAGRAM = 65535
_READ_BATCH = 256
_POLL_S = 0.001

Address = tuple[str, int]
HoldState = Literal["new", "holding", "releasing", "closed"]


@dataclass(frozen=True, slots=True)
class HoldSettings:
    """Bounds and pacing of a hold."""

    max_count: int = 1024
    """Most datagrams kept; beyond it the oldest go."""
    max_bytes: int = 1 << 20
    """Most payload bytes kept; beyond it the oldest go."""
    linger_s: float = 0.2
    """How long after relaying the backlog the fenced hold socket is still read and relayed
    (datagrams the kernel had matched to it just before the fence)."""
    queue_limit: int = 64 * 1024
    """Send only while the service's receive queue (kernel bytes) is below this."""
    burst: int = 8
    """Datagrams sent between two looks at the service's queue."""
    listener_timeout_s: float = 2.0
    """How long to wait for a socket of the service on the port before dropping the rest."""
    stall_timeout_s: float = 2.0
    """How long the service may leave its queue full before the rest is dropped."""
    release_timeout_s: float = 30.0
    """The longest a release may take; what is still held then is dropped."""

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1 or self.burst < 1 or self.queue_limit < 1:
            raise ValueError("hold bounds, burst and queue limit must be positive")


@dataclass(slots=True)
class HoldStats:
    """What a hold did, for logs and the migration record."""

    held: int = 0
    """Datagrams taken in (including those dropped later)."""
    late: int = 0
    """Of those, how many arrived once the release had begun."""
    released: int = 0
    """Datagrams handed to the service."""
    dropped_overflow: int = 0
    """Dropped to keep the bounds (oldest first)."""
    dropped_discard: int = 0
    """Dropped by :meth:`HoldRelay.discard`."""
    dropped_unrelayable: int = 0
    """Could not be sent from their sender's address, or the service never took them."""
    max_held_latency_s: float = 0.0
    """Longest time from a datagram's arrival to its relay."""
    release_s: float | None = None
    """Time from the start of the release to the last datagram relayed."""

    @property
    def dropped(self) -> int:
        return self.dropped_overflow + self.dropped_discard + self.dropped_unrelayable

    def as_dict(self) -> dict[str, float | int | None]:
        return {**asdict(self), "dropped": self.dropped}


@dataclass(frozen=True, slots=True)
class HeldDatagram:
    """One datagram as it arrived."""

    data: bytes
    sender: Address
    dst_ip: str | None
    """The address it was sent to (None when the kernel did not say)."""
    ifindex: int
    """The interface it came in on (0 when unknown)."""
    received_at: float


class HoldBuffer:
    """The datagrams held, oldest first, within a count and a byte bound (no I/O)."""

    def __init__(self, *, max_count: int, max_bytes: int, stats: HoldStats) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.stats = stats
        self._items: deque[HeldDatagram] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def push(self, item: HeldDatagram) -> None:
        """Keep ``item``; drop the oldest while a bound is exceeded (``item`` too if alone)."""
        self.stats.held += 1
        self._items.append(item)
        self._bytes += len(item.data)
        while self._items and (len(self._items) > self.max_count or self._bytes > self.max_bytes):
            self._bytes -= len(self._items.popleft().data)
            self.stats.dropped_overflow += 1

    def popleft(self) -> HeldDatagram:
        item = self._items.popleft()
        self._bytes -= len(item.data)
        return item

    def push_front(self, item: HeldDatagram) -> None:
        """Put back a datagram that could not be sent yet (it was counted when held)."""
        self._items.appendleft(item)
        self._bytes += len(item.data)

    def clear(self) -> int:
        """Forget everything; returns how many datagrams that was."""
        n = len(self._items)
        self._items.clear()
        self._bytes = 0
        return n


@dataclass(frozen=True, slots=True)
class PortQueue:
    """The sockets bound to a UDP port, as the kernel lists them."""

    listeners: int
    queued_bytes: int
    """Their receive queues together (kernel bytes, overhead included)."""
    drops: int
    """Datagrams the kernel dropped at them (receive buffer full)."""


def port_queue(tables: Iterable[str], port: int, exclude_inodes: Container[int]) -> PortQueue:
    """Sum up the unconnected sockets on ``port`` in ``/proc/net/udp``-style tables (pure)."""
    listeners = queued = drops = 0
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 13:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port != port or remote_port != 0 or int(fields[9]) in exclude_inodes:
                continue
            listeners += 1
            queued += int(fields[4].split(":")[1], 16)
            drops += int(fields[12])
    return PortQueue(listeners=listeners, queued_bytes=queued, drops=drops)


def parse_pktinfo(ancdata: Iterable[tuple[int, int, bytes]]) -> tuple[str | None, int]:
    """The header destination address and the ingress interface from IP_PKTINFO (pure)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
            ifindex, _spec_dst, addr = _PKTINFO.unpack_from(data)
            return socket.inet_ntoa(addr), ifindex
    return None, 0


def pktinfo_for(sender_ip: str, ifindex: int) -> bytes:
    """IP_PKTINFO for a send: leave from ``sender_ip`` as if arrived on ``ifindex`` (pure)."""
    return _PKTINFO.pack(ifindex, socket.inet_aton(sender_ip), bytes(4))


class Sent(enum.Enum):
    """What became of one send."""

    OK = "ok"
    RETRY = "retry"
    """The send buffer is full: try again shortly."""
    FAILED = "failed"


class RelayPort(Protocol):
    """What the relay loop needs from the node: look at the service's queue, send one."""

    def probe(self) -> PortQueue: ...

    def send(self, item: HeldDatagram, target_ip: str) -> Sent: ...


async def relay_pending(
    buffer: HoldBuffer,
    port: RelayPort,
    *,
    target_ip: str | None,
    settings: HoldSettings,
    stats: HoldStats,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    running: Callable[[], bool] = lambda: True,
) -> None:
    """Send everything in ``buffer``, only while the service keeps its queue short.

    Gives up (counting the rest as unrelayable) when no socket listens on the port for
    ``listener_timeout_s`` or the service leaves its queue full for ``stall_timeout_s``.
    """
    waiting_since: float | None = None
    while len(buffer) and running():
        queue = port.probe()
        if queue.listeners == 0 or queue.queued_bytes >= settings.queue_limit:
            now = clock()
            if waiting_since is None:
                waiting_since = now
            limit = (
                settings.listener_timeout_s if queue.listeners == 0 else settings.stall_timeout_s
            )
            if now - waiting_since >= limit:
                n = buffer.clear()
                stats.dropped_unrelayable += n
                why = "no socket listens" if queue.listeners == 0 else "the service stopped reading"
                log.warning("hold: %s; %d datagrams dropped", why, n)
                return
            await sleep(_POLL_S)
            continue
        waiting_since = None
        for _ in range(min(settings.burst, len(buffer))):
            item = buffer.popleft()
            destination = target_ip or item.dst_ip
            outcome = Sent.FAILED if destination is None else port.send(item, destination)
            if outcome is Sent.RETRY:
                buffer.push_front(item)
                await sleep(_POLL_S)
                break
            if outcome is Sent.OK:
                stats.released += 1
                stats.max_held_latency_s = max(stats.max_held_latency_s, clock() - item.received_at)
            else:
                stats.dropped_unrelayable += 1
        await sleep(0)


class _TransparentSender:
    """Sends held datagrams from their senders' addresses (one socket per sender)."""

    def __init__(self, *, port: int, netns: str | None, own_inodes: set[int]) -> None:
        self.port = port
        self.netns = netns
        self.own_inodes = own_inodes
        self._sockets: dict[Address, socket.socket | None] = {}

    def probe(self) -> PortQueue:
        tables = []
        with _netns(self.netns):
            for name in ("udp", "udp6"):
                with (
                    contextlib.suppress(FileNotFoundError),
                    open(f"/proc/thread-self/net/{name}") as f,
                ):
                    tables.append(f.read())
        return port_queue(tables, self.port, self.own_inodes)

    def send(self, item: HeldDatagram, target_ip: str) -> Sent:
        sock = self._socket_for(item.sender)
        if sock is None:
            return Sent.FAILED
        ancdata = [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo_for(item.sender[0], item.ifindex))]
        try:
            sock.sendmsg([item.data], ancdata, 0, (target_ip, self.port))
        except BlockingIOError:
            return Sent.RETRY
        except OSError as exc:
            log.warning("hold: relaying a datagram of %s:%d failed: %s", *item.sender, exc)
            return Sent.FAILED
        return Sent.OK

    def _socket_for(self, sender: Address) -> socket.socket | None:
        if sender in self._sockets:
            return self._sockets[sender]
        with _netns(self.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            try:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            except PermissionError as exc:
                raise SetupError(
                    "cannot send from a device's address (IP_TRANSPARENT)",
                    hint="the agent needs CAP_NET_ADMIN (run it as root)",
                ) from exc
            # A sender may use the service's port itself, which this node has bound.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            sock.bind(sender)
        except OSError as exc:
            sock.close()
            log.warning("hold: cannot send as %s:%d (%s); its datagrams are dropped", *sender, exc)
            self._sockets[sender] = None
            return None
        except BaseException:
            sock.close()
            raise
        self.own_inodes.add(os.fstat(sock.fileno()).st_ino)
        self._sockets[sender] = sock
        return sock

    def close(self) -> None:
        for sock in self._sockets.values():
            if sock is not None:
                sock.close()
        self._sockets.clear()


@contextlib.contextmanager
def _netns(netns: str | None) -> Iterator[None]:
    if netns is None:
        yield
    else:
        with entered_netns(netns):
            yield


class HoldRelay:
    """Holds one service port on this node from the freeze until the restored service runs.

    Lives in the node's network namespace (the agent's; ``netns`` makes its sockets in another
    one, for tests). Use from the event loop: ``open()``, then ``await release()`` once the
    service runs here, or ``discard()`` on rollback.
    """

    def __init__(
        self,
        *,
        port: int,
        settings: HoldSettings | None = None,
        netns: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        self.port = port
        """The service's UDP port."""
        self.settings = settings or HoldSettings()
        self.netns = netns
        """Network namespace to make the sockets in (None: the caller's)."""
        self.clock = clock
        self.stats = HoldStats()
        self.state: HoldState = "new"
        self._buffer = HoldBuffer(
            max_count=self.settings.max_count, max_bytes=self.settings.max_bytes, stats=self.stats
        )
        self._sock: socket.socket | None = None
        self._sender: _TransparentSender | None = None
        self._own_inodes: set[int] = set()
        self._arrived = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def buffered(self) -> int:
        """Datagrams held right now."""
        return len(self._buffer)

    def open(self) -> None:
        """Bind the port and start holding what arrives."""
        if self.state != "new":
            raise ServiceError(f"hold of port {self.port} is {self.state}, cannot open it")
        loop = asyncio.get_running_loop()
        with _netns(self.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.settings.max_bytes)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.settings.max_bytes)
            sock.setblocking(False)
            sock.bind(("0.0.0.0", self.port))
        except OSError as exc:
            sock.close()
            raise ServiceError(
                f"cannot hold UDP port {self.port}: {exc}",
                hint="a socket without SO_REUSEPORT has the port: is the service running here?",
            ) from exc
        self._sock = sock
        self._own_inodes.add(os.fstat(sock.fileno()).st_ino)
        self._loop = loop
        loop.add_reader(sock.fileno(), self._on_readable)
        self.state = "holding"
        log.info("hold: holding UDP port %d", self.port)

    async def release(self, target_ip: str | None = None) -> HoldStats:
        """Hand everything held to the service that now runs here, then close.

        Each datagram goes to the address it was sent to, or to ``target_ip`` when given
        (the service answers from that address, so it must be the one the senders used).
        """
        if self.state != "holding":
            raise ServiceError(f"hold of port {self.port} is {self.state}, cannot release it")
        self.state = "releasing"
        started = self.clock()

        def running() -> bool:
            return (
                self.state == "releasing"
                and self.clock() - started < self.settings.release_timeout_s
            )

        sender = self._sender = _TransparentSender(
            port=self.port, netns=self.netns, own_inodes=self._own_inodes
        )
        try:
            self._fence()
            self._on_readable()
            deadline: float | None = None
            while running():
                before = self.stats.released
                await relay_pending(
                    self._buffer,
                    sender,
                    target_ip=target_ip,
                    settings=self.settings,
                    stats=self.stats,
                    clock=self.clock,
                    running=running,
                )
                if self.stats.released != before:
                    self.stats.release_s = self.clock() - started
                if deadline is None:
                    deadline = self.clock() + self.settings.linger_s
                remaining = deadline - self.clock()
                if not running() or (remaining <= 0 and not len(self._buffer)):
                    break
                self._arrived.clear()
                if not len(self._buffer):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), remaining)
        finally:
            self._close(drop_as="unrelayable")
        log.info("hold: released UDP port %d: %s", self.port, self.stats.as_dict())
        return self.stats

    def discard(self) -> HoldStats:
        """Drop everything held and close (rollback: the service stays where it was)."""
        if self.state != "closed":
            self._close(drop_as="discard")
            log.info("hold: discarded UDP port %d: %s", self.port, self.stats.as_dict())
        return self.stats

    def _fence(self) -> None:
        assert self._sock is not None
        try:
            self._sock.connect(FENCE_PEER)
        except OSError as exc:
            raise SetupError(
                f"cannot fence the hold socket of port {self.port}: {exc}",
                hint="the node's loopback interface must be up",
            ) from exc

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        got = False
        for _ in range(_READ_BATCH):
            try:
                data, ancdata, _flags, sender = sock.recvmsg(_MAX_DATAGRAM, _CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("hold: reading port %d: %s", self.port, exc)
                break
            dst_ip, ifindex = parse_pktinfo(ancdata)
            self._buffer.push(
                HeldDatagram(
                    data=data,
                    sender=(sender[0], sender[1]),
                    dst_ip=dst_ip,
                    ifindex=ifindex,
                    received_at=self.clock(),
                )
            )
            if self.state == "releasing":
                self.stats.late += 1
            got = True
        if got:
            self._arrived.set()

    def _close(self, *, drop_as: Literal["discard", "unrelayable"]) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._sender is not None:
            self._sender.close()
        n = self._buffer.clear()
        if drop_as == "discard":
            self.stats.dropped_discard += n
        else:
            self.stats.dropped_unrelayable += n
        self.state = "closed"
        self._arrived.set()
