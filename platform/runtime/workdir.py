"""Safe removal of CRIU image and work directories.

A failed restore can leave CRIU's cgroup yard (``.criu.cgyard.*``) mounted inside its work
directory, and a plain recursive delete would then walk into live cgroupfs. ``remove_tree``
unmounts everything below the directory first and never crosses into another filesystem.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from pathlib import Path

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.mounts import mounts_below

log = logging.getLogger(__name__)

MNT_DETACH = 2
PROC_MOUNTS = Path("/proc/self/mounts")


class WorkdirError(FogmigError):
    """A work directory could not be unmounted or removed completely."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _umount(point: Path) -> None:
    libc = _libc()
    target = os.fsencode(point)
    if libc.umount2(target, 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return  # no longer a mount point (an earlier detach took it along)
    # Busy (a process still has it open) or pinned: detach it from the tree now; the kernel
    # frees it when the last user goes, and nothing below the path refers to it any more.
    if libc.umount2(target, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise WorkdirError(f"cannot unmount {point}: {os.strerror(err)}")


def unmount_below(path: Path, *, proc_mounts: Path = PROC_MOUNTS) -> list[Path]:
    """Unmount everything mounted at or below ``path``; return what was unmounted."""
    points = mounts_below(path, proc_mounts.read_bytes())
    for point in points:
        log.info("unmounting %s", point)
        _umount(point)
    left = mounts_below(path, proc_mounts.read_bytes())
    if left:
        raise WorkdirError(
            f"still mounted below {path} after unmounting: {', '.join(map(str, left))}",
            hint="see `grep criu /proc/mounts`; unmount by hand before removing the directory",
        )
    return points


def _delete_one_fs(path: Path, device: int, skipped: list[Path]) -> None:
    # Like `rm -rf --one-file-system`: never descend into, nor delete, a directory that lives
    # on another filesystem.
    with os.scandir(path) as entries:
        for entry in entries:
            child = Path(entry.path)
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != device:
                    skipped.append(child)
                    continue
                _delete_one_fs(child, device, skipped)
                if not any(s == child or child in s.parents for s in skipped):
                    os.rmdir(child)
            else:
                os.unlink(child)


def remove_tree(path: Path, *, proc_mounts: Path = PROC_MOUNTS) -> None:
    """Unmount whatever is mounted below ``path``, then delete it without crossing mounts.

    A missing ``path`` is fine. Raises :class:`WorkdirError` if anything stays mounted or a
    directory on another filesystem was found (it is left alone, never deleted).
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    unmount_below(path, proc_mounts=proc_mounts)
    skipped: list[Path] = []
    _delete_one_fs(path, st.st_dev, skipped)
    if skipped:
        raise WorkdirError(
            f"left {len(skipped)} director{'y' if len(skipped) == 1 else 'ies'} on another "
            f"filesystem below {path}: {', '.join(map(str, skipped[:5]))}"
        )
    os.rmdir(path)
