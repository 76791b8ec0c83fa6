"""The sending end of the transfer channel: authenticated calls and streamed, verified files.

The source agent connects with :meth:`TransferClient.connect` over mutual TLS 1.3, makes sure
the server is the node it wanted (the certificate names it), calls operations on the
destination agent and streams CRIU image directories into the destination's migration
directory, where :class:`~fogmig.platform.transfer.server.TransferServer` verifies every file
before it appears under its name.

Logging: INFO per completed transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_core import PydanticSerializationError

from fogmig.platform.base.errors import IdentityError, TransferError
from fogmig.platform.base.nodes import check_node_name
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import IdentityFiles
from fogmig.platform.security.tls import check_peer, stream_tls
from fogmig.platform.transfer.connection import (
    DEFAULT_IDLE_TIMEOUT,
    READ_LIMIT,
    Connection,
    remote_error,
)
from fogmig.platform.transfer.outgoing import (
    ChunkSource,
    OutgoingFile,
    list_files,
    lstat_regular,
    read_ahead,
)
from fogmig.platform.transfer.protection import ChannelSecurity
from fogmig.platform.transfer.wire import (
    CHUNK_SIZE,
    PROTOCOL_VERSION,
    AuthError,
    Call,
    ErrorReply,
    FileAbort,
    FileBegin,
    FileEnd,
    FileOk,
    Frame,
    FrameType,
    Hello,
    PeerError,
    ProtocolError,
    Result,
    Welcome,
    check_migration_id,
    check_relative_path,
    decode_message,
    encode_frame,
    encode_header,
    encode_message,
    join_relative,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

DEFAULT_CONNECT_TIMEOUT = 10.0


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


class TransferClient:
    """The sending end of one authenticated connection; open it with :meth:`connect`.

    Operations on one client run one at a time. After a :class:`PeerError` the connection is
    unusable; refused files and remote errors leave it usable.
    """

    def __init__(self, conn: Connection, *, node: str, peer: str) -> None:
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
        security: ChannelSecurity | IdentityFiles,
        peer: str,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> AsyncIterator[TransferClient]:
        """Connect to node ``peer`` at host:port as the node ``security`` names; both ends
        authenticate with their certificates (:class:`AuthError` when one is refused)."""
        if isinstance(security, IdentityFiles):
            security = ChannelSecurity.from_files(security)
        node = security.node
        check_node_name(peer)
        label = f"node {node}: peer {peer} ({host}:{port})"
        reader, writer = await _open(
            host, port, security=security, peer=peer, label=label, timeout=timeout
        )
        conn = Connection(reader, writer, label=label, idle_timeout=idle_timeout)
        client = cls(conn, node=node, peer=peer)
        try:
            await client._handshake(security, timeout)
            yield client
        finally:
            await conn.close(abort=client._broken is not None)

    async def _handshake(self, security: ChannelSecurity, timeout: float) -> None:
        await self._conn.send_message(
            Hello(version=PROTOCOL_VERSION, node=self.node, peer=self.peer)
        )
        try:
            frame = await self._conn.expect(timeout)
        except PeerError as exc:
            if security.plaintext:
                raise
            # In TLS 1.3 the server judges our certificate after our side of the handshake
            # is done; it drops a client it refuses, often without telling why.
            raise AuthError(
                f"{self._conn.label}: the peer ended the connection instead of accepting this "
                f"node: it probably refused this node's certificate {security.cert} ({exc})",
                hint=security.hint,
            ) from exc
        if frame.type is FrameType.ERROR:
            raise remote_error(decode_message(frame, ErrorReply), self.peer)
        welcome = decode_message(frame, Welcome)
        if welcome.node != self.peer:
            raise AuthError(
                f"{self._conn.label}: the node there is {welcome.node}, not {self.peer}"
            )

    @property
    def usable(self) -> bool:
        """False once a :class:`PeerError` broke the connection (open a new one then)."""
        return self._broken is None

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
                error = remote_error(reply, self.peer)
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
        listed = list_files(Path(local_dir), files)
        outgoing = [
            OutgoingFile(path, join_relative(subdir, rel), st.st_size, stat.S_IMODE(st.st_mode))
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
        st = lstat_regular(local_path)
        outgoing = [OutgoingFile(local_path, remote, st.st_size, stat.S_IMODE(st.st_mode))]
        return await self._send_files(migration_id, outgoing, compress=compress, progress=progress)

    async def _send_files(
        self,
        migration_id: str,
        outgoing: list[OutgoingFile],
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
                "zstd where it pays" if compress else "uncompressed",
            )
            return TransferStats(bytes=total, files=len(outgoing), seconds=seconds, wire_bytes=wire)

    async def _stream(
        self,
        migration_id: str,
        outgoing: list[OutgoingFile],
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
                source = ChunkSource(stream, compress=compress)
                seq = next(self._seqs)
                acks.expect(seq)
                await self._conn.send_message(
                    FileBegin(
                        seq=seq,
                        migration_id=migration_id,
                        path=item.remote,
                        size=item.size,
                        mode=item.mode,
                        compression="zstd" if compress else "none",
                    )
                )
                aborted: str | None = None
                # The next chunk is read and hashed in a thread while this one is sent; a
                # small file is cheaper to read at once than to hand to a thread.
                inline = item.size < CHUNK_SIZE
                future = read_ahead(loop, source, inline=inline)
                try:
                    while True:
                        try:
                            payload = await future
                        except OSError as exc:
                            aborted = f"read error: {exc.strerror}"
                            break
                        eof = source.eof
                        if not eof:
                            future = read_ahead(loop, source, inline=inline)
                        if payload:
                            # One chunk per frame: a tagged chunk must never be split.
                            header = encode_header(FrameType.FILE_DATA, len(payload))
                            await self._conn.send(header, payload)
                            wire += len(payload)
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


async def _open(
    host: str, port: int, *, security: ChannelSecurity, peer: str, label: str, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to host:port, over TLS with ``peer`` unless in plaintext mode."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                limit=READ_LIMIT,
                ssl=security.client,
                ssl_handshake_timeout=timeout if security.client is not None else None,
            )
    except ssl.SSLError as exc:
        why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            why += f": its certificate is not of the site CA in {security.ca}"
        raise AuthError(f"{label}: TLS handshake failed: {why}", hint=security.hint) from exc
    except (OSError, TimeoutError) as exc:
        raise PeerError(f"{label}: cannot connect: {str(exc) or type(exc).__name__}") from exc
    if security.plaintext:
        return reader, writer
    try:
        check_peer(stream_tls(writer), Identity.node(peer))
    except IdentityError as exc:
        writer.transport.abort()
        raise AuthError(
            f"{label}: refused the server: {exc}",
            hint=f"the address this node has for {peer} reaches another principal; check the "
            "peers in its configuration (or what redirects the traffic)",
        ) from exc
    return reader, writer


class _AckCollector:
    """Reads the peer's one reply per file while the files are still being sent.

    Replies arrive in order but late (a whole link's worth of data may be in flight), so they
    are collected concurrently instead of waiting a round trip per file.
    """

    def __init__(self, conn: Connection, peer: str) -> None:
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
            error = remote_error(reply, self._peer)
            if isinstance(error, PeerError):
                raise error
            raise PeerError(f"{self._conn.label}: {error}")
        self.pending.discard(reply.seq)
        if reply.code != "aborted" and self.error is None:
            self.error = remote_error(reply, self._peer)

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
