"""Reading the kernel's mount table: which mount points lie at or below a directory.

CRIU can leave its cgroup yard mounted inside a work directory, and debootstrap can leave
``/proc`` or ``/dev`` mounted inside a build root; whoever removes such a directory first
unmounts what this module finds there. The table is read as bytes and decoded with the file
system encoding, so a non-ASCII path comes back exactly as it was mounted.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC_MOUNTS = Path("/proc/self/mounts")


def unescape(field: bytes) -> str:
    r"""A mount table field with its ``\ooo`` octal escapes (space, tab, newline, backslash)
    turned back into the bytes they stand for."""
    out = bytearray()
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i : i + 1] == b"\\" and len(code) == 3 and all(c in b"01234567" for c in code):
            out.append(int(code, 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_points(table: bytes) -> list[Path]:
    """Every mount point of a ``/proc/mounts`` table, in the order listed (stacked mounts
    appear once per mount)."""
    points: list[Path] = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            points.append(Path(unescape(fields[1])))
    return points


def read_table() -> bytes:
    """This process's mount table (empty when it cannot be read)."""
    try:
        return PROC_MOUNTS.read_bytes()
    except OSError:
        return b""


def mounts_below(path: Path, table: bytes | None = None) -> list[Path]:
    """Mount points at or below ``path``, in unmount order: deepest first and, among stacked
    mounts of one point, the topmost (latest) first; each stacked mount once per mount."""
    root = Path(os.path.normpath(path))
    listed = mount_points(read_table() if table is None else table)
    found = [
        (index, point)
        for index, point in enumerate(listed)
        if point == root or root in point.parents
    ]
    found.sort(key=lambda item: (len(item[1].parts), item[0]), reverse=True)
    return [point for _, point in found]
