"""Wire format of the agent-to-agent transfer channel: frames, messages, paths, file integrity.

Pure code without I/O: bytes in, typed frames and messages out, and the rules that decide what
a receiver may accept (frame limits, frame order, path confinement, file integrity), so all of
it is testable and fuzzable without sockets. ``connection``, ``server`` and ``client`` (in
``fogmig.platform.transfer``) do the I/O. The frames travel inside mutual TLS 1.3 (see
``protection``): who the peer is comes from its certificate, and TLS guards every byte.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogmig.platform.base import nodes
from fogmig.platform.base.errors import TransferError
from fogmig.platform.transfer.codec import ChunkCodecError, ChunkDecoder

# 2: mutual TLS 1.3 carries the frames; the HELLO names the nodes and WELCOME accepts them.
# 3: file data is compressed per chunk (zstd, tagged payloads; see ``codec``), no more zlib.
PROTOCOL_VERSION = 3

# [u32 big-endian length of type + payload][u8 type][payload]
HEADER = struct.Struct(">IB")
HEADER_SIZE = HEADER.size

CHUNK_SIZE = 256 * 1024
# A data frame carries one chunk and its tag byte; lazy page results may be larger.
MAX_DATA_PAYLOAD = 1024 * 1024
# JSON control frames: calls, results and errors stay small; big data goes as files.
MAX_CONTROL_PAYLOAD = 64 * 1024
MAX_FILE_SIZE = 1 << 40
MAX_RELATIVE_PATH = 1024

MIGRATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OP_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
HEX_DIGEST = r"^[0-9a-f]{64}$"
NODE_NAME = nodes.NODE_NAME.pattern

# The receiver writes into a hidden temporary name first; senders may not use that pattern.
PARTIAL_SUFFIX = ".fmtx-part"


# --- errors -----------------------------------------------------------------------------------


class AuthError(TransferError):
    """The peer's certificate is refused, or it is not the node it claims or was wanted."""

    hint = (
        "both nodes need a certificate of the same site CA naming them as nodes; on the "
        "testbed, `fogmig testbed down` then `fogmig testbed up` issues them afresh"
    )


class IntegrityError(TransferError):
    """A received file does not match the size or SHA-256 its sender declared."""


class PathError(TransferError):
    """A file path or migration id would leave the migration's own directory."""


class NoSpaceError(TransferError):
    """The receiving node ran out of disk space; the partial file was removed."""

    hint = "free space on the destination node's state directory"


class PeerError(TransferError):
    """The peer vanished, went silent, or broke the protocol."""


class ProtocolError(PeerError):
    """A frame was malformed, too large, unknown, or not allowed at this point."""


class TlsError(PeerError):
    """TLS refused what arrived: a record failed its integrity check, or was not TLS at all.

    Whatever was altered or injected on the link, nothing of it reached a file or a handler.
    """

    hint = (
        "something between the nodes altered the traffic (a middlebox, a proxy, an attacker) "
        "or a peer speaks another protocol; check the data link between the two nodes"
    )


class RemoteError(TransferError):
    """The peer's handler refused or failed an operation; ``code`` and ``error_type`` say how."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        error_type: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.code = code
        self.error_type = error_type
        super().__init__(message, hint=hint)


# --- frames -----------------------------------------------------------------------------------


class FrameType(enum.IntEnum):
    HELLO = 1
    # 2 and 3 carried protocol 1's HMAC challenge and proof; never reused.
    WELCOME = 4
    CALL = 16
    RESULT = 17
    ERROR = 18
    KEEPALIVE = 19
    PING = 20
    PONG = 21
    FILE_BEGIN = 32
    FILE_DATA = 33
    FILE_END = 34
    FILE_ABORT = 35
    FILE_OK = 36


_FRAME_TYPES = {int(t) for t in FrameType}


def max_payload(ftype: FrameType) -> int:
    return MAX_DATA_PAYLOAD if ftype is FrameType.FILE_DATA else MAX_CONTROL_PAYLOAD


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes


def encode_header(ftype: FrameType, payload_size: int) -> bytes:
    """The 5-byte frame header; send it followed by the payload (no copy of big payloads)."""
    if payload_size > max_payload(ftype):
        raise ProtocolError(f"{ftype.name} payload of {payload_size} bytes exceeds the limit")
    return HEADER.pack(payload_size + 1, ftype)


def encode_frame(ftype: FrameType, payload: bytes = b"") -> bytes:
    return encode_header(ftype, len(payload)) + payload


def decode_header(header: bytes) -> tuple[FrameType, int]:
    """Check a frame header and return its type and payload size.

    Limits are checked here, before the payload is read, so a peer cannot make the receiver
    buffer an arbitrary amount of data.
    """
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"truncated frame header ({len(header)} bytes)")
    length, raw_type = HEADER.unpack(header)
    if raw_type not in _FRAME_TYPES:
        raise ProtocolError(f"unknown frame type {raw_type}")
    if length < 1:
        raise ProtocolError("frame length 0 is invalid")
    ftype = FrameType(raw_type)
    size = length - 1
    if size > max_payload(ftype):
        raise ProtocolError(f"{ftype.name} frame of {size} bytes exceeds the limit")
    return ftype, size


# --- messages ---------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hello(Message):
    """The client's first frame: its version, who it is and which node it wants.

    With TLS the server compares ``node`` with the client's certificate and refuses a mismatch.
    """

    version: int
    node: str = Field(pattern=NODE_NAME)
    peer: str = Field(pattern=NODE_NAME)


class Welcome(Message):
    """The server accepts the session (else it answers with an ERROR frame)."""

    node: str = Field(pattern=NODE_NAME)


class Call(Message):
    id: int = Field(ge=0)
    op: str = Field(pattern=OP_NAME.pattern)
    params: dict[str, Any] = Field(default_factory=dict)


class Result(Message):
    id: int = Field(ge=0)
    result: dict[str, Any] = Field(default_factory=dict)
    # Bytes of binary data that follow in one FILE_DATA frame (memory pages for a lazy
    # restore): base64 in JSON would cost a third more on a slow link.
    data_size: int = Field(default=0, ge=0, le=MAX_DATA_PAYLOAD)


ErrorCode = Literal[
    "auth", "protocol", "integrity", "path", "no_space", "aborted", "remote", "internal"
]


class ErrorReply(Message):
    code: ErrorCode
    message: str = Field(max_length=4096)
    call_id: int | None = None
    seq: int | None = None
    path: str | None = None
    error_type: str | None = Field(default=None, max_length=128)
    hint: str | None = Field(default=None, max_length=1024)


Compression = Literal["none", "zstd"]
"""``zstd``: every FILE_DATA payload is a tagged chunk, compressed or not (``codec``)."""


class FileBegin(Message):
    seq: int = Field(ge=0)
    migration_id: str = Field(pattern=MIGRATION_ID.pattern)
    path: str = Field(min_length=1, max_length=MAX_RELATIVE_PATH)
    size: int = Field(ge=0, le=MAX_FILE_SIZE)
    mode: int = Field(default=0o600, ge=0, le=0o777)
    compression: Compression = "none"


class FileEnd(Message):
    seq: int = Field(ge=0)
    sha256: str = Field(pattern=HEX_DIGEST)


class FileAbort(Message):
    seq: int = Field(ge=0)
    reason: str = Field(default="", max_length=1024)


class FileOk(Message):
    seq: int = Field(ge=0)
    size: int = Field(ge=0)


M = TypeVar("M", bound=Message)

MESSAGE_OF: dict[FrameType, type[Message]] = {
    FrameType.HELLO: Hello,
    FrameType.WELCOME: Welcome,
    FrameType.CALL: Call,
    FrameType.RESULT: Result,
    FrameType.ERROR: ErrorReply,
    FrameType.FILE_BEGIN: FileBegin,
    FrameType.FILE_END: FileEnd,
    FrameType.FILE_ABORT: FileAbort,
    FrameType.FILE_OK: FileOk,
}
FRAME_OF: dict[type[Message], FrameType] = {m: t for t, m in MESSAGE_OF.items()}


def encode_message(message: Message) -> bytes:
    """A complete frame carrying ``message`` as JSON."""
    payload = message.model_dump_json().encode()
    return encode_frame(FRAME_OF[type(message)], payload)


def decode_message(frame: Frame, expected: type[M]) -> M:
    """Parse and validate the JSON payload of ``frame`` as ``expected``."""
    if MESSAGE_OF.get(frame.type) is not expected:
        raise ProtocolError(f"expected a {FRAME_OF[expected].name} frame, got {frame.type.name}")
    try:
        return expected.model_validate_json(frame.payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise ProtocolError(f"malformed {frame.type.name} frame: {where}: {first['msg']}") from exc


# --- paths ------------------------------------------------------------------------------------


def check_migration_id(migration_id: str) -> str:
    if not MIGRATION_ID.match(migration_id):
        raise PathError(
            f"invalid migration id {migration_id!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return migration_id


def check_relative_path(path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    """Split a sender-given relative path into safe components, or raise :class:`PathError`.

    Rejected: absolute paths, '.', '..', empty components (``a//b``), NUL and other control
    characters, backslashes, over-long names and the receiver's own temporary-file suffix.
    Symlinks cannot be judged here; the receiver refuses to follow them while opening.
    """
    if path == "" and allow_empty:
        return ()
    if not path or len(path) > MAX_RELATIVE_PATH:
        raise PathError(f"invalid relative path {path!r}: empty or too long")
    if path.startswith("/"):
        raise PathError(f"invalid relative path {path!r}: absolute paths are not allowed")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise PathError(f"invalid relative path {path!r}: component {part!r} is not allowed")
        if any(ord(ch) < 0x20 or ch in "\\\x7f" for ch in part):
            raise PathError(f"invalid relative path {path!r}: control characters or backslash")
        if len(part.encode()) > 255:
            raise PathError(f"invalid relative path {path!r}: component too long")
        if part.endswith(PARTIAL_SUFFIX):
            raise PathError(f"invalid relative path {path!r}: reserved suffix")
    return parts


def join_relative(*paths: str) -> str:
    """Join relative paths ('' is the empty path) with '/' after checking each one."""
    parts: list[str] = []
    for p in paths:
        parts.extend(check_relative_path(p, allow_empty=True))
    if not parts:
        raise PathError("empty relative path")
    return str(PurePosixPath(*parts))


# --- file integrity ---------------------------------------------------------------------------


@dataclass(slots=True)
class IncomingFile:
    """What the receiver knows about one file while it arrives.

    ``feed`` turns FILE_DATA payloads into the plain bytes to write (decoding tagged chunks if
    asked, never producing more than the declared size); ``finish`` checks size and SHA-256
    before the file may be renamed into place.
    """

    begin: FileBegin
    received: int = 0
    wire_bytes: int = 0
    _hash: Any = field(default_factory=hashlib.sha256)
    _decoder: ChunkDecoder | None = None

    def __post_init__(self) -> None:
        if self.begin.compression == "zstd":
            self._decoder = ChunkDecoder(max_chunk=CHUNK_SIZE)

    def _integrity(self, what: str) -> IntegrityError:
        return IntegrityError(f"{self.begin.path} (migration {self.begin.migration_id}): {what}")

    def feed(self, payload: bytes) -> list[bytes]:
        self.wire_bytes += len(payload)
        piece = payload
        if self._decoder is not None:
            try:
                piece = self._decoder.decode(payload, self.begin.size - self.received)
            except ChunkCodecError as exc:
                raise self._integrity(str(exc)) from exc
        self.received += len(piece)
        if self.received > self.begin.size:
            raise self._integrity(f"more than the declared {self.begin.size} bytes arrived")
        self._hash.update(piece)
        return [piece]

    def finish(self, end: FileEnd) -> str:
        """Verify the complete file; return its SHA-256 (hex)."""
        if self.received != self.begin.size:
            raise self._integrity(
                f"got {self.received} bytes, the sender declared {self.begin.size}"
            )
        digest = self._hash.hexdigest()
        if not hmac.compare_digest(digest, end.sha256):
            raise self._integrity(f"SHA-256 mismatch (got {digest}, declared {end.sha256})")
        return str(digest)


# --- receive order ----------------------------------------------------------------------------


class ReceiverState(enum.Enum):
    """Where the receiving side of an authenticated session is."""

    IDLE = "idle"  # waiting for a call or a file
    IN_FILE = "in_file"  # between FILE_BEGIN and FILE_END/FILE_ABORT
    DISCARDING = "discarding"  # the file was refused; its data is dropped until it ends


_ALLOWED: dict[ReceiverState, frozenset[FrameType]] = {
    ReceiverState.IDLE: frozenset(
        {FrameType.CALL, FrameType.PING, FrameType.KEEPALIVE, FrameType.FILE_BEGIN}
    ),
    ReceiverState.IN_FILE: frozenset(
        {FrameType.FILE_DATA, FrameType.FILE_END, FrameType.FILE_ABORT, FrameType.KEEPALIVE}
    ),
    ReceiverState.DISCARDING: frozenset(
        {FrameType.FILE_DATA, FrameType.FILE_END, FrameType.FILE_ABORT, FrameType.KEEPALIVE}
    ),
}


@dataclass(slots=True)
class ReceiverOrder:
    """Frame order rules of the receiving side: which frame may come next, and which file.

    The server feeds each frame type here before acting on it; a frame that is not allowed in
    the current state is a :class:`ProtocolError` and ends the connection.
    """

    state: ReceiverState = ReceiverState.IDLE
    seq: int | None = None
    last_seq: int = -1

    def check(self, ftype: FrameType) -> None:
        if ftype not in _ALLOWED[self.state]:
            raise ProtocolError(f"{ftype.name} frame not allowed while {self.state.value}")

    def begin(self, seq: int) -> None:
        self.check(FrameType.FILE_BEGIN)
        if seq <= self.last_seq:
            raise ProtocolError(f"file sequence number {seq} does not increase")
        self.state, self.seq, self.last_seq = ReceiverState.IN_FILE, seq, seq

    def refuse(self) -> None:
        """The current file failed; drop the rest of it."""
        if self.state is ReceiverState.IN_FILE:
            self.state = ReceiverState.DISCARDING

    def end(self, seq: int) -> bool:
        """A FILE_END or FILE_ABORT for ``seq``; True if the file was still being received."""
        if self.state is ReceiverState.IDLE or seq != self.seq:
            raise ProtocolError(f"end of file {seq} that is not the open file ({self.seq})")
        was_open = self.state is ReceiverState.IN_FILE
        self.state, self.seq = ReceiverState.IDLE, None
        return was_open
