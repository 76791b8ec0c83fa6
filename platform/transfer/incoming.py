"""Where a received file goes: a temporary name in its confined directory, then its own.

Directories below the transfer root are opened without following symlinks, so a peer can never
place a file outside ``root/<migration_id>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fogmig.platform.base.errors import TransferError
from fogmig.platform.transfer.wire import (
    PARTIAL_SUFFIX,
    FileBegin,
    FileEnd,
    IncomingFile,
    NoSpaceError,
    PathError,
    check_migration_id,
    check_relative_path,
)

FileWriter = Callable[[int, memoryview], int]

INLINE_WRITE = 64 * 1024


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


class IncomingWrite:
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
