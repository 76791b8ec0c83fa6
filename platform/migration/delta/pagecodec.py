"""The page section of a runs file: changed pages as XOR against the base, in zstd blocks.

A service's writer changes a few bytes of a page between two rounds, so the XOR of the new page
with the copy the destination already holds is almost all zeros and compresses to tens of bytes;
a page without a base (new since the previous round) or whose XOR is no sparser than itself
travels raw. Pages go in blocks of :data:`BLOCK_PAGES`, each compressed with zstd level 1 or
stored when that is not smaller. Pure code over numpy arrays; ``layout`` does the file framing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import zstandard

from fogmig.platform.base.vocabulary import PAGE_SIZE

KIND_RAW = 0
KIND_XOR = 1
"""The page travels as its XOR with the base round's page at the same vaddr."""

BLOCK_PAGES = 256
"""Pages per compressed block (1 MiB of plain bytes): bounds memory and a decoder's output."""

CODEC_STORED = 0
CODEC_ZSTD = 1
_BLOCK_HEAD = struct.Struct("<IBI")
_COUNT = struct.Struct("<I")
_LEVEL = 1


class PageCodecError(ValueError):
    """A page section cannot be decoded: bad kind, block, length or compressed data."""


def choose_kinds(
    cur: npt.NDArray[np.uint8], base: npt.NDArray[np.uint8], has_base: npt.NDArray[np.bool_]
) -> npt.NDArray[np.uint8]:
    """Per page: XOR where a base exists and the XOR has fewer non-zero bytes than the page.

    Non-zero bytes are a cheap stand-in for the compressed size (zero runs cost almost
    nothing to zstd), so a page rewritten from scratch or turned into zeros goes raw.
    """
    kinds = np.zeros(cur.shape[0], dtype=np.uint8)
    rows = np.flatnonzero(has_base)
    if rows.size:
        x = np.bitwise_xor(cur[rows], base[rows])
        smaller = np.count_nonzero(x, axis=1) < np.count_nonzero(cur[rows], axis=1)
        kinds[rows[smaller]] = KIND_XOR
    return kinds


def coded(
    cur: npt.NDArray[np.uint8], base: npt.NDArray[np.uint8], kinds: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """The bytes that travel for each page: the page, or its XOR with ``base`` (same row)."""
    out = np.array(cur, dtype=np.uint8, copy=True)
    rows = np.flatnonzero(kinds == KIND_XOR)
    if rows.size:
        out[rows] ^= base[rows]
    return out


@dataclass(slots=True)
class SectionWriter:
    """Writes coded pages as blocks; :attr:`plain_bytes` and :attr:`stored_bytes` say how much
    the blocks saved."""

    stream: BinaryIO
    plain_bytes: int = 0
    stored_bytes: int = 0
    _ctx: zstandard.ZstdCompressor | None = None

    def write_blocks(self, pages: npt.NDArray[np.uint8]) -> int:
        """Write ``pages`` (already coded) as blocks; returns how many blocks."""
        if self._ctx is None:
            self._ctx = zstandard.ZstdCompressor(level=_LEVEL, write_content_size=True)
        blocks = 0
        for s in range(0, pages.shape[0], BLOCK_PAGES):
            plain = np.ascontiguousarray(pages[s : s + BLOCK_PAGES]).tobytes()
            packed = self._ctx.compress(plain)
            codec, body = (
                (CODEC_ZSTD, packed) if len(packed) < len(plain) else (CODEC_STORED, plain)
            )
            self.stream.write(_BLOCK_HEAD.pack(len(plain) // PAGE_SIZE, codec, len(body)))
            self.stream.write(body)
            self.plain_bytes += len(plain)
            self.stored_bytes += _BLOCK_HEAD.size + len(body)
            blocks += 1
        return blocks


def block_count_bytes(blocks: int) -> bytes:
    return _COUNT.pack(blocks)


def read_section(data: memoryview, nr_pages: int) -> npt.NDArray[np.uint8]:
    """Decode a whole page section (block count, then blocks) into ``nr_pages`` pages.

    Every length is checked against ``nr_pages`` before anything is inflated, so a damaged or
    hostile file can neither overrun the array nor make a block expand beyond one block.
    """
    if len(data) < _COUNT.size:
        raise PageCodecError("truncated block count")
    (nr_blocks,) = _COUNT.unpack_from(data, 0)
    pages = np.empty((nr_pages, PAGE_SIZE), dtype=np.uint8)
    flat = pages.reshape(-1)
    pos, filled = _COUNT.size, 0
    dctx = zstandard.ZstdDecompressor()
    for _ in range(nr_blocks):
        n, codec, body, pos = _next_block(data, pos)
        if n == 0 or n > BLOCK_PAGES or filled + n > nr_pages:
            raise PageCodecError(f"a block of {n} pages does not fit the section")
        size = n * PAGE_SIZE
        out = _decode_block(dctx, codec, body, size)
        flat[filled * PAGE_SIZE : filled * PAGE_SIZE + size] = np.frombuffer(out, dtype=np.uint8)
        filled += n
    if filled != nr_pages:
        raise PageCodecError(f"the blocks hold {filled} pages, the run table {nr_pages}")
    if pos != len(data):
        raise PageCodecError(f"{len(data) - pos} bytes after the last block")
    return pages


def _next_block(data: memoryview, pos: int) -> tuple[int, int, bytes, int]:
    if pos + _BLOCK_HEAD.size > len(data):
        raise PageCodecError("truncated block header")
    n, codec, length = _BLOCK_HEAD.unpack_from(data, pos)
    pos += _BLOCK_HEAD.size
    if pos + length > len(data):
        raise PageCodecError("truncated block")
    return n, codec, bytes(data[pos : pos + length]), pos + length


def _decode_block(dctx: zstandard.ZstdDecompressor, codec: int, body: bytes, size: int) -> bytes:
    if codec == CODEC_STORED:
        if len(body) != size:
            raise PageCodecError(f"stored block of {len(body)} bytes, expected {size}")
        return body
    if codec != CODEC_ZSTD:
        raise PageCodecError(f"unknown block codec {codec}")
    try:
        declared = zstandard.frame_content_size(body)
        if declared != size:
            raise PageCodecError(f"compressed block declares {declared} bytes, expected {size}")
        out = dctx.decompress(body, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise PageCodecError(f"corrupt compressed block ({exc})") from exc
    if len(out) != size:
        raise PageCodecError(f"compressed block gave {len(out)} bytes, expected {size}")
    return out


def check_kinds(kinds: npt.NDArray[np.uint8]) -> None:
    if kinds.size and int(kinds.max()) > KIND_XOR:
        raise PageCodecError("unknown page kind")
