"""Adaptive per-chunk compression of file data on the transfer channel (zstd, level 1).

A file sent with ``compression="zstd"`` travels as FILE_DATA payloads that each start with a
tag byte: :data:`TAG_RAW` (the chunk as it is) or :data:`TAG_ZSTD` (one zstd frame that
declares its content size). The sender compresses a chunk only where that pays and stops
trying for a while on a file whose chunks do not compress (random state), so incompressible
data costs one tag byte per chunk and almost no CPU. Pure code: testable without sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import zstandard

TAG_RAW = 0
TAG_ZSTD = 1

LEVEL = 1
"""zstd level 1: on a real checkpoint's pages 2.5x at about 500 MB/s per core, and several
GB/s on random data; lz4 was as fast but shrank the same pages only 2.1x (docs/architecture.md,
"Transfer channel: what crosses the link")."""

WORTH = 0.95
"""A chunk travels compressed only when that saves at least 5% of it."""

_PROBE_AFTER_MAX = 64


class ChunkCodecError(ValueError):
    """A tagged payload cannot be decoded (unknown tag, corrupt or oversized frame)."""


@dataclass(slots=True)
class ChunkEncoder:
    """One file's sender side: a tagged payload per chunk, compressed where that pays.

    After a chunk that does not compress the next attempt waits 1, 2, 4, ... chunks (at most
    64): a file of random pages is then sent almost for free, while a file that mixes random
    state with library pages and metadata still finds its compressible parts.
    """

    _ctx: zstandard.ZstdCompressor = field(
        default_factory=lambda: zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    )
    _skip: int = 0
    _backoff: int = 0
    plain_bytes: int = 0
    wire_bytes: int = 0
    compressed_chunks: int = 0
    chunks: int = 0

    def encode(self, data: bytes) -> bytes:
        self.chunks += 1
        self.plain_bytes += len(data)
        payload = self._try(data)
        if payload is None:
            payload = bytes((TAG_RAW,)) + data
        self.wire_bytes += len(payload)
        return payload

    def _try(self, data: bytes) -> bytes | None:
        if self._skip > 0:
            self._skip -= 1
            return None
        packed = self._ctx.compress(data)
        if len(packed) <= WORTH * len(data):
            self._backoff = 0
            self.compressed_chunks += 1
            return bytes((TAG_ZSTD,)) + packed
        self._backoff = min(max(1, self._backoff * 2), _PROBE_AFTER_MAX)
        self._skip = self._backoff
        return None


@dataclass(slots=True)
class ChunkDecoder:
    """One file's receiver side: plain bytes from tagged payloads, never more than allowed."""

    max_chunk: int
    _ctx: zstandard.ZstdDecompressor = field(default_factory=zstandard.ZstdDecompressor)

    def decode(self, payload: bytes, remaining: int) -> bytes:
        """The chunk in ``payload``; ``remaining`` is what the file may still grow by."""
        if not payload:
            raise ChunkCodecError("empty data frame")
        tag, body = payload[0], payload[1:]
        if tag == TAG_RAW:
            return body
        if tag != TAG_ZSTD:
            raise ChunkCodecError(f"unknown chunk tag {tag}")
        try:
            size = zstandard.frame_content_size(body)
        except zstandard.ZstdError as exc:
            raise ChunkCodecError(f"corrupt compressed chunk ({exc})") from exc
        # Checked before inflating: a small frame must never expand into gigabytes.
        if size < 0 or size > self.max_chunk or size > max(remaining, 0):
            raise ChunkCodecError(f"compressed chunk declares {size} bytes: refused")
        try:
            out = self._ctx.decompress(body, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise ChunkCodecError(f"corrupt compressed chunk ({exc})") from exc
        if len(out) != size:
            raise ChunkCodecError(f"compressed chunk gave {len(out)} bytes, declared {size}")
        return out
