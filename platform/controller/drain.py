"""Draining a node: ask its agent to drain, then follow it until the controller has emptied it.

:class:`DrainWatch` reads the node's status, its commands, its events and the decisions;
:func:`drain_node` sends the drain command and waits until the watch says the node is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.bus.client import Bus, CommandRejectedError, Subscription
from fogmig.platform.bus.schemas import (
    BusMessage,
    Cleared,
    CommandAck,
    Decision,
    DrainCommand,
    MigrateCommand,
    MigrationDone,
    NodeStatus,
)
from fogmig.platform.bus.topics import topics


class DrainWatch:
    """Follows a draining node from its status, its commands and its events.

    The node is empty once it reports draining with no service and every migration off it has
    ended: after a post-copy the source still serves memory pages when its container is gone.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.draining = False
        self.services: list[str] | None = None
        self.migrating: dict[str, str] = {}  # command id -> service
        self._told: list[str] | None = None

    @property
    def empty(self) -> bool:
        return self.draining and self.services == [] and not self.migrating

    def update(self, msg: BusMessage | Cleared) -> list[str]:
        """Take one message; return what is worth telling the user."""
        match msg:
            case NodeStatus() if msg.node == self.node:
                if not msg.online:
                    return [f"{self.node} is offline"]
                self.draining = msg.draining
                names = sorted(s.name for s in msg.services)
                self.services = names
                if self.draining and names and names != self._told:
                    self._told = names
                    return [f"{self.node} still runs {len(names)}: {', '.join(names)}"]
            case MigrateCommand():
                self.migrating[msg.command_id] = msg.service
            case CommandAck(accepted=False):
                self.migrating.pop(msg.command_id, None)
            case MigrationDone() if msg.node == self.node:
                self.migrating.pop(msg.command_id, None)
                where = msg.record.destination
                return [f"{msg.service} left {self.node} for {where}: {msg.outcome.value}"]
            case Decision() if msg.source == self.node:
                return [f"moving {msg.service} to {msg.destination} by {msg.technique}"]
            case _:
                pass
        return []

    def describe(self) -> str:
        parts = []
        if not self.draining:
            parts.append("it does not report draining")
        if self.services:
            parts.append(f"it still runs {', '.join(self.services)}")
        if self.migrating:
            parts.append(f"migrations of {', '.join(sorted(self.migrating.values()))} not ended")
        return "; ".join(parts) or "no status from it"


async def drain_node(
    bus: Bus,
    node: str,
    *,
    timeout: float = 600.0,
    on_update: Callable[[str], None] | None = None,
) -> float:
    """Ask ``node`` to drain and wait until it is empty (see :class:`DrainWatch`).

    Returns the seconds it took. The node's agent stops accepting services; the controller
    moves the ones it has. Raises :class:`FogmigError` if the node refuses or is still not
    empty after ``timeout``.
    """
    say = on_update or (lambda _line: None)
    started = time.monotonic()
    watch = DrainWatch(node)
    inbox: asyncio.Queue[BusMessage | Cleared | None] = asyncio.Queue()
    async with contextlib.AsyncExitStack() as stack:
        pumps = []
        for pattern in (
            topics.status(node),
            topics.cmd(node),
            topics.events(node),
            topics.decisions(),
        ):
            sub = await stack.enter_async_context(bus.subscribe(pattern))
            pumps.append(asyncio.create_task(_pump(sub, inbox)))
        try:
            try:
                await bus.request(node, DrainCommand(command_id=uuid.uuid4().hex[:12]), 15.0)
            except CommandRejectedError as exc:
                raise FogmigError(
                    f"{node} refused to drain: {exc.ack.reason}",
                    hint="does this node's agent handle drain commands?",
                ) from exc
            say(f"{node} accepted the drain command")
            async with asyncio.timeout(timeout):
                while not watch.empty:
                    msg = await inbox.get()
                    if msg is None:
                        raise FogmigError("the bus closed before the node was empty")
                    for line in watch.update(msg):
                        say(line)
            return time.monotonic() - started
        except TimeoutError:
            raise FogmigError(
                f"{node} is not empty after {timeout:g} s: {watch.describe()}",
                hint="is `fogmig controller` running? It moves the services off a draining node",
            ) from None
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _pump(sub: Subscription, inbox: asyncio.Queue[BusMessage | Cleared | None]) -> None:
    async for _, msg in sub:
        inbox.put_nowait(msg)
    inbox.put_nowait(None)
