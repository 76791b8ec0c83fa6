"""The receiving end of the transfer channel: authenticates peers, answers calls, stores files.

Every connection starts with a mutual TLS 1.3 handshake; the peer's name is the node that its
certificate names, and its HELLO must claim that same name. Files of a migration land in
``root/<migration_id>/<relative path>`` and appear under their name only once verified
(``fogmig.platform.transfer.incoming``). The wire format lives in
``fogmig.platform.transfer.wire``.

Logging: WARNING for refused peers and rejected files, INFO per session, DEBUG per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fogmig.platform.base.errors import FogmigError, SecurityError, TransferError
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.platform.security.pki import IdentityFiles
from fogmig.platform.security.tls import peer_identity, stream_tls
from fogmig.platform.transfer.connection import (
    DEFAULT_IDLE_TIMEOUT,
    READ_LIMIT,
    Connection,
    error_code,
)
from fogmig.platform.transfer.incoming import FileWriter, IncomingWrite
from fogmig.platform.transfer.protection import ChannelSecurity
from fogmig.platform.transfer.wire import (
    MAX_CONTROL_PAYLOAD,
    PROTOCOL_VERSION,
    AuthError,
    Call,
    ErrorReply,
    FileAbort,
    FileBegin,
    FileEnd,
    FileOk,
    FrameType,
    Hello,
    Message,
    PeerError,
    ProtocolError,
    ReceiverOrder,
    ReceiverState,
    Result,
    Welcome,
    check_migration_id,
    decode_message,
    encode_frame,
    encode_message,
)

log = logging.getLogger(__name__)

# A session with no request for this long is closed; TCP keepalive catches dead peers sooner.
DEFAULT_SESSION_TIMEOUT = 600.0
DEFAULT_KEEPALIVE_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class TransferSession:
    """An authenticated connection as the handler sees it."""

    peer: str
    """The node at the other end: the name its certificate carries (trust decisions use it)."""
    node: str
    address: str
    root: Path

    def migration_dir(self, migration_id: str) -> Path:
        """Where files of ``migration_id`` land on this node (not created here)."""
        return self.root / check_migration_id(migration_id)


@dataclass(frozen=True, slots=True)
class CallReply:
    """A call result with binary data (at most 1 MiB), for handlers that return bytes."""

    result: dict[str, Any]
    data: bytes


class CallHandler(Protocol):
    """What the agent implements: one coroutine per call, returning a JSON-able dict.

    Raise a :class:`FogmigError` to refuse; the caller gets it as a :class:`RemoteError`
    with the class name, message and hint. Anything else is logged as a bug and reported as
    an ``internal`` error. If the caller vanishes, the running call is cancelled.
    """

    async def on_call(
        self, session: TransferSession, op: str, params: dict[str, Any]
    ) -> dict[str, Any] | CallReply: ...


class TransferServer:
    """The receiving end: authenticates peers, answers calls, stores verified files.

    ``security`` is the node's identity (its certificate files, or contexts already loaded);
    the node's name is the one it names. Files of a migration land in
    ``root/<migration_id>/<relative path>``. Use as an async context manager; leaving it stops
    listening, ends the sessions and removes partial files.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: ChannelSecurity | IdentityFiles,
        root: Path,
        handler: CallHandler,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        file_writer: FileWriter = os.write,
    ) -> None:
        self.host = host
        self._port = port
        if isinstance(security, IdentityFiles):
            security = ChannelSecurity.from_files(security)
        self.security = security
        self.node = security.node
        self.root = root
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._session_timeout = session_timeout
        self._keepalive_interval = keepalive_interval
        self._file_writer = file_writer
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def port(self) -> int:
        """The listening port (the one the kernel chose when started with port 0)."""
        if self._listener is None:
            return self._port
        return int(self._listener.getsockname()[1])

    async def __aenter__(self) -> TransferServer:
        if not self.root.is_dir():
            raise TransferError(f"node {self.node}: transfer root {self.root} is not a directory")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._listener = socket.create_server((self.host, self._port), family=family)
        except OSError as exc:
            raise TransferError(
                f"node {self.node}: cannot listen on {self.host}:{self._port}: {exc.strerror}"
            ) from exc
        self._listener.setblocking(False)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fogmig-transfer")
        self._accepting = asyncio.create_task(self._accept_loop(), name="transfer-accept")
        log.info("node %s: transfer server on %s:%d", self.node, self.host, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _accept_loop(self) -> None:
        """Accept connections; each one's TLS handshake and session run in a task of its own.

        The loop accepts the sockets itself, rather than ``asyncio.start_server``, so that a
        refused TLS handshake is seen here (and logged with its reason) and so that no byte
        of the handshake is read by anything but TLS.
        """
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                # Out of file descriptors, or a connection reset while queued: keep serving.
                log.warning("node %s: accept failed: %s", self.node, exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(sock), name="transfer-session")
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            peername = sock.getpeername()
            address = f"{peername[0]}:{peername[1]}"
        except OSError:
            address = "?"  # already gone
        try:
            reader, writer, certified = await self._open(sock, address)
        except AuthError as exc:
            log.warning("%s (hint: %s)", exc, exc.hint)
            sock.close()
            return
        except asyncio.CancelledError:
            sock.close()
            return
        conn = Connection(
            reader,
            writer,
            label=f"node {self.node}: peer at {address}",
            idle_timeout=self._idle_timeout,
        )
        incoming: list[IncomingWrite] = []
        try:
            session = await self._handshake(conn, address, certified)
            conn.label = f"node {self.node}: peer {session.peer} ({address})"
            log.info("node %s: session with %s from %s", self.node, session.peer, address)
            await self._session_loop(conn, session, incoming)
        except TransferError as exc:
            log.warning("%s", exc)
            if not isinstance(exc, PeerError) or isinstance(exc, ProtocolError):
                with contextlib.suppress(TransferError):
                    await conn.send_message(
                        ErrorReply(
                            code=error_code(exc),
                            message=str(exc)[:4096],
                            hint=exc.hint[:1024] if exc.hint else None,
                        )
                    )
        except Exception:
            # A bug must cost this session only, never the server or its other sessions.
            log.exception("%s: session failed", conn.label)
        except asyncio.CancelledError:
            # The server is stopping; the session ends here like any other.
            log.info("%s: session ended by server shutdown", conn.label)
        finally:
            for item in incoming:
                item.discard()
            await conn.close()

    async def _open(
        self, sock: socket.socket, address: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str | None]:
        """Streams over ``sock`` after the TLS handshake, and the node that the client's
        certificate names (None in the benchmarks' plaintext mode)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        context = self.security.server
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=context,
                ssl_handshake_timeout=self._idle_timeout if context is not None else None,
            )
        except ssl.SSLError as exc:
            why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            if "CERTIFICATE" in (exc.reason or ""):
                why += f" (its certificate is missing or not of the site CA in {self.security.ca})"
            raise AuthError(
                f"node {self.node}: refused the TLS handshake of {address}: {why}",
                hint=self.security.hint,
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise AuthError(
                f"node {self.node}: TLS handshake of {address} did not complete: "
                f"{str(exc) or type(exc).__name__}",
                hint=self.security.hint,
            ) from exc
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if context is None:
            return reader, writer, None
        try:
            identity = peer_identity(stream_tls(writer))
        except SecurityError as exc:
            transport.abort()
            raise AuthError(
                f"node {self.node}: refused {address}: {exc}", hint=self.security.hint
            ) from exc
        if identity.kind != "node" or identity.name is None:
            transport.abort()
            raise AuthError(
                f"node {self.node}: refused {address}: its certificate is for {identity}, "
                "not a node (only nodes may use the transfer channel)",
                hint=self.security.hint,
            )
        return reader, writer, identity.name

    async def _handshake(
        self, conn: Connection, address: str, certified: str | None
    ) -> TransferSession:
        hello = decode_message(await conn.expect(self._idle_timeout), Hello)
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(f"peer speaks version {hello.version}, this is {PROTOCOL_VERSION}")
        if certified is not None and hello.node != certified:
            raise AuthError(
                f"node {self.node}: the peer at {address} claims to be {hello.node} but its "
                f"certificate names {certified}",
                hint="a node may only speak as the node its certificate names; "
                + self.security.hint,
            )
        if hello.peer != self.node:
            raise AuthError(
                f"{hello.node} at {address} wants node {hello.peer}, this is {self.node}",
                hint="the peer's configuration gives this address to another node",
            )
        await conn.send_message(Welcome(node=self.node))
        return TransferSession(peer=hello.node, node=self.node, address=address, root=self.root)

    async def _session_loop(
        self, conn: Connection, session: TransferSession, incoming: list[IncomingWrite]
    ) -> None:
        order = ReceiverOrder()
        while True:
            idle = order.state is ReceiverState.IDLE
            frame = await conn.read_frame(
                self._session_timeout if idle else self._idle_timeout, eof_ok=idle
            )
            if frame is None:
                log.info("%s: session closed", conn.label)
                return
            order.check(frame.type)
            match frame.type:
                case FrameType.KEEPALIVE:
                    pass
                case FrameType.PING:
                    if len(frame.payload) > 64:
                        raise ProtocolError("PING payload too large")
                    await conn.send(encode_frame(FrameType.PONG, frame.payload))
                case FrameType.CALL:
                    await self._answer_call(conn, session, decode_message(frame, Call))
                case FrameType.FILE_BEGIN:
                    begin = decode_message(frame, FileBegin)
                    order.begin(begin.seq)
                    try:
                        incoming.append(
                            IncomingWrite(self.root, begin, self._file_writer, self.node)
                        )
                    except TransferError as exc:
                        order.refuse()
                        await self._refuse_file(conn, begin, exc)
                case FrameType.FILE_DATA:
                    if order.state is ReceiverState.IN_FILE:
                        current = incoming[-1]
                        try:
                            assert self._executor is not None
                            await current.write_behind(frame.payload, self._executor)
                        except TransferError as exc:
                            incoming.pop().discard()
                            order.refuse()
                            await self._refuse_file(conn, current.begin, exc)
                case FrameType.FILE_END:
                    end = decode_message(frame, FileEnd)
                    if order.end(end.seq):
                        current = incoming.pop()
                        try:
                            await current.settle()
                            current.commit(end)
                        except TransferError as exc:
                            current.discard()
                            await self._refuse_file(conn, current.begin, exc)
                        else:
                            log.debug("%s: stored %s", conn.label, current.shown)
                            await conn.send_message(
                                FileOk(seq=end.seq, size=current.check.received)
                            )
                case FrameType.FILE_ABORT:
                    abort = decode_message(frame, FileAbort)
                    if order.end(abort.seq):
                        current = incoming.pop()
                        current.discard()
                        await conn.send_message(
                            ErrorReply(
                                code="aborted",
                                seq=abort.seq,
                                path=current.begin.path,
                                message=f"sender aborted {current.shown}: {abort.reason}",
                            )
                        )
                case _:
                    raise ProtocolError(f"unexpected {frame.type.name} frame")

    async def _refuse_file(self, conn: Connection, begin: FileBegin, exc: TransferError) -> None:
        log.warning("%s: refused %s/%s: %s", conn.label, begin.migration_id, begin.path, exc)
        await conn.send_message(
            ErrorReply(
                code=error_code(exc),
                seq=begin.seq,
                path=begin.path,
                message=str(exc),
                hint=exc.hint,
            )
        )

    async def _answer_call(self, conn: Connection, session: TransferSession, call: Call) -> None:
        task = asyncio.create_task(
            self._handler.on_call(session, call.op, dict(call.params)), name=f"call-{call.op}"
        )
        try:
            # Keepalives let the caller tell a long operation (a restore) from a dead peer.
            while not task.done():
                await asyncio.wait({task}, timeout=self._keepalive_interval)
                if not task.done():
                    await conn.send(encode_frame(FrameType.KEEPALIVE))
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        reply: Message
        data = b""
        try:
            answer = task.result()
            if isinstance(answer, CallReply):
                data = answer.data
                answer = answer.result
            if not isinstance(answer, dict):
                raise TypeError(f"handler returned {type(answer).__name__}, not a dict")
            reply = Result(id=call.id, result=answer, data_size=len(data))
            frame = encode_message(reply)
            if len(frame) > MAX_CONTROL_PAYLOAD:
                raise ValueError(f"result of {len(frame)} bytes exceeds the call limit")
        except FogmigError as exc:
            reply = ErrorReply(
                code="remote",
                call_id=call.id,
                error_type=type(exc).__name__,
                message=f"{call.op}: {exc}"[:4096],
                hint=exc.hint[:1024] if exc.hint else None,
            )
        except Exception as exc:
            log.exception("%s: call %s failed", conn.label, call.op)
            reply = ErrorReply(
                code="internal",
                call_id=call.id,
                error_type=type(exc).__name__,
                message=f"{call.op}: {exc}"[:4096],
            )
        await conn.send_message(reply)
        if isinstance(reply, Result) and reply.data_size:
            await conn.send(encode_frame(FrameType.FILE_DATA, data))


def remove_migration_dir(root: Path, migration_id: str) -> bool:
    """Delete ``root/<migration_id>`` and everything in it; False if it did not exist.

    Goes through :func:`remove_tree`: whatever CRIU left mounted below it is unmounted first,
    symlinks are never followed and no other file system is entered, so nothing outside the
    migration's directory can be removed.
    """
    target = root / check_migration_id(migration_id)
    try:
        target.lstat()
    except FileNotFoundError:
        return False
    remove_tree(target)
    return True
