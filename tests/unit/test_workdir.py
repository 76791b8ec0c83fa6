"""Work-directory removal: which mounts are found below a path, and what gets deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogmig.platform.base.mounts import mount_points, mounts_below
from fogmig.platform.runtime.workdir import WorkdirError, remove_tree

MOUNTS = b"""\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,relatime 0 0
/dev/vda / ext4 rw,relatime 0 0
cgroup /var/lib/fogmig/mig/work/.criu.cgyard.Xa1b2 tmpfs rw 0 0
cgroup /var/lib/fogmig/mig/work/.criu.cgyard.Xa1b2/memory cgroup rw,memory 0 0
cgroup /var/lib/fogmig/mig/work/.criu.cgyard.Xa1b2/freezer cgroup rw,freezer 0 0
tmpfs /var/lib/fogmig/mig/work-other tmpfs rw 0 0
tmpfs /var/lib/fogmig/mig/work/with\\040space tmpfs rw 0 0
tmpfs /var/lib/fogmig/mig/work tmpfs rw 0 0
tmpfs /var/lib/fogmig/mig/work/stacked tmpfs rw 0 0
tmpfs /var/lib/fogmig/mig/work/stacked tmpfs rw 0 0
"""


def test_mount_points_unescape_octal() -> None:
    points = mount_points(MOUNTS)
    assert Path("/var/lib/fogmig/mig/work/with space") in points
    assert len(points) == 11


def test_mounts_below_deepest_first_and_only_below() -> None:
    found = mounts_below(Path("/var/lib/fogmig/mig/work"), MOUNTS)
    work = Path("/var/lib/fogmig/mig/work")
    yard = work / ".criu.cgyard.Xa1b2"
    assert set(found) == {
        yard,
        yard / "memory",
        yard / "freezer",
        work / "with space",
        work,
        work / "stacked",
    }
    # A sibling whose name merely starts with the same text is not below the path.
    assert Path("/var/lib/fogmig/mig/work-other") not in found
    # Children before their parents, the path itself last.
    assert found.index(yard / "memory") < found.index(yard)
    assert found.index(yard / "freezer") < found.index(yard)
    assert found[-1] == work
    # A point mounted twice is unmounted twice.
    assert found.count(work / "stacked") == 2


def test_non_ascii_mount_points_come_back_exactly() -> None:
    table = "tmpfs /srv/caf\u00e9/x\\040y tmpfs rw 0 0\n".encode()
    assert mount_points(table) == [Path("/srv/caf\u00e9/x y")]


def test_mounts_below_normalises_the_path() -> None:
    found = mounts_below(Path("/var/lib/fogmig/mig/work/"), MOUNTS)
    assert Path("/var/lib/fogmig/mig/work") in found
    assert mounts_below(Path("/var/lib/fogmig/nothing"), MOUNTS) == []


def test_remove_tree_deletes_everything_and_keeps_symlink_targets(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    (work / "a" / "b" / "pages-1.img").write_bytes(b"\0" * 4096)
    (work / "dump.log").write_text("log")
    (work / "a" / "link").symlink_to(outside)
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\n")

    remove_tree(work, proc_mounts=mounts)

    assert not work.exists()
    assert (outside / "keep.txt").read_text() == "precious"


def test_remove_tree_missing_path_is_fine(tmp_path: Path) -> None:
    remove_tree(tmp_path / "never-made", proc_mounts=tmp_path / "unused")


def test_remove_tree_refuses_while_something_stays_mounted(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / ".criu.cgyard.x").mkdir(parents=True)
    (work / "restore.log").write_text("log")
    # The fake mount table keeps listing a mount below the directory whatever happens, as a
    # mount that cannot be taken away would.
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {work}/.criu.cgyard.x tmpfs rw 0 0\n")

    with pytest.raises(WorkdirError):
        remove_tree(work, proc_mounts=mounts)

    assert (work / "restore.log").exists()
