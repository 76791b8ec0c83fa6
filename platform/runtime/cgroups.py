"""Removing the cgroups a container leaves behind.

runc removes only a container's own cgroup, and not at all after a failed restore; the parents
fogmig puts it under (``/fogmig/<node>``, ...) would pile up on every hierarchy.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.runtime import bundle as bundle_mod

CGROUP_ROOT = Path("/sys/fs/cgroup")


def bundle_cgroups_path(bundle: Path | None) -> str | None:
    """The ``linux.cgroupsPath`` of a bundle's config; None if absent or unreadable."""
    if bundle is None:
        return None
    try:
        value = bundle_mod.read_config(bundle)["linux"]["cgroupsPath"]
    except (ConfigError, KeyError, TypeError):
        return None
    return str(value) if value else None


def prune_cgroup(cgroups_path: str | None, *, root: Path = CGROUP_ROOT) -> None:
    """Remove a container's cgroup and its parents (``/fogmig/<node>``, ...) where empty.

    ``rmdir`` on cgroupfs refuses a cgroup with children or tasks, so whatever a live
    container still uses stays.
    """
    if not cgroups_path or not cgroups_path.startswith("/"):
        return
    path = PurePosixPath(cgroups_path)
    chain = [path, *list(path.parents)[:-1]]  # deepest first, never "/"
    for hierarchy in root.iterdir() if root.is_dir() else []:
        for cgroup in chain:
            try:
                (hierarchy / cgroup.relative_to("/")).rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break  # still in use: so are its parents
