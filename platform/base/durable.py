"""Files that survive a crash: written whole or not at all, read back or set aside.

:func:`write_atomic` writes a temporary file, syncs it and renames it over the old one (and
syncs the directory), so a reader finds the old or the new content, never a mix.
:func:`read_saved` reads such a file back; one that cannot be parsed is moved aside under
``<name>.rejected`` and reported as a :class:`StateFileError`, so the next start is clean.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fogmig.platform.base.errors import StateFileError

T = TypeVar("T")

MAX_STATE_BYTES = 64 << 20
"""A saved state larger than this is not read (it cannot be one this code wrote)."""


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def set_aside(path: Path) -> Path | None:
    """Move ``path`` to ``<name>.rejected`` (replacing an older one); ``None`` if that failed."""
    kept = path.with_name(path.name + ".rejected")
    try:
        os.replace(path, kept)
    except OSError:
        return None
    return kept


def read_saved(
    path: Path, parse: Callable[[bytes], T], *, what: str, hint: str
) -> tuple[T | None, StateFileError | None]:
    """The parsed content of ``path``: ``(value, None)``; ``(None, None)`` when there is none.

    ``parse`` raises ``ValueError`` (a pydantic ``ValidationError`` is one) for content it
    does not take; such a file, or one that cannot be read, is set aside and comes back as
    ``(None, error)`` with ``hint`` for the operator.
    """
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise ValueError(f"{size} bytes, more than {MAX_STATE_BYTES} ever written")
        data = path.read_bytes()
        return parse(data), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        first = reason.strip().splitlines()[0] if reason.strip() else type(exc).__name__
        kept = set_aside(path)
        where = f"; kept as {kept}" if kept is not None else " (it could not be moved aside)"
        error = StateFileError(
            f"{what} {path} was not taken: {first}{where}; starting without it",
            kept=kept,
            hint=hint,
        )
        return None, error
