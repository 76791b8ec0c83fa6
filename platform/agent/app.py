"""``fogmig agent``: the daemon of one fog node.

It runs inside the node's network namespace, publishes the node's status (retained, with a
last-will), takes migration commands for its services over MQTT (acknowledging each end to end,
refusing malformed or impossible ones with a typed rejection), drives outgoing migrations, and
serves incoming ones and lazy page requests over the transfer channel (mutual TLS with the
node's certificate). Its parts:
``status`` (status and presence), ``commands`` (commands and migrations), ``linkprobe`` (link
measurements), ``follow`` (where services run, forwarding, hand-overs); this module is the
daemon's lifecycle and transfer calls.

Log levels: INFO for commands, migrations and their outcome; WARNING for rejected commands,
rollbacks and lost connections; DEBUG for every call and page request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fogmig.platform.agent.commands import CommandHandling
from fogmig.platform.agent.config import AgentConfig
from fogmig.platform.agent.follow import Follow
from fogmig.platform.agent.handover import test_pause
from fogmig.platform.agent.hooks import HandoverHooks
from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError, FogmigError, MigrationError, UnknownNodeError
from fogmig.platform.base.heap import HeapKeeper, tune_allocator
from fogmig.platform.base.memreport import MemoryWatch
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.bus.client import Bus
from fogmig.platform.migration.arrival import Fetch, PageChannels, WireCount
from fogmig.platform.migration.destination import Destination
from fogmig.platform.migration.handover.compaction import closed_migrations
from fogmig.platform.migration.handover.messages import (
    GetPages,
    GetPagesOk,
    PageRun,
    Refused,
    Reply,
    decode_call,
    decode_reply,
    encode_call,
    encode_reply,
)
from fogmig.platform.migration.lazy.errors import PageNotFoundError
from fogmig.platform.migration.lazy.stream import FetchRuns, fault_pages, stream_channels
from fogmig.platform.security.tls import broker_client_context
from fogmig.platform.transfer.client import TransferClient
from fogmig.platform.transfer.codec import ChunkCodecError, ChunkDecoder, ChunkEncoder
from fogmig.platform.transfer.server import (
    CallReply,
    TransferServer,
    TransferSession,
    remove_migration_dir,
)
from fogmig.services.image import find_image

log = logging.getLogger(__name__)

JOURNAL_KEEP_CLOSED = 64
"""Closed migrations the journal keeps (the newest) when it is compacted."""
JOURNAL_COMPACT_AT = 128
"""Closed migrations above which the journal is compacted at the next idle moment."""
MAX_PAGES_PER_CALL = 256  # 1 MiB: the transfer channel's limit for binary call results


class Agent(CommandHandling):
    """One node's agent; use :meth:`run` inside the node's network namespace."""

    def __init__(self, config: AgentConfig, *, hooks: HandoverHooks | None = None) -> None:
        """``hooks``: what the agent does for the devices' traffic at each point of a
        hand-over; by default its :class:`Follow` (``NoHooks`` leaves the traffic alone)."""
        super().__init__(config)
        self.follow = Follow(
            node=config.node,
            data_ip=config.data_ip,
            routing=self.forwarder,
            port_of=self._service_port,
            addresses={**config.peers, config.node: config.data_ip},
        )
        """Where services run, this node's forwarding, and its side of every hand-over."""
        self._setup_handover(hooks if hooks is not None else self.follow)
        self.destination = Destination(
            node=config.node,
            runtime=self.runtime,
            rootfs=self._rootfs,
            bundles=paths.node_dir(config.node) / "bundles",
            incoming=paths.node_dir(config.node) / "incoming",
            fetch_factory=self._fetch_from,
            journal=self.journal,
            timing=self.timing,
            running_here=self.hook_calls.running_here,
            gave_up=self.hook_calls.gave_up,
            owned=self._owned_here,
            pause=test_pause(config.node),
        )
        self.heap = HeapKeeper(
            lambda: bool(self.migrating or self.destination.arrivals),
            on_idle=self._compact_journal,
            name=f"agent {config.node}",
        )
        """Compacts the journal and returns what a migration allocated to the system once the
        node is idle again (the first time once recovery has settled the journal)."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        cfg = self.config
        will = self._status(online=False)
        for sub in ("incoming", "outgoing", "bundles"):
            (paths.node_dir(self.node) / sub).mkdir(parents=True, exist_ok=True)
        # Incoming migrations a stopped agent left are settled before any call is served.
        await self.destination.start()
        async with (
            TransferServer(
                host=cfg.data_ip,
                port=cfg.transfer_port,
                security=self.channel,
                root=paths.node_dir(self.node) / "incoming",
                handler=self,
            ),
            Bus(
                host=cfg.broker_host,
                port=cfg.broker_port,
                tls=broker_client_context(cfg.identity),
                username=cfg.mqtt_username if cfg.mqtt_password is not None else None,
                password=cfg.mqtt_password,
                # The site's broker names the client by its certificate (the node) anyway.
                client_id=self.node,
                will=will,
                on_invalid=self._on_invalid,
            ) as bus,
        ):
            self.bus = bus
            log.info("agent %s: serving on %s:%d", self.node, cfg.data_ip, cfg.transfer_port)
            await self._recover_outgoing()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._status_loop(stop), name="status")
                tg.create_task(self._command_loop(stop), name="commands")
                tg.create_task(self._presence_loop(), name="presence")
                tg.create_task(self._links_loop(stop), name="links")
                tg.create_task(self.heap.run(stop), name="heap")
                await stop.wait()
                # While the bus and the channel still work: let migrations end or settle.
                await self._stop_migrations()
                raise _Stopped
        # unreachable: the TaskGroup always ends in _Stopped

    async def close(self) -> None:
        await self._stop_migrations()
        await self.destination.close()
        await self.follow.close()
        self.journal.close()
        with contextlib.suppress(FogmigError):
            await self.forwarder.remove()

    async def _compact_journal(self) -> None:
        """Bound the journal once enough closed migrations piled up (not at every idle
        moment: the rewrite costs a few milliseconds per thousand entries)."""
        if len(closed_migrations(self.journal.entries)) <= JOURNAL_COMPACT_AT:
            return
        try:
            done = await self.destination.compact_journal(keep_closed=JOURNAL_KEEP_CLOSED)
        except FogmigError as exc:
            log.warning("agent %s: journal not compacted: %s", self.node, exc)
            return
        if done is not None:
            log.info(
                "agent %s: journal compacted: %d migrations dropped, %d entries left",
                self.node,
                len(done.dropped),
                len(done.entries),
            )

    async def _presence_loop(self) -> None:
        """Follow where every service runs and forward its traffic accordingly."""
        assert self.bus is not None
        await self.follow.run(self.bus)

    # ------------------------------------------------------------------ transfer calls

    async def on_call(
        self, session: TransferSession, op: str, params: dict[str, Any]
    ) -> dict[str, Any] | CallReply:
        if op == "drop_probe":
            remove_migration_dir(session.root, f"probe-{session.peer}")
            return {}
        if op == GetPages.op:
            request = decode_call(op, params)
            assert isinstance(request, GetPages)
            return await self._get_pages(request)
        return await self.destination.handle(op, params, session.peer)

    async def _get_pages(self, request: GetPages) -> CallReply:
        mid = request.migration_id
        pages = self.pages.get(mid)
        if pages is None:
            raise MigrationError(
                f"{self.node} serves no pages for {mid}", phase="lazy_pages", migration_id=mid
            )
        budget = MAX_PAGES_PER_CALL
        pieces: list[bytes] = []
        runs: list[int] = []
        for k, (vaddr, nr_pages) in enumerate(
            [(request.vaddr, request.nr_pages)] + [(r.vaddr, r.nr_pages) for r in request.more]
        ):
            nr = min(nr_pages, budget)
            try:
                piece = bytes(await pages.read(request.pid, vaddr, nr)) if nr else b""
            except PageNotFoundError:
                if k == 0:
                    raise
                piece = b""  # a later run the image lacks: none of its pages
            pieces.append(piece)
            runs.append(len(piece) // PAGE_SIZE)
            budget -= runs[-1]
        data = b"".join(pieces)
        # Heaps and interpreter structures shrink to a third with zstd, random state not at
        # all (and costs next to nothing to try): the working set arrives sooner.
        payload = ChunkEncoder().encode(data)
        reply = GetPagesOk(
            migration_id=mid,
            nr_pages=len(data) // PAGE_SIZE,
            tagged=True,
            runs=runs if request.more else [],
        )
        return CallReply(encode_reply(GetPages.op, reply), payload)

    async def _fetch_from(self, source: str, migration_id: str) -> PageChannels:
        """Channels back to the source for the pages of ``migration_id``: one for faults and
        as many for the stream as the measured link needs, opened at once (each a TLS
        handshake)."""
        ip = self.config.peers.get(source)
        if ip is None:
            raise UnknownNodeError(f"{self.node} has no data link to {source}")
        link = self.links.get(source)
        streams = stream_channels(
            link.throughput_bytes_per_s if link else None, link.rtt_s if link else None
        )
        stack = contextlib.AsyncExitStack()

        async def connect() -> TransferClient:
            return await stack.enter_async_context(
                TransferClient.connect(
                    ip, self.config.transfer_port, security=self.channel, peer=source
                )
            )

        try:
            clients = await asyncio.gather(*(connect() for _ in range(1 + streams)))
        except BaseException:
            await stack.aclose()
            raise
        wire = WireCount()
        return PageChannels(
            demand=self._page_fetcher(clients[0], migration_id, wire),
            ahead=[self._runs_fetcher(client, migration_id, wire) for client in clients[1:]],
            close=stack.aclose,
            wire=wire,
            fault_around=fault_pages(
                link.throughput_bytes_per_s if link else None, link.rtt_s if link else None
            ),
        )

    def _page_fetcher(self, client: TransferClient, migration_id: str, wire: WireCount) -> Fetch:
        runs = self._runs_fetcher(client, migration_id, wire)

        async def fetch(pid: int, vaddr: int, nr_pages: int) -> bytes:
            return (await runs(pid, [(vaddr, nr_pages)]))[0]

        return fetch

    def _runs_fetcher(
        self, client: TransferClient, migration_id: str, wire: WireCount
    ) -> FetchRuns:
        async def fetch(pid: int, runs: Sequence[tuple[int, int]]) -> list[bytes]:
            # A reply carries at most 1 MiB; the daemon accepts a prefix and asks again.
            (vaddr, nr_pages), *more = runs
            request = GetPages(
                migration_id=migration_id,
                pid=pid,
                vaddr=vaddr,
                nr_pages=min(nr_pages, MAX_PAGES_PER_CALL),
                more=[PageRun(vaddr=v, nr_pages=min(n, MAX_PAGES_PER_CALL)) for v, n in more],
            )
            op, params = encode_call(request)
            result, data = await client.call_data(op, params, timeout=self.config.fence_timeout_s)
            reply = decode_reply(op, result)
            wire.bytes += len(data)
            return pages_per_run(migration_id, reply, data, len(runs))

        return fetch

    def _rootfs(self) -> Path:
        found = find_image()
        if found is None:
            raise ConfigError(
                f"no service image on {self.node}", hint="run `fogmig image build` on the node"
            )
        return found


def pages_per_run(
    migration_id: str, reply: Reply | Refused, data: bytes, nr_runs: int
) -> list[bytes]:
    """The pages of each run a page call asked for, from its reply and binary data; a refusal,
    a count that does not add up or data that does not decode is a :class:`MigrationError`."""
    if not isinstance(reply, GetPagesOk):
        raise MigrationError(
            f"{migration_id}'s source refused pages: {reply}",
            phase="lazy_pages",
            migration_id=migration_id,
        )
    counts = reply.runs if nr_runs > 1 else [reply.nr_pages]
    if len(counts) != nr_runs or sum(counts) != reply.nr_pages:
        raise MigrationError(
            f"{migration_id}'s source answered {counts} pages for {nr_runs} runs",
            phase="lazy_pages",
            migration_id=migration_id,
        )
    size = reply.nr_pages * PAGE_SIZE
    try:
        pages = (
            ChunkDecoder(max_chunk=max(size, 1)).decode(data, remaining=size)
            if reply.tagged
            else data
        )
        if len(pages) != size:
            raise ChunkCodecError(f"{len(pages)} bytes for {reply.nr_pages} pages")
    except ChunkCodecError as exc:
        raise MigrationError(
            f"pages from {migration_id}'s source do not decode: {exc}",
            phase="lazy_pages",
            migration_id=migration_id,
        ) from exc
    out, offset = [], 0
    for n in counts:
        out.append(pages[offset : offset + n * PAGE_SIZE])
        offset += n * PAGE_SIZE
    return out


def _log_memory(node: str, watch: MemoryWatch) -> None:
    # An operator asked (SIGUSR2): what the agent's memory is made of, and what grew since.
    for line in watch.report().lines():
        log.info("agent %s memory: %s", node, line)


class _Stopped(Exception):
    """Ends the agent's task group on a requested stop."""


async def run_agent(config: AgentConfig) -> None:
    """Run an agent until SIGTERM/SIGINT; exit cleanly, leaving no copy half-arrived."""
    import signal

    if not tune_allocator():
        log.info(
            "agent %s: the allocator is not glibc's; its mapping threshold is left", config.node
        )
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = MemoryWatch()
    loop.add_signal_handler(signal.SIGUSR2, _log_memory, config.node, watch)
    # A service deployed or removed by hand (``fogmig deploy``/``undeploy``): say so now, not
    # at the next report, or gateways keep forwarding its port to where it no longer runs.
    loop.add_signal_handler(signal.SIGHUP, agent.status_now.set)
    try:
        await agent.run(stop)
    except* _Stopped:
        pass
    finally:
        await agent.close()
