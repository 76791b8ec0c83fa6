"""One TCP connection of the transfer channel: frames in and out, every link failure typed.

A dead peer, a cut link or a stalled reader becomes a :class:`PeerError` naming the peer, a
TLS record that fails its integrity check a :class:`TlsError`; an ERROR frame from the peer
becomes the matching local exception (:func:`remote_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from fogmig.platform.base.errors import TransferError
from fogmig.platform.transfer.wire import (
    CHUNK_SIZE,
    HEADER_SIZE,
    AuthError,
    ErrorCode,
    ErrorReply,
    Frame,
    IntegrityError,
    Message,
    NoSpaceError,
    PathError,
    PeerError,
    ProtocolError,
    RemoteError,
    TlsError,
    decode_header,
    encode_message,
)

DEFAULT_IDLE_TIMEOUT = 30.0
# StreamReader stops reading from the socket above twice this limit; keep a few chunks in flight.
READ_LIMIT = 4 * CHUNK_SIZE
WRITE_HIGH_WATER = 4 * CHUNK_SIZE


def tls_failure(label: str, exc: ssl.SSLError) -> PeerError:
    """The channel's error for a TLS failure once the session is established."""
    if isinstance(exc, ssl.SSLEOFError):
        # The peer vanished without closing TLS: a crash or a cut, not tampering.
        return PeerError(f"{label}: connection closed by the peer without ending TLS")
    reason = exc.reason or exc.__class__.__name__
    if reason in ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "BAD_RECORD_MAC", "DECRYPTION_FAILED"):
        what = (
            "a TLS record failed its integrity check (bad record MAC): it was altered on the link"
        )
    else:
        what = f"TLS refused what arrived ({reason}): it was altered, injected or is not TLS"
    return TlsError(f"{label}: {what}; the connection is closed and nothing of it was used")


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


class Connection:
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
        except ssl.SSLError as exc:
            raise tls_failure(self.label, exc) from exc
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
        except ssl.SSLError as exc:
            raise tls_failure(self.label, exc) from exc
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


def error_code(exc: BaseException) -> ErrorCode:
    """The code of the ERROR frame that reports ``exc`` to the peer."""
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


def remote_error(reply: ErrorReply, peer: str) -> TransferError:
    """The local exception for an ERROR frame sent by ``peer``."""
    where = f" ({reply.path})" if reply.path else ""
    message = f"peer {peer} refused{where}: {reply.message}"
    cls = _ERROR_CLASS.get(reply.code)
    if cls is not None:
        return cls(message, hint=reply.hint)
    return RemoteError(message, code=reply.code, error_type=reply.error_type, hint=reply.hint)
