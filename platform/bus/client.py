"""The fogmig MQTT bus: a typed client over aiomqtt that publishes and receives schema models.

It reconnects by itself (jittered exponential backoff) and restores its subscriptions; invalid
payloads are logged and reported to a callback, never raised into the caller's loop; commands
wait for their end-to-end acknowledgement because a broker drops a denied publish silently.

Log levels: ERROR a broker that refuses the credentials; WARNING a lost connection, an invalid
payload, a dropped message; INFO (re)connections; DEBUG every message in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from fogmig.platform.base.errors import BusError, ConfigError, UnknownNodeError
from fogmig.platform.bus.schemas import (
    RETAINED_KINDS,
    BusMessage,
    Command,
    CommandAck,
    NodeStatus,
    decode,
    encode,
)
from fogmig.platform.bus.subscription import Received, Subscription
from fogmig.platform.bus.topics import PREFIX, SchemaError, parse_topic, topics

__all__ = ["Bus", "Received", "Subscription", "backoff_delay"]

log = logging.getLogger(__name__)

SHORT_LIVED_S = 5.0
"""A connection the broker closes sooner than this after taking it does not reset the backoff."""
FLAPPING_AFTER = 3
"""Short-lived connections in a row after which the bus says why that may be."""

T = TypeVar("T")
InvalidHandler = Callable[[str, bytes, SchemaError], None]

DEFAULT_TIMEOUT_S: Final = 10.0


def backoff_delay(
    attempt: int, *, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """The pause before reconnection attempt ``attempt`` (0-based).

    Exponential up to ``maximum``, then jittered into [half, full] so that nodes that lost the
    broker together do not all come back in the same instant.
    """
    if attempt < 0 or initial <= 0 or maximum < initial:
        raise ValueError(f"bad backoff: attempt={attempt} initial={initial} maximum={maximum}")
    base = min(maximum, initial * 2.0 ** min(attempt, 60))
    return (rng or random).uniform(base / 2, base)


class CommandRejectedError(BusError):
    """The node answered the command with ``accepted=False``; ``ack`` says why."""

    def __init__(self, node: str, ack: CommandAck) -> None:
        self.node = node
        self.ack = ack
        kind = f" ({ack.error_type})" if ack.error_type else ""
        super().__init__(
            f"node {node} rejected command {ack.command_id}{kind}: {ack.reason or 'no reason'}"
        )


class CommandTimeoutError(BusError):
    """No acknowledgement came back from ``node`` in time."""

    def __init__(self, node: str, command_id: str, timeout: float) -> None:
        self.node = node
        self.command_id = command_id
        super().__init__(
            f"no acknowledgement from node {node} for command {command_id} within {timeout:g} s",
            hint=(
                f"is the agent of {node} running, and may this client publish to "
                f"{topics.cmd(node)}? A broker drops a publish its ACL denies without a word"
            ),
        )


@dataclass(slots=True)
class _Connection:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class _Lost(Exception):
    """The connection went away under a call; the caller retries on the next one."""


class Bus:
    """A connection to the fogmig MQTT broker that keeps itself up while it is open.

    ``will`` (a :class:`NodeStatus` with ``online=False``) is published retained by the broker
    when the connection dies abruptly, and by the bus itself on a clean close, so the node's
    status reads offline either way. ``known_nodes`` (when given) is consulted live: messages
    naming another node are rejected in both directions. ``client_id`` must be unique on the
    broker: a second connection with the same id makes the broker drop the first. A site's
    broker sets every client's id to its principal's name whatever it asks for
    (``use_username_as_clientid``), so each principal has one connection at a time.

    ``tls`` (a client context with this principal's certificate, see
    :func:`fogmig.platform.security.broker_client_context`) is how a client proves who it is
    to a site's broker, which takes the certificate's common name as the user name; ``username``
    and ``password`` serve a broker that authenticates by password instead.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        will: NodeStatus | None = None,
        known_nodes: Collection[str] | None = None,
        on_invalid: InvalidHandler | None = None,
        connect_timeout: float = DEFAULT_TIMEOUT_S,
        keepalive: int = 10,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        queue_size: int = 10_000,
    ) -> None:
        if will is not None and will.online:
            raise ConfigError("the last-will status must say online=false")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.known_nodes = known_nodes
        self.connections = 0  # successful connections so far: > 1 means it reconnected
        self.invalid = 0
        self._tls = tls
        self._username = username
        self._password = password
        self._will = will
        self._on_invalid = on_invalid
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()
        self._patterns: Counter[str] = Counter()
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise BusError("this Bus is already open")
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"bus:{self.client_id}")
        try:
            await self._first
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._will is not None and self._conn is not None:
            # A clean DISCONNECT suppresses the will, so say it ourselves.
            offline = self._will.model_copy(update={"at": time.time()})
            with contextlib.suppress(BusError):
                await self.publish(topics.status(offline.node), offline, retain=True, timeout=2.0)
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in list(self._subscriptions):
            sub._end()
        self._subscriptions.clear()
        self._patterns.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _new_client(self) -> aiomqtt.Client:
        will = None
        if self._will is not None:
            status = self._will.model_copy(update={"at": time.time()})
            will = aiomqtt.Will(
                topic=topics.status(status.node),
                payload=encode(topics.status(status.node), status),
                qos=1,
                retain=True,
            )
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self._username,
            password=self._password,
            identifier=self.client_id,
            tls_context=self._tls,
            will=will,
            keepalive=self._keepalive,
            timeout=DEFAULT_TIMEOUT_S,
            logger=log.getChild("mqtt"),
            # Control messages are small: without NODELAY, Nagle's algorithm holds one back
            # until the broker's delayed ACK (about 40 ms on Linux) on every request.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def _supervise(self) -> None:
        assert self._first is not None
        try:
            await self._connect_and_serve(self._first)
        except Exception as exc:
            # A bug, not a network problem: fail loudly instead of hanging the callers.
            log.exception("bus %s stopped on an unexpected error", self.client_id)
            if not self._first.done():
                error = BusError(f"the bus stopped on an unexpected error: {exc!r}")
                error.__cause__ = exc
                self._first.set_exception(error)
        finally:
            self._stop.set()
            for sub in list(self._subscriptions):
                sub._end()

    async def _connect_and_serve(self, first: asyncio.Future[None]) -> None:
        """Connect, serve, and on any loss wait a jittered backoff and connect again."""
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + self._connect_timeout
        attempt = 0
        short_lived = 0  # connections in a row that the broker closed soon after it took them
        while not self._stop.is_set():
            conn: _Connection | None = None
            connected_at = 0.0
            try:
                client = self._new_client()
                async with client:
                    conn = _Connection(client)
                    await self._resubscribe(client)
                    self._conn = conn
                    self._connected.set()
                    self.connections += 1
                    connected_at = loop.time()
                    log.info(
                        "bus %s connected to %s:%d (connection %d)",
                        self.client_id,
                        self.host,
                        self.port,
                        self.connections,
                    )
                    if not first.done():
                        first.set_result(None)
                    await self._serve(conn)
            except MqttConnectError as exc:
                # The broker answered and said no: retrying will not change its mind soon.
                error = BusError(
                    f"broker {self.host}:{self.port} refused client {self.client_id}: {exc}",
                    hint="check the client's certificate (or user name and password) and "
                    "the broker's ACL",
                )
                if not first.done():
                    first.set_exception(error)
                    return
                log.error("%s", error)
            except (aiomqtt.MqttError, BusError) as exc:
                if conn is not None:
                    log.warning(
                        "bus %s lost the broker: %s (if another client connected with the same "
                        "certificate, the broker closed this one: one connection per principal)",
                        self.client_id,
                        exc,
                    )
                else:
                    log.debug("bus %s cannot connect: %s", self.client_id, exc)
            finally:
                self._connected.clear()
                self._conn = None
                if conn is not None:
                    conn.lost.set()
            if self._stop.is_set():
                break
            if conn is not None:
                if loop.time() - connected_at >= SHORT_LIVED_S:
                    attempt = short_lived = 0
                else:
                    # The backoff keeps growing: two clients of one principal would otherwise
                    # close each other's connection many times a second.
                    short_lived += 1
                    if short_lived == FLAPPING_AFTER:
                        log.error(
                            "bus %s: the broker closed %d connections in a row within %g s: is "
                            "another client connected with the same certificate? The broker "
                            "keeps one connection per principal (give each concurrent client "
                            "its own)",
                            self.client_id,
                            short_lived,
                            SHORT_LIVED_S,
                        )
            if not first.done() and loop.time() >= first_deadline:
                first.set_exception(
                    BusError(
                        f"cannot reach the broker at {self.host}:{self.port} "
                        f"within {self._connect_timeout:g} s",
                        hint="is the broker running (fogmig testbed status) and reachable?",
                    )
                )
                return
            delay = backoff_delay(attempt, initial=self._backoff_initial, maximum=self._backoff_max)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        if not first.done():
            first.set_exception(BusError("the bus was closed before it connected"))

    async def _serve(self, conn: _Connection) -> None:
        """Dispatch messages until the connection drops (raises) or the bus stops (returns)."""
        reader = asyncio.create_task(self._read(conn.client))
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # re-raises the reader's MqttError on a lost connection

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._dispatch(str(message.topic), bytes(message.payload))

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """Decode once, hand the model to every matching subscription; never raise."""
        try:
            parsed = aiomqtt.Topic(topic)
        except ValueError:
            return
        matching = [s for s in self._subscriptions if parsed.matches(s.pattern)]
        if not matching:
            return
        try:
            msg = decode(topic, payload, known_nodes=self.known_nodes)
        except SchemaError as exc:
            self.invalid += 1
            log.warning("bus %s: %s", self.client_id, exc)
            if self._on_invalid is not None:
                try:
                    self._on_invalid(topic, payload, exc)
                except Exception:
                    log.exception("the invalid-payload handler failed")
            return
        log.debug("bus %s <- %s %s", self.client_id, topic, type(msg).__name__)
        for sub in matching:
            sub._deliver(Received(topic, msg))

    # --- connection-robust calls -------------------------------------------------------

    async def _on_connection(
        self,
        what: str,
        call: Callable[[aiomqtt.Client, float], Coroutine[Any, Any, T]],
        timeout: float,
    ) -> T:
        """Run ``call`` on the current connection; if the connection drops, retry on the next.

        Raises :class:`BusError` when no connection carries it out within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if self._stop.is_set() or self._task is None:
                raise BusError(f"{what}: the bus is closed")
            if remaining <= 0:
                raise BusError(
                    f"{what}: not done within {timeout:g} s "
                    f"(broker {self.host}:{self.port} {'up' if self.connected else 'unreachable'})"
                )
            try:
                await asyncio.wait_for(self._connected.wait(), remaining)
            except TimeoutError:
                continue
            conn = self._conn
            if conn is None:
                continue
            try:
                return await self._race_loss(conn, call(conn.client, max(remaining, 0.01)))
            except _Lost:
                continue
            except aiomqtt.MqttError as exc:
                if conn.lost.is_set() or not self.connected:
                    continue
                raise BusError(f"{what}: {exc}") from exc

    @staticmethod
    async def _race_loss(conn: _Connection, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(coro)
        lost = asyncio.ensure_future(conn.lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            lost.cancel()
            raise
        lost.cancel()
        if not task.done():
            # The connection went first: let the call finish cancelling before retrying, or
            # its result would be read while still pending.
            task.cancel()
            await asyncio.wait({task})
            raise _Lost
        if task.cancelled():
            raise _Lost
        return task.result()

    async def _resubscribe(self, client: aiomqtt.Client) -> None:
        for pattern in list(self._patterns):
            try:
                await self._subscribe_on(client, pattern)
            except BusError as exc:
                # It was granted before; one refusal must not keep the whole bus offline.
                log.error("bus %s: %s", self.client_id, exc)

    async def _subscribe_on(self, client: aiomqtt.Client, pattern: str) -> None:
        granted = await client.subscribe(pattern, qos=1)
        for code in granted:
            failed = code.is_failure if not isinstance(code, int) else code >= 0x80
            if failed:
                raise BusError(
                    f"broker refused the subscription to {pattern}",
                    hint="check the broker's ACL for this client's user",
                )

    async def _add(self, sub: Subscription) -> None:
        self._subscriptions.add(sub)
        self._patterns[sub.pattern] += 1
        try:
            # Subscribe even when the pattern is already active: the broker then replays the
            # retained messages, which this new subscriber has not seen.
            await self._on_connection(
                f"subscribe {sub.pattern}",
                lambda client, _t: self._subscribe_on(client, sub.pattern),
                self._connect_timeout,
            )
        except BaseException:
            await self._remove(sub)
            raise

    async def _remove(self, sub: Subscription) -> None:
        if sub not in self._subscriptions:
            return
        self._subscriptions.discard(sub)
        self._patterns[sub.pattern] -= 1
        if self._patterns[sub.pattern] > 0:
            return
        del self._patterns[sub.pattern]
        conn = self._conn
        if conn is not None and not self._stop.is_set():
            try:
                await self._race_loss(conn, conn.client.unsubscribe(sub.pattern, timeout=2.0))
            except (_Lost, aiomqtt.MqttError) as exc:
                # The broker forgets subscriptions with the connection; nothing leaks.
                log.debug("unsubscribe %s: %s", sub.pattern, exc)

    # --- public API --------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        model: BusMessage,
        retain: bool = False,
        qos: int = 1,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Validate ``model`` for ``topic`` (as a receiver would) and publish it as JSON.

        Waits for a connection and, at QoS 1, for the broker's PUBACK; a publish interrupted by
        a lost connection is sent again on the next one. Raises :class:`SchemaError` for a
        model that does not fit the topic and :class:`BusError` when it cannot be delivered.
        """
        payload = encode(topic, model, known_nodes=self.known_nodes)
        log.debug("bus %s -> %s %s", self.client_id, topic, type(model).__name__)
        await self._publish_bytes(topic, payload, retain=retain, qos=qos, timeout=timeout)

    async def clear(self, topic: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Remove the retained message of a status topic (an empty retained payload)."""
        ref = parse_topic(topic)
        if ref.kind not in RETAINED_KINDS:
            raise BusError(f"{topic} holds no retained message to clear")
        await self._publish_bytes(topic, b"", retain=True, qos=1, timeout=timeout)

    async def _publish_bytes(
        self, topic: str, payload: bytes, *, retain: bool, qos: int, timeout: float
    ) -> None:
        if qos not in (0, 1, 2):
            raise ConfigError(f"invalid MQTT QoS {qos}")
        await self._on_connection(
            f"publish to {topic}",
            lambda client, t: client.publish(topic, payload, qos=qos, retain=retain, timeout=t),
            timeout,
        )

    def subscribe(self, pattern: str) -> Subscription:
        """A subscription to ``pattern`` (MQTT wildcards allowed), e.g. ``topics.status()``.

        Use it as ``async with bus.subscribe(p) as sub: async for topic, msg in sub: ...``;
        ``async for`` alone works too, and the subscription then lasts until the bus closes.
        Invalid payloads never reach the iterator: they are logged and passed to
        ``on_invalid``. The stream ends when the bus closes; while the bus reconnects it simply
        pauses (the session is clean, so QoS 1 messages sent meanwhile are not replayed, but
        retained ones are).
        """
        try:
            aiomqtt.Wildcard(pattern)
        except ValueError as exc:
            raise BusError(f"invalid subscription pattern {pattern!r}: {exc}") from None
        if not pattern.startswith(PREFIX + "/"):
            raise BusError(f"{pattern} is outside the fogmig topic tree {PREFIX}/")
        if self._task is None or self._stop.is_set():
            raise BusError("subscribe on a bus that is not open")
        return Subscription(self, pattern, self._queue_size)

    async def request(
        self, node: str, command: Command, timeout: float = DEFAULT_TIMEOUT_S
    ) -> CommandAck:
        """Send ``command`` to ``node`` and wait for its :class:`CommandAck`.

        Raises :class:`CommandRejectedError` when the node refuses it and
        :class:`CommandTimeoutError` (a :class:`BusError` naming the node) when no answer comes,
        e.g. because the broker's ACL silently dropped the command.
        """
        if self.known_nodes is not None and node not in self.known_nodes:
            raise UnknownNodeError(
                f"no node {node!r} on this bus; known: {', '.join(sorted(self.known_nodes))}"
            )
        try:
            async with asyncio.timeout(timeout):
                async with self.subscribe(topics.events(node)) as events:
                    await self.publish(topics.cmd(node), command, timeout=timeout)
                    async for _, msg in events:
                        if isinstance(msg, CommandAck) and msg.command_id == command.command_id:
                            if not msg.accepted:
                                raise CommandRejectedError(node, msg)
                            return msg
        except TimeoutError:
            raise CommandTimeoutError(node, command.command_id, timeout) from None
        raise BusError(f"the bus closed while waiting for node {node} to answer")
