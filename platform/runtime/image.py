"""Reading CRIU image files without CRIU's generated protobuf modules.

A CRIU image is two little-endian u32 magics followed by records ``[u32 length][protobuf]``
(docs/platform.md). Every message we read (pagemap, stats) uses only varint and
length-delimited fields, so a small decoder is enough and keeps ``crit`` off the node.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fogmig.platform.base.errors import FogmigError

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
PAGEMAP_MAGIC = 0x56084025
STATS_MAGIC = 0x57093306

# Field numbers of criu/images/stats.proto; times are in microseconds.
DUMP_STATS_FIELDS = {
    1: "freezing_time_us",
    2: "frozen_time_us",
    3: "memdump_time_us",
    4: "memwrite_time_us",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    8: "irmap_resolve",
    9: "pages_lazy",
    10: "page_pipes",
    11: "page_pipe_bufs",
}
RESTORE_STATS_FIELDS = {
    1: "pages_compared",
    2: "pages_skipped_cow",
    3: "forking_time_us",
    4: "restore_time_us",
    5: "pages_restored",
}


class ImageFormatError(FogmigError):
    """A CRIU image file is truncated or not what its name says."""


Fields = dict[int, list[int | bytes]]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ImageFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ImageFormatError("varint too long")


def decode_message(buf: bytes) -> Fields:
    """Decode one protobuf message into ``{field number: [values]}`` (ints or raw bytes)."""
    fields: Fields = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ImageFormatError("truncated length-delimited field")
            value = buf[pos : pos + length]
            pos += length
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ImageFormatError("truncated fixed64")
            (value,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ImageFormatError("truncated fixed32")
            (value,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            raise ImageFormatError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_message(fields: list[tuple[int, int | bytes]]) -> bytes:
    """Encode ``[(field number, int | bytes)]`` as protobuf (varint or length-delimited)."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += encode_varint(number << 3) + encode_varint(value)
        else:
            out += encode_varint(number << 3 | 2) + encode_varint(len(value)) + value
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ImageFile:
    magics: tuple[int, int]
    records: list[bytes]


def parse_image(data: bytes) -> ImageFile:
    if len(data) < 8:
        raise ImageFormatError("image shorter than its magics")
    m1, m2 = struct.unpack_from("<II", data, 0)
    records: list[bytes] = []
    pos = 8
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageFormatError("truncated record length")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise ImageFormatError("truncated record")
        records.append(data[pos : pos + length])
        pos += length
    return ImageFile((m1, m2), records)


def write_image(magics: tuple[int, int], records: list[bytes]) -> bytes:
    out = bytearray(struct.pack("<II", *magics))
    for r in records:
        out += struct.pack("<I", len(r)) + r
    return bytes(out)


def iter_records(path: Path) -> Iterator[Fields]:
    for rec in parse_image(path.read_bytes()).records:
        yield decode_message(rec)


def _named(fields: Fields, names: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for number, name in names.items():
        vals = fields.get(number)
        if vals and isinstance(vals[0], int):
            out[name] = vals[0]
    return out


def read_stats(path: Path) -> dict[str, int]:
    """Read ``stats-dump`` or ``stats-restore`` into named counters (times in microseconds).

    Returns an empty dict when the file does not exist (CRIU writes it only on success).
    """
    if not path.exists():
        return {}
    img = parse_image(path.read_bytes())
    if img.magics != (IMG_SERVICE_MAGIC, STATS_MAGIC) or not img.records:
        raise ImageFormatError(f"{path} is not a CRIU stats image")
    top = decode_message(img.records[0])
    if 1 in top and isinstance(top[1][0], bytes):
        return _named(decode_message(top[1][0]), DUMP_STATS_FIELDS)
    if 2 in top and isinstance(top[2][0], bytes):
        return _named(decode_message(top[2][0]), RESTORE_STATS_FIELDS)
    return {}
