"""The files a transfer sends, each read, hashed and (where it pays) compressed a chunk at a time.

Symlinks and special files are refused, not skipped: a silently missing image breaks a restore.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fogmig.platform.base.errors import TransferError
from fogmig.platform.transfer.codec import ChunkEncoder
from fogmig.platform.transfer.wire import (
    CHUNK_SIZE,
    PathError,
    check_relative_path,
)


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    local: Path
    remote: str
    size: int
    mode: int


class ChunkSource:
    """Reads, hashes and optionally compresses one file, a chunk at a time (in a thread).

    With ``compress`` every payload is a tagged chunk (``codec``): compressed where that pays.
    """

    def __init__(self, stream: BinaryIO, *, compress: bool) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self._encoder = ChunkEncoder() if compress else None
        self.plain_bytes = 0
        self.eof = False

    def next_payload(self) -> bytes:
        data = self._stream.read(CHUNK_SIZE)
        if not data:
            self.eof = True
            return b""
        self.plain_bytes += len(data)
        self._hash.update(data)
        return self._encoder.encode(data) if self._encoder is not None else data

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def list_files(
    local_dir: Path, files: Sequence[str] | None
) -> list[tuple[str, Path, os.stat_result]]:
    """The regular files to send from ``local_dir`` as (relative path, path, lstat)."""
    if not local_dir.is_dir():
        raise TransferError(f"{local_dir} is not a directory")
    found: list[tuple[str, Path, os.stat_result]] = []
    if files is not None:
        for rel in files:
            path = local_dir.joinpath(*check_relative_path(rel))
            found.append((rel, path, lstat_regular(path)))
        return found

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), rel + "/")
            else:
                found.append((rel, Path(entry.path), lstat_regular(Path(entry.path))))

    walk(local_dir, "")
    return found


def lstat_regular(path: Path) -> os.stat_result:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise TransferError(f"cannot send {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise PathError(f"cannot send {path}: not a regular file (symlinks are not sent)")
    return st


def read_ahead(
    loop: asyncio.AbstractEventLoop, source: ChunkSource, *, inline: bool
) -> asyncio.Future[bytes]:
    if not inline:
        return loop.run_in_executor(None, source.next_payload)
    future: asyncio.Future[bytes] = loop.create_future()
    try:
        future.set_result(source.next_payload())
    except OSError as exc:
        future.set_exception(exc)
    return future
