"""Agent-to-agent state transfer: authenticated calls and streamed, verified files over TCP.

The source agent connects with :meth:`TransferClient.connect`, calls operations on the
destination agent and streams CRIU image directories into the destination's migration
directory, where :class:`TransferServer` verifies every file before it appears under its name.
The wire format lives in ``fogmig.platform.transfer.wire``.

Logging: WARNING for refused peers and rejected files, INFO per session and per completed
transfer, DEBUG per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import logging
import os
import secrets
import shutil
import socket
import stat
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydantic_core import PydanticSerializationError

from fogmig.platform.base.errors import FogmigError, TransferError
from fogmig.platform.base.nodes import check_node_name
from fogmig.platform.transfer.wire import (
    CHUNK_SIZE,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    NONCE_SIZE,
    PARTIAL_SUFFIX,
    PROTOCOL_VERSION,
    Auth,
    AuthError,
    AuthOk,
    Call,
    Challenge,
    ErrorCode,
    ErrorReply,
    FileAbort,
    FileBegin,
    FileEnd,
    FileOk,
    Frame,
    FrameType,
    Hello,
    IncomingFile,
    IntegrityError,
    Message,
    NoSpaceError,
    PathError,
    PeerError,
    ProtocolError,
    ReceiverOrder,
    ReceiverState,
    RemoteError,
    Result,
    auth_proof,
    check_migration_id,
    check_relative_path,
    check_secret,
    decode_header,
    decode_message,
    encode_frame,
    encode_header,
    encode_message,
    join_relative,
    proof_matches,
)

__all__ = [
    "AuthError",
    "CallHandler",
    "IntegrityError",
    "NoSpaceError",
    "PathError",
    "PeerError",
    "ProgressCallback",
    "ProtocolError",
    "RemoteError",
    "TransferClient",
    "TransferServer",
    "TransferSession",
    "TransferStats",
    "remove_migration_dir",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
FileWriter = Callable[[int, memoryview], int]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 30.0
# A session with no request for this long is closed; TCP keepalive catches dead peers sooner.
DEFAULT_SESSION_TIMEOUT = 600.0
DEFAULT_KEEPALIVE_INTERVAL = 5.0
# StreamReader stops reading from the socket above twice this limit; keep a few chunks in flight.
READ_LIMIT = 4 * CHUNK_SIZE
WRITE_HIGH_WATER = 4 * CHUNK_SIZE
INLINE_WRITE = 64 * 1024


def tune_socket(sock: Any, *, user_timeout: float) -> None:
    """Make a dead peer or a cut link visible to the kernel within ``user_timeout``.

    TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged; keepalive probes find
    a peer that vanished while the connection was idle. Small frames (calls) go out at once.
    """
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(user_timeout / 3))
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", max(1, idle // 2)),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(user_timeout * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class _Connection:
    """One TCP connection speaking frames; every failure of the link becomes a PeerError."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        label: str,
        idle_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.label = label
        self.idle_timeout = idle_timeout
        self.frames_read = 0
        with contextlib.suppress(OSError):  # the peer may already be gone
            tune_socket(writer.get_extra_info("socket"), user_timeout=idle_timeout)
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def read_frame(self, timeout: float | None, *, eof_ok: bool = False) -> Frame | None:
        """The next frame; None on a clean end of stream between frames if ``eof_ok``."""
        try:
            async with asyncio.timeout(timeout):
                header = await self.reader.readexactly(HEADER_SIZE)
                ftype, size = decode_header(header)
                payload = await self.reader.readexactly(size) if size else b""
        except asyncio.IncompleteReadError as exc:
            if eof_ok and not exc.partial:
                return None
            raise PeerError(f"{self.label}: connection closed by the peer") from exc
        except TimeoutError as exc:
            raise PeerError(
                f"{self.label}: nothing received for {timeout:.0f} s (peer hung or link cut)"
            ) from exc
        except OSError as exc:
            raise PeerError(f"{self.label}: connection lost ({exc})") from exc
        self.frames_read += 1
        return Frame(ftype, payload)

    async def expect(self, timeout: float | None) -> Frame:
        frame = await self.read_frame(timeout)
        assert frame is not None
        return frame

    async def send(self, *parts: bytes | memoryview) -> None:
        if self.writer.is_closing():
            raise PeerError(f"{self.label}: connection is closed")
        for part in parts:
            self.writer.write(part)
        await self.drain()

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self.writer.drain()
        except TimeoutError as exc:
            raise PeerError(
                f"{self.label}: the peer took nothing for {self.idle_timeout:.0f} s "
                "(peer hung or link cut)"
            ) from exc
        except OSError as exc:
            raise PeerError(f"{self.label}: connection lost ({exc})") from exc

    async def send_message(self, message: Message) -> None:
        await self.send(encode_message(message))

    async def close(self, *, abort: bool = False) -> None:
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


def _error_code(exc: BaseException) -> ErrorCode:
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, ProtocolError):
        return "protocol"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, PathError):
        return "path"
    if isinstance(exc, NoSpaceError):
        return "no_space"
    return "internal"


_ERROR_CLASS: dict[str, type[TransferError]] = {
    "auth": AuthError,
    "protocol": ProtocolError,
    "integrity": IntegrityError,
    "path": PathError,
    "no_space": NoSpaceError,
}


def _raise_remote(reply: ErrorReply, peer: str) -> TransferError:
    """The local exception for an ERROR frame sent by ``peer``."""
    where = f" ({reply.path})" if reply.path else ""
    message = f"peer {peer} refused{where}: {reply.message}"
    cls = _ERROR_CLASS.get(reply.code)
    if cls is not None:
        return cls(message, hint=reply.hint)
    return RemoteError(message, code=reply.code, error_type=reply.error_type, hint=reply.hint)


# --- server -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferSession:
    """An authenticated connection as the handler sees it."""

    peer: str
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


def _open_subdir(parent_fd: int, name: str, *, shown: str) -> int:
    """Open (creating if needed) a directory below ``parent_fd`` without following symlinks."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    try:
        return os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathError(f"{shown}: not a directory (symlinks are never followed)") from exc
        raise


class _IncomingWrite:
    """A file being written under a temporary name inside its confined directory."""

    def __init__(self, root: Path, begin: FileBegin, write: FileWriter, node: str) -> None:
        self.begin = begin
        self.shown = f"{begin.migration_id}/{begin.path}"
        self.node = node
        self.check = IncomingFile(begin)
        self._write = write
        self.dir_fd = -1
        self.fd = -1
        self._job: Future[None] | None = None
        check_migration_id(begin.migration_id)
        parts = check_relative_path(begin.path)
        self.name = parts[-1]
        self.tmp_name = f".{begin.seq}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        try:
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.dir_fd = _open_subdir(root_fd, begin.migration_id, shown=self.shown)
            finally:
                os.close(root_fd)
            for part in parts[:-1]:
                sub = _open_subdir(self.dir_fd, part, shown=self.shown)
                os.close(self.dir_fd)
                self.dir_fd = sub
            self.fd = os.open(
                self.tmp_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.dir_fd,
            )
        except OSError as exc:
            self.discard()
            raise self._os_error(exc, "open") from exc

    def _os_error(self, exc: OSError, what: str) -> TransferError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpaceError(f"node {self.node}: no space left for {self.shown}")
        return TransferError(f"node {self.node}: cannot {what} {self.shown}: {exc.strerror}")

    def write(self, payload: bytes) -> None:
        for piece in self.check.feed(payload):
            view = memoryview(piece)
            try:
                while view:
                    view = view[self._write(self.fd, view) :]
            except OSError as exc:
                raise self._os_error(exc, "write") from exc

    async def write_behind(self, payload: bytes, executor: ThreadPoolExecutor) -> None:
        """Hash and write ``payload`` in a thread while the next frame is being received.

        One write is in flight per file, so pieces land in order; its error surfaces on the
        next call or in :meth:`settle`.
        """
        await self.settle()
        if len(payload) <= INLINE_WRITE:
            # A thread hand-off costs more than hashing and writing a small piece.
            self.write(payload)
        else:
            self._job = executor.submit(self.write, payload)

    async def settle(self) -> None:
        """Wait for the write in flight and raise its error."""
        if self._job is not None:
            await asyncio.wrap_future(self._job)
            self._job = None

    def commit(self, end: FileEnd) -> None:
        assert self._job is None, "settle() before commit()"
        self.check.finish(end)
        try:
            os.fchmod(self.fd, self.begin.mode)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp_name, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError as exc:
            self.discard()
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise PathError(f"{self.shown}: a directory is in the way") from exc
            raise self._os_error(exc, "store") from exc
        os.close(self.dir_fd)
        self.dir_fd = -1

    def discard(self) -> None:
        """Remove the partial file; safe to call more than once."""
        if self._job is not None:
            # Never close the descriptor under a running write; a chunk takes milliseconds.
            with contextlib.suppress(Exception):
                self._job.result()
            self._job = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_name, dir_fd=self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1


class TransferServer:
    """The receiving end: authenticates peers, answers calls, stores verified files.

    Files of a migration land in ``root/<migration_id>/<relative path>``. Use as an async
    context manager; leaving it stops listening, ends the sessions and removes partial files.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        secret: bytes,
        node: str,
        root: Path,
        handler: CallHandler,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        file_writer: FileWriter = os.write,
    ) -> None:
        self.host = host
        self._port = port
        self._secret = check_secret(secret)
        self.node = check_node_name(node)
        self.root = root
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._session_timeout = session_timeout
        self._keepalive_interval = keepalive_interval
        self._file_writer = file_writer
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def port(self) -> int:
        """The listening port (the one the kernel chose when started with port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> TransferServer:
        if not self.root.is_dir():
            raise TransferError(f"node {self.node}: transfer root {self.root} is not a directory")
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self._port, limit=READ_LIMIT
            )
        except OSError as exc:
            raise TransferError(
                f"node {self.node}: cannot listen on {self.host}:{self._port}: {exc.strerror}"
            ) from exc
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fogmig-transfer")
        log.info("node %s: transfer server on %s:%d", self.node, self.host, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        peername = writer.get_extra_info("peername")
        address = f"{peername[0]}:{peername[1]}" if peername else "?"
        conn = _Connection(
            reader,
            writer,
            label=f"node {self.node}: peer at {address}",
            idle_timeout=self._idle_timeout,
        )
        incoming: list[_IncomingWrite] = []
        try:
            session = await self._handshake(conn, address)
            conn.label = f"node {self.node}: peer {session.peer} ({address})"
            log.info("node %s: session with %s from %s", self.node, session.peer, address)
            await self._session_loop(conn, session, incoming)
        except TransferError as exc:
            log.warning("%s", exc)
            if not isinstance(exc, PeerError) or isinstance(exc, ProtocolError):
                with contextlib.suppress(TransferError):
                    await conn.send_message(ErrorReply(code=_error_code(exc), message=str(exc)))
        except Exception:
            # A bug must cost this session only, never the server or its other sessions.
            log.exception("%s: session failed", conn.label)
        except asyncio.CancelledError:
            # The server is stopping. End normally: Python 3.11's stream callback reports a
            # cancelled connection task as an unhandled error and leaks its socket.
            log.info("%s: session ended by server shutdown", conn.label)
        finally:
            for item in incoming:
                item.discard()
            await conn.close()
            self._sessions.discard(task)

    async def _handshake(self, conn: _Connection, address: str) -> TransferSession:
        hello = decode_message(await conn.expect(self._idle_timeout), Hello)
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(f"peer speaks version {hello.version}, this is {PROTOCOL_VERSION}")
        if hello.peer != self.node:
            raise AuthError(
                f"{hello.node} at {address} wants node {hello.peer}, this is {self.node}"
            )
        client_nonce = bytes.fromhex(hello.nonce)
        server_nonce = secrets.token_bytes(NONCE_SIZE)
        names = {"client": hello.node, "server": self.node}
        await conn.send_message(
            Challenge(
                node=self.node,
                nonce=server_nonce.hex(),
                proof=auth_proof(
                    self._secret,
                    role="server",
                    client_nonce=client_nonce,
                    server_nonce=server_nonce,
                    **names,
                ),
            )
        )
        auth = decode_message(await conn.expect(self._idle_timeout), Auth)
        expected = auth_proof(
            self._secret,
            role="client",
            client_nonce=client_nonce,
            server_nonce=server_nonce,
            **names,
        )
        if not proof_matches(expected, auth.proof):
            raise AuthError(
                f"node {self.node}: {hello.node} at {address} failed to prove it holds the "
                "testbed secret"
            )
        await conn.send_message(AuthOk())
        return TransferSession(peer=hello.node, node=self.node, address=address, root=self.root)

    async def _session_loop(
        self, conn: _Connection, session: TransferSession, incoming: list[_IncomingWrite]
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
                            _IncomingWrite(self.root, begin, self._file_writer, self.node)
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

    async def _refuse_file(self, conn: _Connection, begin: FileBegin, exc: TransferError) -> None:
        log.warning("%s: refused %s/%s: %s", conn.label, begin.migration_id, begin.path, exc)
        await conn.send_message(
            ErrorReply(
                code=_error_code(exc),
                seq=begin.seq,
                path=begin.path,
                message=str(exc),
                hint=exc.hint,
            )
        )

    async def _answer_call(self, conn: _Connection, session: TransferSession, call: Call) -> None:
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


# --- client -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What one transfer moved: file bytes, files, wall time, and bytes on the wire."""

    bytes: int
    files: int
    seconds: float
    wire_bytes: int

    @property
    def mbytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class _OutgoingFile:
    local: Path
    remote: str
    size: int
    mode: int


class _ChunkSource:
    """Reads, hashes and optionally compresses one file, a chunk at a time (in a thread)."""

    def __init__(self, stream: BinaryIO, *, compress: bool) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self._deflater = zlib.compressobj(1) if compress else None
        self.plain_bytes = 0
        self.eof = False

    def next_payload(self) -> bytes:
        data = self._stream.read(CHUNK_SIZE)
        if not data:
            self.eof = True
            return self._deflater.flush() if self._deflater is not None else b""
        self.plain_bytes += len(data)
        self._hash.update(data)
        return self._deflater.compress(data) if self._deflater is not None else data

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def _list_dir(
    local_dir: Path, files: Sequence[str] | None
) -> list[tuple[str, Path, os.stat_result]]:
    """The regular files to send from ``local_dir`` as (relative path, path, lstat)."""
    if not local_dir.is_dir():
        raise TransferError(f"{local_dir} is not a directory")
    found: list[tuple[str, Path, os.stat_result]] = []
    if files is not None:
        for rel in files:
            path = local_dir.joinpath(*check_relative_path(rel))
            found.append((rel, path, _lstat_regular(path)))
        return found

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), rel + "/")
            else:
                found.append((rel, Path(entry.path), _lstat_regular(Path(entry.path))))

    walk(local_dir, "")
    return found


def _lstat_regular(path: Path) -> os.stat_result:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise TransferError(f"cannot send {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise PathError(f"cannot send {path}: not a regular file (symlinks are not sent)")
    return st


class TransferClient:
    """The sending end of one authenticated connection; open it with :meth:`connect`.

    Operations on one client run one at a time. After a :class:`PeerError` the connection is
    unusable; refused files and remote errors leave it usable.
    """

    def __init__(self, conn: _Connection, *, node: str, peer: str) -> None:
        self._conn = conn
        self.node = node
        self.peer = peer
        self._lock = asyncio.Lock()
        self._call_ids = itertools.count()
        self._seqs = itertools.count()
        self._broken: PeerError | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        secret: bytes,
        node: str,
        peer: str,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> AsyncIterator[TransferClient]:
        """Connect to node ``peer`` at host:port as node ``node`` and authenticate both ways."""
        check_secret(secret)
        check_node_name(node)
        check_node_name(peer)
        label = f"node {node}: peer {peer} ({host}:{port})"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"{label}: cannot connect: {exc}") from exc
        conn = _Connection(reader, writer, label=label, idle_timeout=idle_timeout)
        client = cls(conn, node=node, peer=peer)
        try:
            await client._handshake(secret, timeout)
            yield client
        finally:
            await conn.close(abort=client._broken is not None)

    async def _handshake(self, secret: bytes, timeout: float) -> None:
        client_nonce = secrets.token_bytes(NONCE_SIZE)
        await self._conn.send_message(
            Hello(
                version=PROTOCOL_VERSION, node=self.node, peer=self.peer, nonce=client_nonce.hex()
            )
        )
        frame = await self._conn.expect(timeout)
        if frame.type is FrameType.ERROR:
            raise _raise_remote(decode_message(frame, ErrorReply), self.peer)
        challenge = decode_message(frame, Challenge)
        if challenge.node != self.peer:
            raise AuthError(
                f"{self._conn.label}: the node there is {challenge.node}, not {self.peer}"
            )
        server_nonce = bytes.fromhex(challenge.nonce)
        names = {"client": self.node, "server": self.peer}
        expected = auth_proof(
            secret, role="server", client_nonce=client_nonce, server_nonce=server_nonce, **names
        )
        if not proof_matches(expected, challenge.proof):
            raise AuthError(
                f"{self._conn.label}: the peer failed to prove it holds the testbed secret "
                "(impostor or wrong secret)"
            )
        proof = auth_proof(
            secret, role="client", client_nonce=client_nonce, server_nonce=server_nonce, **names
        )
        await self._conn.send_message(Auth(proof=proof))
        frame = await self._conn.expect(timeout)
        if frame.type is FrameType.ERROR:
            raise _raise_remote(decode_message(frame, ErrorReply), self.peer)
        decode_message(frame, AuthOk)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise PeerError(f"{self._conn.label}: channel unusable after: {self._broken}")

    def _mark_broken(self, exc: PeerError) -> None:
        if self._broken is None:
            self._broken = exc
            self._conn.writer.transport.abort()

    async def call(
        self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Run ``op`` on the peer and return its result (see :meth:`call_data`)."""
        result, _ = await self.call_data(op, params, timeout=timeout)
        return result

    async def call_data(
        self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """Run ``op`` on the peer and return its result; a refusal raises :class:`RemoteError`.

        ``timeout`` bounds the whole call; without it only a silent peer (no keepalive for the
        idle timeout) ends the wait.
        """
        async with self._lock:
            self._check_usable()
            call_id = next(self._call_ids)
            try:
                frame = encode_message(Call(id=call_id, op=op, params=params or {}))
            except (ValueError, PydanticSerializationError, ProtocolError) as exc:
                raise TransferError(f"call {op} to {self.peer}: invalid call: {exc}") from exc
            with self._exchange(f"call {op}"):
                await self._conn.send(frame)
                try:
                    async with asyncio.timeout(timeout):
                        reply = await self._await_result(call_id, op)
                except TimeoutError as exc:
                    raise PeerError(f"{self._conn.label}: call {op} took over {timeout} s") from exc
            if isinstance(reply, ErrorReply):
                error = _raise_remote(reply, self.peer)
                if isinstance(error, PeerError):
                    self._mark_broken(error)
                raise error
            return reply

    @contextlib.contextmanager
    def _exchange(self, what: str) -> Iterator[None]:
        """Frames of one operation go out and come back inside this block.

        Leaving it early for any reason (a dead link, a cancelled caller, a failing progress
        callback) leaves unread replies on the connection, so the channel is closed then:
        a late reply must never be taken for the answer to a later operation.
        """
        try:
            yield
        except PeerError as exc:
            self._mark_broken(exc)
            raise
        except BaseException as exc:
            self._mark_broken(PeerError(f"{self._conn.label}: {what} interrupted ({exc!r})"))
            raise

    async def _await_result(
        self, call_id: int, op: str
    ) -> tuple[dict[str, Any], bytes] | ErrorReply:
        while True:
            frame = await self._conn.expect(self._conn.idle_timeout)
            if frame.type is FrameType.KEEPALIVE:
                continue
            if frame.type is FrameType.ERROR:
                reply = decode_message(frame, ErrorReply)
                if reply.call_id not in (call_id, None):
                    raise ProtocolError(f"error for call {reply.call_id}, expected {call_id}")
                return reply
            result = decode_message(frame, Result)
            if result.id != call_id:
                raise ProtocolError(f"result for call {result.id}, expected {call_id} ({op})")
            if not result.data_size:
                return result.result, b""
            data = await self._conn.expect(self._conn.idle_timeout)
            if data.type is not FrameType.FILE_DATA or len(data.payload) != result.data_size:
                raise ProtocolError(f"{op}: expected {result.data_size} bytes of result data")
            return result.result, bytes(data.payload)

    async def ping(self) -> float:
        """Round-trip time of one small frame, in seconds."""
        async with self._lock:
            self._check_usable()
            token = secrets.token_bytes(8)
            start = time.perf_counter()
            with self._exchange("ping"):
                await self._conn.send(encode_frame(FrameType.PING, token))
                frame = await self._conn.expect(self._conn.idle_timeout)
                if frame.type is not FrameType.PONG or frame.payload != token:
                    raise ProtocolError(f"expected PONG, got {frame.type.name}")
            return time.perf_counter() - start

    async def send_dir(
        self,
        migration_id: str,
        local_dir: Path,
        subdir: str = "",
        files: Sequence[str] | None = None,
        *,
        compress: bool = False,
        progress: ProgressCallback | None = None,
    ) -> TransferStats:
        """Stream the regular files below ``local_dir`` (or only ``files``, relative to it).

        They land in ``<root>/<migration_id>/<subdir>/<relative path>`` on the peer. Symlinks
        and special files are refused, not skipped: a silently missing image breaks a restore.
        """
        check_migration_id(migration_id)
        check_relative_path(subdir, allow_empty=True)
        listed = _list_dir(Path(local_dir), files)
        outgoing = [
            _OutgoingFile(path, join_relative(subdir, rel), st.st_size, stat.S_IMODE(st.st_mode))
            for rel, path, st in listed
        ]
        return await self._send_files(migration_id, outgoing, compress=compress, progress=progress)

    async def send_file(
        self,
        migration_id: str,
        local_path: Path,
        remote_path: str | None = None,
        *,
        compress: bool = False,
        progress: ProgressCallback | None = None,
    ) -> TransferStats:
        """Stream one file to ``<root>/<migration_id>/<remote_path>`` (default: its name)."""
        check_migration_id(migration_id)
        local_path = Path(local_path)
        remote = remote_path if remote_path is not None else local_path.name
        check_relative_path(remote)
        st = _lstat_regular(local_path)
        outgoing = [_OutgoingFile(local_path, remote, st.st_size, stat.S_IMODE(st.st_mode))]
        return await self._send_files(migration_id, outgoing, compress=compress, progress=progress)

    async def _send_files(
        self,
        migration_id: str,
        outgoing: list[_OutgoingFile],
        *,
        compress: bool,
        progress: ProgressCallback | None,
    ) -> TransferStats:
        async with self._lock:
            self._check_usable()
            acks = _AckCollector(self._conn, self.peer)
            start = time.perf_counter()
            collector = asyncio.create_task(acks.run(), name="transfer-acks")
            try:
                with self._exchange("transfer"):
                    wire = await self._stream(migration_id, outgoing, acks, compress, progress)
                    acks.finish_sending()
                    await acks.wait(collector)
            finally:
                if not collector.done():
                    collector.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransferError):
                    await collector
            seconds = time.perf_counter() - start
            if acks.error is not None:
                raise acks.error
            if acks.local_error is not None:
                raise acks.local_error
            total = sum(f.size for f in outgoing)
            log.info(
                "node %s -> %s: %d files, %d bytes in %.3f s (%s)",
                self.node,
                self.peer,
                len(outgoing),
                total,
                seconds,
                "zlib" if compress else "uncompressed",
            )
            return TransferStats(bytes=total, files=len(outgoing), seconds=seconds, wire_bytes=wire)

    async def _stream(
        self,
        migration_id: str,
        outgoing: list[_OutgoingFile],
        acks: _AckCollector,
        compress: bool,
        progress: ProgressCallback | None,
    ) -> int:
        """Send every file's frames; return the bytes of file data put on the wire."""
        loop = asyncio.get_running_loop()
        total = sum(f.size for f in outgoing)
        before = 0
        wire = 0
        for item in outgoing:
            acks.raise_if_failed()
            if acks.refused():
                break
            try:
                stream = item.local.open("rb")
            except OSError as exc:
                acks.local_error = TransferError(f"cannot read {item.local}: {exc.strerror}")
                break
            with stream:
                source = _ChunkSource(stream, compress=compress)
                seq = next(self._seqs)
                acks.expect(seq)
                await self._conn.send_message(
                    FileBegin(
                        seq=seq,
                        migration_id=migration_id,
                        path=item.remote,
                        size=item.size,
                        mode=item.mode,
                        compression="zlib" if compress else "none",
                    )
                )
                aborted: str | None = None
                # The next chunk is read and hashed in a thread while this one is sent; a
                # small file is cheaper to read at once than to hand to a thread.
                inline = item.size < CHUNK_SIZE
                future = _read_ahead(loop, source, inline=inline)
                try:
                    while True:
                        try:
                            payload = await future
                        except OSError as exc:
                            aborted = f"read error: {exc.strerror}"
                            break
                        eof = source.eof
                        if not eof:
                            future = _read_ahead(loop, source, inline=inline)
                        for off in range(0, len(payload), MAX_DATA_PAYLOAD):
                            piece = payload[off : off + MAX_DATA_PAYLOAD]
                            header = encode_header(FrameType.FILE_DATA, len(piece))
                            await self._conn.send(header, piece)
                            wire += len(piece)
                        if progress is not None:
                            progress(min(total, before + source.plain_bytes), total)
                        if eof:
                            break
                        acks.raise_if_failed()
                        if acks.refused():
                            aborted = "the peer refused an earlier file"
                            break
                        if source.plain_bytes > item.size:
                            aborted = "the file grew while it was sent"
                            break
                finally:
                    if not future.done():
                        with contextlib.suppress(Exception):
                            await future
                if aborted is None and source.plain_bytes != item.size:
                    aborted = "the file changed size while it was sent"
                if aborted is not None:
                    await self._conn.send_message(FileAbort(seq=seq, reason=aborted))
                    acks.local_error = TransferError(f"cannot send {item.local}: {aborted}")
                    break
                await self._conn.send_message(FileEnd(seq=seq, sha256=source.sha256))
                before += item.size
        return wire


def _read_ahead(
    loop: asyncio.AbstractEventLoop, source: _ChunkSource, *, inline: bool
) -> asyncio.Future[bytes]:
    if not inline:
        return loop.run_in_executor(None, source.next_payload)
    future: asyncio.Future[bytes] = loop.create_future()
    try:
        future.set_result(source.next_payload())
    except OSError as exc:
        future.set_exception(exc)
    return future


class _AckCollector:
    """Reads the peer's one reply per file while the files are still being sent.

    Replies arrive in order but late (a whole link's worth of data may be in flight), so they
    are collected concurrently instead of waiting a round trip per file.
    """

    def __init__(self, conn: _Connection, peer: str) -> None:
        self._conn = conn
        self._peer = peer
        self.pending: set[int] = set()
        self.error: TransferError | None = None
        self.local_error: TransferError | None = None
        self.failure: PeerError | None = None
        self.replies = 0
        self._sending_done = False
        self._changed = asyncio.Event()

    def expect(self, seq: int) -> None:
        self.pending.add(seq)
        self._changed.set()

    def finish_sending(self) -> None:
        self._sending_done = True
        self._changed.set()

    def refused(self) -> bool:
        """The peer refused a file; the rest of the transfer is pointless."""
        return self.error is not None

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def run(self) -> None:
        try:
            while True:
                if not self.pending:
                    if self._sending_done:
                        return
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                frame = await self._conn.expect(None)
                self.replies += 1
                self._take(frame)
        except PeerError as exc:
            self.failure = exc
            raise

    def _take(self, frame: Frame) -> None:
        if frame.type is FrameType.KEEPALIVE:
            return
        if frame.type is FrameType.FILE_OK:
            ok = decode_message(frame, FileOk)
            if ok.seq not in self.pending:
                raise ProtocolError(f"{self._conn.label}: unexpected FILE_OK for file {ok.seq}")
            self.pending.discard(ok.seq)
            return
        reply = decode_message(frame, ErrorReply)
        if reply.seq is None or reply.seq not in self.pending:
            error = _raise_remote(reply, self._peer)
            if isinstance(error, PeerError):
                raise error
            raise PeerError(f"{self._conn.label}: {error}")
        self.pending.discard(reply.seq)
        if reply.code != "aborted" and self.error is None:
            self.error = _raise_remote(reply, self._peer)

    async def wait(self, task: asyncio.Task[None]) -> None:
        """Wait for the remaining replies while they keep coming; a silent peer is an error."""
        seen = -1
        while True:
            done, _ = await asyncio.wait({task}, timeout=self._conn.idle_timeout)
            if done:
                task.result()
                return
            if self.replies == seen:
                raise PeerError(
                    f"{self._conn.label}: no reply for {self._conn.idle_timeout:.0f} s "
                    f"({len(self.pending)} files unacknowledged)"
                )
            seen = self.replies


def remove_migration_dir(root: Path, migration_id: str) -> bool:
    """Delete ``root/<migration_id>`` and everything in it; False if it did not exist.

    Refuses to descend into another file system (a CRIU mount left below it) and never
    follows symlinks, so nothing outside the migration's directory can be removed.
    """
    target = root / check_migration_id(migration_id)
    try:
        top = os.lstat(target)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(top.st_mode):
        target.unlink()
        return True
    for dirpath, dirnames, _files, dir_fd in os.fwalk(target, follow_symlinks=False):
        for name in dirnames:
            if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev != top.st_dev:
                raise TransferError(
                    f"cannot remove {target}: {dirpath}/{name} is a mount point",
                    hint="unmount what CRIU left mounted below it, then retry",
                )
    shutil.rmtree(target)
    return True
