"""The link daemon: one process that carries every emulated data link of the testbed.

For each link it holds the two TUN devices (one in each host's namespace), forwards every
packet read from one end to the other through the link's :class:`LinkDirection` logic, and
answers a small JSON-lines control protocol on a unix socket (status, cut, restore, set).
Logs: INFO for start, stop and every control change; DEBUG for write failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogmig.platform.testbed.linkemu import LinkDirection, WakeupTracker
from fogmig.platform.testbed.netns import open_tun

log = logging.getLogger(__name__)

# Packets read per wake-up of one TUN device before yielding to the others.
READ_BATCH = 64
MAX_PACKET = 65536


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TunEnd(_Model):
    host: str
    netns: str
    ifname: str


class LinkdLink(_Model):
    a: TunEnd
    b: TunEnd
    rate_mbit: float = Field(gt=0)
    rtt_ms: float = Field(ge=0)


class LinkdConfig(_Model):
    socket_path: str
    overhead_ms: float = Field(ge=0, description="round-trip delay of the emulator's own path")
    links: list[LinkdLink]


class ControlRequest(_Model):
    op: Literal["ping", "status", "cut", "restore", "set", "overhead"]
    a: str | None = None
    b: str | None = None
    rate_mbit: float | None = Field(default=None, gt=0)
    rtt_ms: float | None = Field(default=None, ge=0)
    overhead_ms: float | None = Field(default=None, ge=0)


class LinkRuntime(_Model):
    """A link as the daemon sees it now."""

    a: str
    b: str
    rate_mbit: float
    rtt_ms: float
    up: bool
    a_to_b: dict[str, int]
    b_to_a: dict[str, int]


class ControlResponse(_Model):
    ok: bool
    error: str | None = None
    links: list[LinkRuntime] = []
    pid: int = 0
    cpu_s: float = 0.0
    wake_late_ms: float = 0.0
    overhead_ms: float = 0.0
    uptime_s: float = 0.0


@dataclass(eq=False)
class _Direction:
    logic: LinkDirection[bytes]
    out_fd: int
    timer: asyncio.TimerHandle | None = None
    wake_at: float = 0.0
    timed: bool = False  # a real wait, not a packet already due


@dataclass(eq=False)
class _Link:
    spec: LinkdLink
    fds: tuple[int, int]
    forward: _Direction  # a -> b
    backward: _Direction  # b -> a
    up: bool = True

    def runtime(self) -> LinkRuntime:
        return LinkRuntime(
            a=self.spec.a.host,
            b=self.spec.b.host,
            rate_mbit=self.forward.logic.rate_mbit,
            rtt_ms=self.forward.logic.rtt_ms,
            up=self.up,
            a_to_b=self.forward.logic.stats.as_dict(),
            b_to_a=self.backward.logic.stats.as_dict(),
        )


class LinkDaemon:
    """Forwards packets between TUN pairs on one event loop; see the module docstring."""

    def __init__(self, config: LinkdConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.links: list[_Link] = []
        self.started = time.monotonic()
        self.stopping = asyncio.Event()
        self.wakeups = WakeupTracker()
        self.overhead_ms = config.overhead_ms

    def open(self) -> None:
        overhead_s = self.overhead_ms / 2e3
        try:
            for spec in self.config.links:
                fd_a = open_tun(spec.a.netns, spec.a.ifname)
                try:
                    fd_b = open_tun(spec.b.netns, spec.b.ifname)
                except BaseException:
                    os.close(fd_a)
                    raise

                def direction(out_fd: int, spec: LinkdLink = spec) -> _Direction:
                    logic: LinkDirection[bytes] = LinkDirection(
                        rate_mbit=spec.rate_mbit,
                        rtt_ms=spec.rtt_ms,
                        overhead_s=overhead_s,
                    )
                    return _Direction(logic, out_fd)

                link = _Link(spec, (fd_a, fd_b), direction(fd_b), direction(fd_a))
                self.links.append(link)
                self.loop.add_reader(fd_a, self._on_readable, fd_a, link.forward)
                self.loop.add_reader(fd_b, self._on_readable, fd_b, link.backward)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for link in self.links:
            for d in (link.forward, link.backward):
                if d.timer is not None:
                    d.timer.cancel()
            for fd in link.fds:
                self.loop.remove_reader(fd)
                os.close(fd)
        self.links.clear()

    def _on_readable(self, fd: int, d: _Direction) -> None:
        now = self.loop.time()
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("read from fd %d failed: %s", fd, exc)
                break
            due = d.logic.offer(now, packet, len(packet))
            if due is not None and d.timer is None:
                self._schedule(d, due)

    def _schedule(self, d: _Direction, due: float) -> None:
        d.wake_at = self.wakeups.wake_time(due)
        d.timed = d.wake_at > self.loop.time()
        d.timer = self.loop.call_at(d.wake_at, self._deliver, d)

    def _deliver(self, d: _Direction) -> None:
        d.timer = None
        now = self.loop.time()
        if d.timed:
            # Only a real timer tells how late the loop wakes; a packet that was already due
            # waits for the loop's turn, which no earlier timer could shorten.
            self.wakeups.observe(d.wake_at, now)
        for packet in d.logic.pop_due(self.wakeups.horizon(now)):
            try:
                os.write(d.out_fd, packet)
            except OSError as exc:
                # The far end is down or its queue is full: the packet is lost, as on a wire.
                log.debug("write to fd %d failed: %s", d.out_fd, exc)
        nxt = d.logic.next_due()
        if nxt is not None:
            self._schedule(d, nxt)

    def _find(self, a: str | None, b: str | None) -> _Link:
        for link in self.links:
            if {link.spec.a.host, link.spec.b.host} == {a, b}:
                return link
        raise LookupError(f"no link between {a} and {b}")

    def handle(self, req: ControlRequest) -> ControlResponse:
        if req.op == "overhead" and req.overhead_ms is not None:
            self.overhead_ms = req.overhead_ms
            for link in self.links:
                for d in (link.forward, link.backward):
                    d.logic.set_overhead(req.overhead_ms / 2e3)
            log.info("own round-trip overhead set to %.3f ms", req.overhead_ms)
        if req.op in ("cut", "restore", "set"):
            link = self._find(req.a, req.b)
            if req.op == "set":
                now = self.loop.time()
                for d in (link.forward, link.backward):
                    d.logic.set_shape(
                        now,
                        rate_mbit=req.rate_mbit or d.logic.rate_mbit,
                        rtt_ms=d.logic.rtt_ms if req.rtt_ms is None else req.rtt_ms,
                    )
                log.info(
                    "link %s-%s set to %g Mbit/s, %g ms",
                    req.a,
                    req.b,
                    link.forward.logic.rate_mbit,
                    link.forward.logic.rtt_ms,
                )
            else:
                cut = req.op == "cut"
                link.up = not cut
                for d in (link.forward, link.backward):
                    d.logic.set_cut(cut)
                    if cut and d.timer is not None:
                        d.timer.cancel()
                        d.timer = None
                log.info("link %s-%s %s", req.a, req.b, "cut" if cut else "restored")
        usage = os.times()
        return ControlResponse(
            ok=True,
            links=[link.runtime() for link in self.links],
            pid=os.getpid(),
            cpu_s=usage.user + usage.system,
            wake_late_ms=self.wakeups.estimate_s * 1e3,
            overhead_ms=self.overhead_ms,
            uptime_s=time.monotonic() - self.started,
        )

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                try:
                    resp = self.handle(ControlRequest.model_validate_json(line))
                except (ValidationError, LookupError) as exc:
                    resp = ControlResponse(ok=False, error=str(exc), pid=os.getpid())
                writer.write(resp.model_dump_json().encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _serve(config: LinkdConfig) -> None:
    loop = asyncio.get_running_loop()
    daemon = LinkDaemon(config, loop)
    daemon.open()
    sock = config.socket_path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    server = await asyncio.start_unix_server(daemon.serve_client, path=sock)
    os.chmod(sock, 0o600)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    log.info("serving %d links on %s", len(daemon.links), sock)
    try:
        await daemon.stopping.wait()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        daemon.close()
        log.info("stopped")


def load_config(path: Path) -> LinkdConfig:
    return LinkdConfig.model_validate(json.loads(path.read_text()))


def run_linkd(config_path: Path) -> int:
    """Run the daemon until SIGTERM. Timers need sub-millisecond precision, which select()
    gives and epoll (millisecond timeouts) does not: hence the selector loop, not uvloop."""
    config = load_config(config_path)
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(_serve(config))
    finally:
        loop.close()
    return 0
