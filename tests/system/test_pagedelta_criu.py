"""Page delta pre-copy and hybrid with real CRIU on a plain process (no runc).

A worker keeps private and shared random memory with a checksum per page and rewrites whole
pages at a set rate. Leave-running rounds and a final dump are turned into deltas, rebuilt at
a "destination" directory and restored; the restored worker checks every page itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fogmig.platform.base.errors import CriuError
from fogmig.platform.base.paths import cache_dir
from fogmig.platform.base.proc import run
from fogmig.platform.migration.delta.pagedelta import (
    PageDelta,
    PagemapDelta,
    apply_delta,
    build_hybrid_images,
    compute_delta,
    save_delta,
    write_delta,
    write_lazy_source,
)
from fogmig.platform.runtime.pagemap import PAGE_SIZE, read_pagemaps

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


async def criu_restore(
    images: Path, work: Path, worker: Worker, *, lazy: bool = False, pids: Path
) -> None:
    argv = ["criu", "restore", "-d", "-D", str(images), "-W", str(work), "-o", "restore.log"]
    if lazy:
        argv.append("--lazy-pages")
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
        assert rebuilt.pages_from_base > rebuilt.pages_from_delta
        assert _pages_files(root / "r3") == _pages_files(root / "d3")

        await criu_restore(root / "r3", root / "rw", worker, pids=root / "pids")
        assert await _restored_and_verified(worker, final_counter) == 0
        assert w2.pages_total > 0


async def test_final_round_restores_through_the_parent_link(workspace: Path) -> None:
    """Pre-copy without the rebuild: CRIU reads unchanged pages from the previous round."""
    root = workspace
    async with started_worker(root) as worker:
        await criu_dump(worker, root / "d1", leave_running=True)
        await asyncio.sleep(1.0)
        await criu_dump(worker, root / "d2", leave_running=False)
        final_counter = worker.counter()
        write_delta(None, root / "d1", root / "x1")
        apply_delta(None, root / "x1", root / "r1")
        write_delta(root / "d1", root / "d2", root / "x2")
        linked = build_hybrid_images(root / "r1", root / "x2", root / "l2")
        assert linked.pages_lazy == 0
        assert linked.pages_parent > 10 * linked.pages_present > 0
        await criu_restore(root / "l2", root / "rw", worker, pids=root / "pids")
        assert await _restored_and_verified(worker, final_counter) == 0


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
            )
        )
    return PageDelta(delta.cur_dir, tuple(kept), delta.stats), dropped


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
        assert await _restored_and_verified(worker, final_counter) == dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_hybrid_faults_in_only_the_changed_pages(workspace: Path) -> None:
    root = workspace
    async with started_worker(root) as worker:
        await criu_dump(worker, root / "d1", leave_running=True)
        await asyncio.sleep(1.5)
        await criu_dump(worker, root / "d2", leave_running=False)
        final_counter = worker.counter()

        served = _prepare_hybrid(root)
        # The daemon and the restore must share one work dir: the socket lives there.
        await lazy_restore(
            root,
            served,
            lambda work: criu_restore(root / "h2", work, worker, lazy=True, pids=root / "pids"),
        )
        assert await _restored_and_verified(worker, final_counter) == 0


def _prepare_hybrid(root: Path) -> int:
    """From rounds d1 and d2: the destination's h2 on top of r1, the source's serve dir."""
    # Pre-copy phase: the destination holds round 1 in full.
    write_delta(None, root / "d1", root / "x1")
    apply_delta(None, root / "x1", root / "r1")
    # After the freeze the source ships only execution state and non-lazy changed pages,
    # and serves the changed lazy pages from a trimmed image set.
    delta = compute_delta(root / "d1", root / "d2")
    shipped = save_delta(delta, root / "x2", lazy=True)
    served = write_lazy_source(delta, root / "serve")
    assert served == shipped.pages_lazy > 10
    hybrid = build_hybrid_images(root / "r1", root / "x2", root / "h2")
    assert hybrid.pages_lazy == served
    assert hybrid.pages_parent > 10 * hybrid.pages_lazy
    total = sum(pm.present_pages for pm in read_pagemaps(root / "d2").values())
    assert hybrid.pages_parent + hybrid.pages_present + hybrid.pages_lazy == total
    return served


async def lazy_restore(root: Path, served: int, restore: Callable[[Path], Awaitable[None]]) -> None:
    """Source page server, destination lazy-pages daemon, then ``restore(work dir)``."""
    port = _free_port()
    server = await asyncio.create_subprocess_exec(
        *["criu", "page-server", "--lazy-pages", "-D", str(root / "serve")],
        *["--address", "127.0.0.1", "--port", str(port), "-o", "ps.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lazy_work = root / "lazy-work"
    os.mkdir(lazy_work)
    daemon = None
    try:
        await _wait_listening(port, server)
        daemon = await asyncio.create_subprocess_exec(
            *["criu", "lazy-pages", "--page-server", "--address", "127.0.0.1"],
            *["--port", str(port), "-D", str(root / "h2"), "-W", str(lazy_work)],
            # "UFFD transferred pages" is logged at debug level only.
            *["-o", "lazy-pages.log", "-v4"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _exists(lazy_work / "lazy-pages.socket"):
            assert daemon.returncode is None, "the lazy-pages daemon died"
            assert time.monotonic() < deadline, "no lazy-pages.socket"
            await asyncio.sleep(0.02)
        await restore(lazy_work)
        # Judge a lazy restore by the destination daemon, never by the source.
        assert await asyncio.wait_for(daemon.wait(), 30) == 0
        assert await asyncio.wait_for(server.wait(), 30) == 0
    finally:
        for p in (daemon, server):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()
    log = _read(lazy_work / "lazy-pages.log")
    assert f"UFFD transferred pages: ({served}/{served})" in log


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def _tcp_table() -> list[str]:
    return Path("/proc/net/tcp").read_text().splitlines()[1:]


async def _wait_listening(port: int, server: asyncio.subprocess.Process) -> None:
    """The page server takes one connection only, so poll /proc/net/tcp, never connect."""
    want = f":{port:04X} "
    deadline = time.monotonic() + 10
    while True:
        if any(want in line and line.split()[3] == "0A" for line in _tcp_table()):
            return
        assert server.returncode is None, "the page server exited"
        assert time.monotonic() < deadline, "the page server does not listen"
        await asyncio.sleep(0.02)


def _python_rootfs() -> Path | None:
    """A service rootfs with python3 from the image cache, if one was built on this node."""
    for rootfs in sorted((cache_dir() / "images").glob("*/rootfs")):
        if (rootfs / "usr" / "bin" / "python3").exists():
            return rootfs
    return None


def _bundle(root: Path, name: str, rootfs: Path, *, restore_conf: Path | None) -> Path:
    bundle = root / name
    bundle.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = [
        *["python3", "/share/worker.py", str(PRIVATE_MB), str(SHARED_MB), str(RATE_KBS)],
        "/share/state",
    ]
    config["mounts"].append(
        {"destination": "/share", "type": "bind", "source": str(root), "options": ["rbind", "rw"]}
    )
    if restore_conf is not None:
        # Bind mounts restore only in mntns-compat-mode, which the dump rejects: the option
        # goes to the destination bundle only.
        config.setdefault("annotations", {})["org.criu.config"] = str(restore_conf)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


@pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")
async def test_hybrid_under_runc(workspace: Path) -> None:
    """The same hybrid restore through runc: the parent link must resolve in the container."""
    rootfs = _python_rootfs()
    if rootfs is None:
        pytest.skip("no service rootfs with python3 in the image cache")
    root = workspace
    (root / "worker.py").write_text(WORKER)
    (root / "state").mkdir()
    (root / "restore.conf").write_text("mntns-compat-mode\n")
    src = _bundle(root, "bundle-src", rootfs, restore_conf=None)
    dst = _bundle(root, "bundle-dst", rootfs, restore_conf=root / "restore.conf")
    name = f"fmpd-{os.getpid()}"
    runc = ["runc", "--root", str(root / "runc")]
    worker = Worker(0, root / "state", None)
    try:
        # Not proc.run: a detached container inherits runc's stdio, so pipes would never close.
        started = await asyncio.create_subprocess_exec(
            *runc,
            *["run", "-d", "--bundle", str(src), name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(started.wait(), 30) == 0, "runc run failed"
        deadline = time.monotonic() + 20
        while not _exists(root / "state" / "counter"):
            assert time.monotonic() < deadline, "the containerised worker did not start"
            await asyncio.sleep(0.05)
        for images, extra in (("d1", ["--leave-running"]), ("d2", [])):
            if images == "d2":
                await asyncio.sleep(1.5)
            await run(
                [
                    *runc,
                    *["checkpoint", *extra, "--image-path", str(root / images)],
                    *["--work-path", str(root / f"{images}-work"), name],
                ],
                error=CriuError,
                log_path=root / f"{images}-work" / "dump.log",
                what="runc checkpoint",
            )
        final_counter = worker.counter()
        served = _prepare_hybrid(root)
        assert os.readlink(root / "h2" / "parent") == "../r1"

        async def restore(work: Path) -> None:
            await run(
                [
                    *runc,
                    *["restore", "-d", "--lazy-pages", "--image-path", str(root / "h2")],
                    *["--work-path", str(work), "--bundle", str(dst), name],
                ],
                error=CriuError,
                log_path=work / "restore.log",
                what="runc restore",
            )

        await lazy_restore(root, served, restore)
        assert await _restored_and_verified(worker, final_counter) == 0
    finally:
        await run([*runc, "delete", "-f", name], check=False)
