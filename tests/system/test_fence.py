"""The fence with real runc and CRIU: a plain container from the service image, in a node's
network namespace, killed by the watchdog when its lease runs out, and never again after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fogmig.platform.base.errors import FenceFiredError, RuntimeToolError
from fogmig.platform.base.mounts import mounts_below
from fogmig.platform.runtime import fence_store
from fogmig.platform.runtime.bundle import make_bundle
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.runtime.fence import Fence, FenceHandle
from fogmig.platform.runtime.fence_state import FenceState
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.services.image import ensure_image, find_image

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc, CRIU and namespaces need root"),
]

NODE = "fmfence"
CID = "svc"
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
LATE_S = 0.2
"""How long after its deadline a fenced container may still live."""


def _sh(*argv: str, check: bool = True) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr}")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _until(check: Callable[[], bool], timeout: float, step: float = 0.002) -> float:
    """Wait for ``check``; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)
    return time.monotonic()


@pytest.fixture(scope="module")
def image() -> Path:
    found = find_image()
    return found if found is not None else asyncio.run(ensure_image())


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    ns = f"fmfn-{uuid.uuid4().hex[:6]}"
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        _sh("ip", "netns", "del", ns, check=False)


@dataclass
class Rig:
    rt: NodeRuntime
    root: Path
    image: Path
    netns: str
    handles: list[FenceHandle]

    def bundle(self) -> Path:
        return make_bundle(
            self.root / "bundles" / CID,
            rootfs=self.image,
            args=["sleep", "3600"],
            netns_path=Path("/var/run/netns") / self.netns,
            restore_conf=True,
            cgroups_path=f"/fogmig-test/{self.netns}/{CID}",
            hostname=CID,
        )

    async def start(self) -> int:
        return (await self.rt.run(CID, self.bundle())).pid

    def arm(
        self, mid: str, in_s: float, *, grace_s: float = 600.0, confirm: bool = True
    ) -> FenceHandle:
        handle = Fence.arm(
            node=NODE,
            container_id=CID,
            runc_root=self.rt.runc_root,
            migration_id=mid,
            deadline=time.monotonic() + in_s,
            grace_s=grace_s,
            netns=self.netns,
            confirm=confirm,
        )
        self.handles.append(handle)
        return handle

    def fences(self) -> list[Path]:
        return fence_store.listing(fence_store.fence_dir(NODE))


@pytest.fixture
async def rig(
    netns: str, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    monkeypatch.setenv("FOGMIG_RUN_DIR", str(tmp_path / "run"))
    rt = NodeRuntime(node=NODE, netns=netns, runc_root=tmp_path / "runc")
    r = Rig(rt=rt, root=tmp_path, image=image, netns=netns, handles=[])
    try:
        yield r
    finally:
        watchdogs = []
        for path in r.fences():
            rec = fence_store.read(path)
            if rec is not None and fence_store.is_watchdog(rec.watchdog_pid, path):
                assert rec.watchdog_pid is not None
                watchdogs.append(rec.watchdog_pid)
                os.kill(rec.watchdog_pid, signal.SIGKILL)
        for c in await rt.list():
            await rt.delete(c.id, force=True)
        left = [c.id for c in await rt.list()]
        mounted = mounts_below(tmp_path)
        remove_tree(tmp_path)
    assert watchdogs == [], "a watchdog outlived its test"
    assert left == []
    assert mounted == [], f"mounts left below the test directory: {mounted}"
    assert not (CGROUP_MEMORY / "fogmig-test" / netns).exists(), "cgroup left behind"


async def test_a_fence_kills_the_container_at_its_deadline(rig: Rig) -> None:
    pid = await rig.start()
    fence = await asyncio.to_thread(rig.arm, "m-a", 0.5)
    deadline = fence.record().deadline
    assert _alive(pid)

    dead_at = _until(lambda: not _alive(pid), timeout=5)

    late = dead_at - deadline
    print(f"\nkilled {late * 1000:.1f} ms after the deadline")
    assert 0 <= late < LATE_S
    rec = fence.wait_killed(timeout=5)
    assert rec.state is FenceState.FIRED
    assert rec.fired_at is not None
    assert rec.fired_at >= deadline
    assert not await rig.rt.exists(CID)
    with pytest.raises(FenceFiredError):
        fence.disarm()
    await asyncio.to_thread(fence.release)
    assert rig.fences() == []


async def test_an_arm_confirmed_later_fires_all_the_same(rig: Rig) -> None:
    # The destination arms, restores while the watchdog starts, then confirms it.
    pid = await rig.start()
    started = time.monotonic()
    fence = await asyncio.to_thread(rig.arm, "m-c", 0.6, confirm=False)
    armed_in = time.monotonic() - started
    assert fence.state() is FenceState.ARMED  # on disk before the watchdog runs
    watchdog = await asyncio.to_thread(fence.confirm_watchdog)
    print(f"\narmed in {armed_in * 1000:.1f} ms, watchdog {watchdog} confirmed after")
    assert watchdog is not None
    assert watchdog == fence.watchdog_pid()
    deadline = fence.record().deadline

    dead_at = _until(lambda: not _alive(pid), timeout=5)

    assert 0 <= dead_at - deadline < LATE_S
    fence.wait_killed(timeout=5)
    await asyncio.to_thread(fence.release)
    assert rig.fences() == []


async def test_extending_keeps_it_and_disarm_leaves_it_running(rig: Rig) -> None:
    pid = await rig.start()
    fence = await asyncio.to_thread(rig.arm, "m-b", 0.4)
    watchdog = fence.watchdog_pid()
    assert watchdog is not None
    end = time.monotonic() + 2.0
    while time.monotonic() < end:  # ticketed calls, each renewing the lease
        fence.extend(time.monotonic() + 0.4)
        await asyncio.sleep(0.15)
    assert _alive(pid)

    await asyncio.to_thread(fence.disarm)

    assert not fence_store.is_watchdog(watchdog, fence.path)
    assert rig.fences() == []
    await asyncio.sleep(0.6)  # well past the last deadline
    assert _alive(pid)
    assert (await rig.rt.state(CID)).running
    await rig.rt.stop(CID, grace=1)


async def test_the_fence_fires_after_the_arming_process_is_killed(rig: Rig) -> None:
    pid = await rig.start()
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from fogmig.platform.runtime.fence import Fence
        h = Fence.arm(node={NODE!r}, container_id={CID!r},
                      runc_root=Path({str(rig.rt.runc_root)!r}), migration_id="m-d",
                      deadline=time.monotonic() + 1.0, netns={rig.netns!r})
        print(h.record().deadline, flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-P", "-c", code], stdout=subprocess.PIPE) as agent:
        try:
            assert agent.stdout is not None
            deadline = float(agent.stdout.readline())
        finally:
            agent.send_signal(signal.SIGKILL)
    assert agent.returncode == -signal.SIGKILL
    fence = Fence.find(NODE, "m-d")
    assert fence is not None
    rig.handles.append(fence)
    assert time.monotonic() < deadline
    assert _alive(pid)

    dead_at = _until(lambda: not _alive(pid), timeout=5)

    assert dead_at - deadline < LATE_S
    fence.wait_killed(timeout=5)
    await asyncio.to_thread(fence.release)


async def test_a_container_made_again_after_firing_is_killed(rig: Rig) -> None:
    await rig.start()
    fence = await asyncio.to_thread(rig.arm, "m-e", 0.3, grace_s=4.0)
    rec = await asyncio.to_thread(fence.wait_killed, 5)
    watchdog = rec.watchdog_pid

    # A container created under that id after the fence fired (as a restore that finishes
    # late would) never keeps running.
    for _ in range(2):
        with contextlib.suppress(RuntimeToolError):  # killed while runc still set it up
            await rig.rt.run(CID, rig.bundle())
        await asyncio.to_thread(_until, lambda: not (rig.rt.runc_root / CID).exists(), 3.0)
        assert not await rig.rt.exists(CID)
    assert fence.state() is FenceState.FIRED

    # The grace period ends: the watchdog leaves and takes its file with it.
    await asyncio.to_thread(_until, lambda: rig.fences() == [], 8.0, 0.05)
    await asyncio.to_thread(_until, lambda: not fence_store.is_watchdog(watchdog, fence.path), 2.0)
    assert Fence.records(NODE) == []


async def test_a_restore_that_finishes_after_firing_is_killed(rig: Rig) -> None:
    await rig.start()
    images, work = rig.root / "images", rig.root / "work"
    await rig.rt.checkpoint(CID, image_dir=images, work_dir=work)
    fence = await asyncio.to_thread(rig.arm, "m-r", 0.2, grace_s=600.0)
    await asyncio.to_thread(fence.wait_killed, 5)

    try:
        restored = await rig.rt.restore(
            CID, bundle=rig.bundle(), image_dir=images, work_dir=rig.root / "restore"
        )
    except RuntimeToolError as exc:
        print(f"\nthe restore failed under the fence: {exc}")  # killed mid-restore: as good
    else:
        gone = await asyncio.to_thread(_until, lambda: not _alive(restored.pid), 2.0)
        print(f"\nrestored copy killed {(gone - time.monotonic()) * 1000:+.0f} ms from now")
    await asyncio.to_thread(_until, lambda: not (rig.rt.runc_root / CID).exists(), 3.0)
    await asyncio.to_thread(fence.release)
    assert rig.fences() == []
    assert not await rig.rt.exists(CID)
