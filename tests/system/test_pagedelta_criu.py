"""Page delta pre-copy with real CRIU on a plain process (no runc).

A worker keeps private and shared random memory with a checksum per page and rewrites whole
pages at a set rate. Leave-running rounds and a final dump are turned into deltas, rebuilt at
a "destination" directory and restored; the restored worker checks every page itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fogmig.platform.base.errors import CriuError
from fogmig.platform.base.proc import run
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.delta.apply import (
    apply_delta,
)
from fogmig.platform.migration.delta.compute import (
    PageDelta,
    PagemapDelta,
    compute_delta,
)
from fogmig.platform.migration.delta.save import (
    save_delta,
    write_delta,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU needs root"),
    pytest.mark.skipif(shutil.which("criu") is None, reason="CRIU is not installed"),
]

PRIVATE_MB = 8
SHARED_MB = 1
RATE_KBS = 200  # whole random pages rewritten per second, in KB

WORKER = r"""
import ctypes, mmap, os, random, sys, time, zlib
PAGE = 4096
private_mb, shared_mb, rate_kbs, state = map(str, sys.argv[1:5])
private_mb, shared_mb, rate_kbs = float(private_mb), float(shared_mb), float(rate_kbs)
regions = []
for mb, flags in ((private_mb, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                  (shared_mb, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)):
    n = int(mb * 1024 * 1024) // PAGE
    m = mmap.mmap(-1, n * PAGE, flags=flags)
    for i in range(n):
        m[i * PAGE:(i + 1) * PAGE] = os.urandom(PAGE)
    regions.append((m, n, [zlib.crc32(m[i * PAGE:(i + 1) * PAGE]) for i in range(n)]))
private_addr = ctypes.addressof(ctypes.c_char.from_buffer(regions[0][0]))
rng = random.Random(os.getpid())
pages_per_s, owed, counter, last = rate_kbs / 4, 0.0, 0, time.monotonic()

def publish(name, text):
    tmp = os.path.join(state, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(state, name))

publish("region", f"{private_addr} {regions[0][1]}\n")
while True:
    now = time.monotonic()
    # Paced by the clock, not by ticks; no burst after the freeze of a migration.
    owed, last = min(owed + pages_per_s * (now - last), pages_per_s), now
    while owed >= 1:
        owed -= 1
        m, n, sums = regions[rng.randrange(len(regions))]
        p = rng.randrange(n)
        m[p * PAGE:(p + 1) * PAGE] = os.urandom(PAGE)
        sums[p] = zlib.crc32(m[p * PAGE:(p + 1) * PAGE])
    counter += 1
    publish("counter", f"{os.getpid()} {counter}\n")
    flag = os.path.join(state, "verify")
    if os.path.exists(flag):
        os.unlink(flag)
        bad = sum(1 for m, n, sums in regions for i in range(n)
                  if zlib.crc32(m[i * PAGE:(i + 1) * PAGE]) != sums[i])
        publish("verified", f"{counter} {bad}\n")
    time.sleep(0.05)
"""


@dataclass
class Worker:
    """The worker process as the test sees it, through the files it publishes."""

    pid: int
    state: Path
    popen: subprocess.Popen[bytes] | None

    def counter(self) -> int:
        return int((self.state / "counter").read_text().split()[1])

    def region(self) -> tuple[int, int]:
        addr, n = (self.state / "region").read_text().split()
        return int(addr), int(n)

    async def verify(self, timeout: float = 10.0) -> tuple[int, int]:
        """Ask the worker to check every page; returns (counter, bad pages)."""
        done = self.state / "verified"
        done.unlink(missing_ok=True)
        (self.state / "verify").touch()
        deadline = time.monotonic() + timeout
        while not done.exists():
            assert time.monotonic() < deadline, "the worker did not answer the page check"
            await asyncio.sleep(0.05)
        counter, bad = done.read_text().split()
        return int(counter), int(bad)


def _exists(path: Path) -> bool:
    return path.exists()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _exists(Path(f"/proc/{pid}")):
        assert time.monotonic() < deadline, f"process {pid} did not go away"
        await asyncio.sleep(0.02)


def _unmount_below(path: Path) -> None:
    """CRIU can leave its cgroup yard mounted in a work dir; never rm -rf into it."""
    prefix = str(path.resolve()) + "/"
    points = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def workspace() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="fmpd-"))
    pids: list[int] = []
    (root / "pids").write_text("")
    try:
        yield root
    finally:
        for line in (root / "pids").read_text().split():
            pids.append(int(line))
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def started_worker(root: Path) -> AsyncIterator[Worker]:
    state = root / "state"
    state.mkdir()
    script = root / "worker.py"
    script.write_text(WORKER)
    popen = subprocess.Popen(
        [sys.executable, str(script), str(PRIVATE_MB), str(SHARED_MB), str(RATE_KBS), str(state)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own session: CRIU dumps it without --shell-job
    )
    with (root / "pids").open("a") as f:
        f.write(f"{popen.pid}\n")
    worker = Worker(popen.pid, state, popen)
    deadline = time.monotonic() + 20
    while not (state / "counter").exists():
        assert popen.poll() is None, "the worker died while filling its memory"
        assert time.monotonic() < deadline, "the worker did not start"
        await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait()


async def criu_dump(worker: Worker, images: Path, *, leave_running: bool) -> None:
    os.mkdir(images)
    argv = ["criu", "dump", "-t", str(worker.pid), "-D", str(images), "-o", "dump.log"]
    if leave_running:
        argv.append("--leave-running")
    await run(argv, error=CriuError, log_path=images / "dump.log", what="criu dump", timeout=60)
    if not leave_running:
        assert worker.popen is not None
        worker.popen.wait(timeout=10)  # reap it so the restore can take the pid back


async def criu_restore(images: Path, work: Path, worker: Worker, *, pids: Path) -> None:
    argv = ["criu", "restore", "-d", "-D", str(images), "-W", str(work), "-o", "restore.log"]
    await _wait_gone(worker.pid)
    os.makedirs(work, exist_ok=True)
    await run(argv, error=CriuError, log_path=work / "restore.log", what="criu restore")
    with pids.open("a") as f:
        f.write(f"{worker.pid}\n")
    worker.popen = None


async def _restored_and_verified(worker: Worker, final_counter: int) -> int:
    """Wait until the restored worker counts past the dump, then check its pages."""
    deadline = time.monotonic() + 10
    while worker.counter() <= final_counter + 2:
        assert time.monotonic() < deadline, "the restored worker does not run"
        await asyncio.sleep(0.05)
    counter, bad = await worker.verify()
    assert counter > final_counter
    return bad


def _pages_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("pages-*.img"))}


async def test_precopy_rounds_rebuild_and_restore(workspace: Path) -> None:
    root = workspace
    async with started_worker(root) as worker:
        await criu_dump(worker, root / "d1", leave_running=True)
        await asyncio.sleep(1.0)
        await criu_dump(worker, root / "d2", leave_running=True)
        await asyncio.sleep(1.0)
        await criu_dump(worker, root / "d3", leave_running=False)
        final_counter = worker.counter()

        # Source side: one delta per round; destination side: rebuild round after round.
        w1 = write_delta(None, root / "d1", root / "x1")
        w2 = write_delta(root / "d1", root / "d2", root / "x2")
        w3 = write_delta(root / "d2", root / "d3", root / "x3")
        apply_delta(None, root / "x1", root / "r1")
        apply_delta(root / "r1", root / "x2", root / "r2")
        rebuilt = apply_delta(root / "r2", root / "x3", root / "r3")

        assert w1.pages_changed == w1.pages_total >= (PRIVATE_MB + SHARED_MB) * 256
        # About 50 pages a second are rewritten; the interpreter dirties some more.
        assert 20 < w3.pages_changed < w3.pages_total // 4
        assert w3.bytes < w1.bytes // 4
        # The interpreter changes a few bytes of its pages: those travel as XOR; the worker's
        # whole random pages travel raw. Either way the rebuild is byte-identical.
        m3 = w3.manifest
        assert 0 < m3.pages_xor < w3.pages_changed
        assert m3.page_bytes_stored < m3.page_bytes_plain
        assert rebuilt.pages_from_base > rebuilt.pages_from_delta
        assert _pages_files(root / "r3") == _pages_files(root / "d3")

        await criu_restore(root / "r3", root / "rw", worker, pids=root / "pids")
        assert await _restored_and_verified(worker, final_counter) == 0
        assert w2.pages_total > 0


def _drop_private_pages(delta: PageDelta, region: tuple[int, int]) -> tuple[PageDelta, int]:
    """A delta that leaves out the changed pages of the worker's private region."""
    start, n = region
    end = start + n * PAGE_SIZE
    kept: list[PagemapDelta] = []
    dropped = 0
    for d in delta.pagemaps:
        v = d.shipped_vaddrs()
        inside = (v >= start) & (v < end) if not d.pagemap.image_id.startswith("shmem") else v < 0
        dropped += int(inside.sum())
        kept.append(
            PagemapDelta(
                d.pagemap,
                d.shipped[~inside],
                d.pages_changed,
                d.pages_new,
                d.pages_gone,
                d.base_digest,
                d.base,
                None if d.base_index is None else d.base_index[~inside],
            )
        )
    return PageDelta(delta.cur_dir, tuple(kept), delta.stats, delta.prev_dir), dropped


async def test_a_delta_missing_pages_is_caught_by_the_worker(workspace: Path) -> None:
    """Negative control: the page check in the worker does see stale pages."""
    root = workspace
    async with started_worker(root) as worker:
        await criu_dump(worker, root / "d1", leave_running=True)
        await asyncio.sleep(1.0)
        await criu_dump(worker, root / "d2", leave_running=False)
        final_counter = worker.counter()
        write_delta(None, root / "d1", root / "x1")
        apply_delta(None, root / "x1", root / "r1")
        broken, dropped = _drop_private_pages(
            compute_delta(root / "d1", root / "d2"), worker.region()
        )
        assert dropped > 10
        save_delta(broken, root / "x2", digest=False)
        apply_delta(root / "r1", root / "x2", root / "r2")
        assert _pages_files(root / "r2") != _pages_files(root / "d2")
        await criu_restore(root / "r2", root / "rw", worker, pids=root / "pids")
        bad = await _restored_and_verified(worker, final_counter)
        # Every stale page is seen; a dropped page whose bytes happened not to change since
        # round 1 (the delta ships whole entries) is not stale, so it cannot be.
        assert 0.9 * dropped <= bad <= dropped
