"""Freezing a container's cgroup ahead of CRIU: which file, when it counts as frozen, and a
freeze that does not finish is undone (on a cgroup tree of plain files)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fogmig.platform.runtime.freezer import CgroupFreezer


def v1_tree(root: Path, cg: str = "fogmig/gw1/s1") -> Path:
    path = root / "freezer" / cg
    path.mkdir(parents=True)
    (path / "freezer.state").write_text("THAWED\n")
    return path


def v2_tree(root: Path, cg: str = "fogmig/gw1/s1", *, under: str = "") -> Path:
    path = root / under / cg if under else root / cg
    path.mkdir(parents=True)
    (path / "cgroup.freeze").write_text("0\n")
    (path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return path


def test_the_freezer_is_found_in_either_hierarchy(tmp_path: Path) -> None:
    assert CgroupFreezer.of("/fogmig/gw1/s1", root=tmp_path) is None
    assert CgroupFreezer.of(None, root=tmp_path) is None
    assert CgroupFreezer.of("fogmig/gw1/s1", root=tmp_path) is None  # not absolute: runc's own
    unified = v2_tree(tmp_path, under="unified")
    assert CgroupFreezer.of("/fogmig/gw1/s1", root=tmp_path) == CgroupFreezer(unified, v2=True)
    v1 = v1_tree(tmp_path)  # v1's freezer wins: a hybrid host freezes there
    assert CgroupFreezer.of("/fogmig/gw1/s1", root=tmp_path) == CgroupFreezer(v1, v2=False)


async def test_v1_freeze_and_thaw_write_the_state(tmp_path: Path) -> None:
    path = v1_tree(tmp_path)
    freezer = CgroupFreezer(path, v2=False)
    assert not freezer.frozen()
    took = await freezer.freeze()
    assert took is not None
    assert (path / "freezer.state").read_text() == "FROZEN"
    freezer.thaw()
    assert (path / "freezer.state").read_text() == "THAWED"


async def test_v2_freeze_waits_for_the_events_file(tmp_path: Path) -> None:
    path = v2_tree(tmp_path)
    freezer = CgroupFreezer(path, v2=True)

    async def kernel() -> None:  # the tasks stop some milliseconds after the write
        await asyncio.sleep(0.01)
        assert (path / "cgroup.freeze").read_text() == "1"
        (path / "cgroup.events").write_text("populated 1\nfrozen 1\n")

    stopper = asyncio.create_task(kernel())
    took = await freezer.freeze(timeout_s=2.0)
    await stopper
    assert took is not None
    assert took >= 0.01
    assert freezer.frozen()


async def test_a_freeze_that_does_not_finish_is_undone(tmp_path: Path) -> None:
    path = v2_tree(tmp_path)
    freezer = CgroupFreezer(path, v2=True)
    assert await freezer.freeze(timeout_s=0.02) is None
    assert (path / "cgroup.freeze").read_text() == "0"
