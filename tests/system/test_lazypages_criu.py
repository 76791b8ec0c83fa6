"""Lazy pages served by fogmig to the real CRIU 4.2.1 lazy-pages daemon, on a plain process.

A Python process with a random buffer and a counter is dumped completely, restored from the
lazy layout in a network namespace of the test's own, and faults its memory in from
:class:`LazyPageServer`. The process checks its own buffer against per-page checksums on
SIGUSR1, so a missing or wrong page shows up as BAD.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fogmig.platform.base.errors import CriuError, TransferError
from fogmig.platform.base.proc import run, run_sync
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.daemon import (
    LazyPagesDaemon,
)
from fogmig.platform.migration.lazy.errors import (
    LazyPagesFailed,
)
from fogmig.platform.migration.lazy.layout import (
    LazyLayoutStats,
    convert_to_lazy_layout,
)
from fogmig.platform.migration.lazy.server import (
    LazyPageServer,
    LazyServeStats,
)
from fogmig.platform.migration.lazy.sources import (
    LayeredPages,
    LocalImagePages,
    PageSource,
    RemotePages,
)
from fogmig.platform.migration.lazy.verdict import (
    LazyPagesOutcome,
)
from fogmig.platform.runtime.capabilities import criu_capabilities
from fogmig.platform.runtime.pagemap import load_pages, read_pagemaps
from fogmig.platform.runtime.workdir import remove_tree

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("criu") is None, reason="needs CRIU"),
]

BUFFER_PAGES = 2048  # 8 MiB of random data
HOT_PAGES = 16  # pages of the buffer the process keeps rewriting

WORKLOAD = r"""
import os, signal, sys, time, zlib
PAGE = 4096
npages, d, hot, spare = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
buf = bytearray(os.urandom(npages * PAGE))
# Memory the process frees (munmap) once the file "free" appears.
spare = bytearray(os.urandom(spare * PAGE)) if spare else None
mv = memoryview(buf)
sums = [zlib.crc32(mv[i * PAGE:(i + 1) * PAGE]) for i in range(npages)]
counter = 0
check = False
def on_usr1(signum, frame):
    global check
    check = True
signal.signal(signal.SIGUSR1, on_usr1)
def put(name, text):
    tmp = os.path.join(d, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(d, name))
while True:
    if spare is not None and os.path.exists(os.path.join(d, "free")):
        spare = None
        put("freed", str(counter))
    counter += 1
    i = counter % hot
    mv[i * PAGE:i * PAGE + 8] = counter.to_bytes(8, "little")
    sums[i] = zlib.crc32(mv[i * PAGE:(i + 1) * PAGE])
    put("counter", str(counter))
    if check:
        check = False
        bad = sum(1 for i in range(npages) if zlib.crc32(mv[i * PAGE:(i + 1) * PAGE]) != sums[i])
        put("verdict", f"{'OK' if bad == 0 else 'BAD'} {bad} {counter}")
    time.sleep(0.1)
"""


@pytest.fixture(scope="module", autouse=True)
def _needs_uffd() -> None:
    if not criu_capabilities().postcopy:
        pytest.skip("CRIU lazy restore (userfaultfd) is not available")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"fmlp-{uuid.uuid4().hex[:8]}"
    run_sync(["ip", "netns", "add", name])
    try:
        run_sync(["ip", "link", "set", "lo", "up"], netns=name)
        yield name
    finally:
        run_sync(["ip", "netns", "del", name], check=False)


class Workload:
    """The test process: started here, dumped, restored by CRIU with the same pid."""

    def __init__(self, base: Path, pages: int = BUFFER_PAGES, spare: int = 0) -> None:
        self.dir = base / "proc"
        self.dir.mkdir()
        self.script = base / "workload.py"
        self.script.write_text(WORKLOAD)
        self.pages = pages
        self.spare = spare
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [
                *(sys.executable, str(self.script), str(self.pages), str(self.dir)),
                *(str(HOT_PAGES), str(self.spare)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        deadline = time.monotonic() + 20
        while self.counter() < 3:
            assert self.popen.poll() is None, "workload died at start"
            assert time.monotonic() < deadline, "workload did not start counting"
            time.sleep(0.05)

    def counter(self) -> int:
        try:
            return int((self.dir / "counter").read_text() or 0)
        except FileNotFoundError:
            return 0

    def alive(self) -> bool:
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False
        return str(self.script).encode() in cmdline and self._state() != "Z"

    def _state(self) -> str:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return "X"
        return stat.rsplit(")", 1)[1].split()[0]

    async def dump(self, image_dir: Path, *, leave_running: bool = False) -> None:
        os.makedirs(image_dir)
        argv = ["criu", "dump", "-t", str(self.pid), "-D", str(image_dir)]
        argv += ["-v4", "-o", "dump.log"]
        if leave_running:
            argv.append("--leave-running")
        await run(argv, error=CriuError, log_path=image_dir / "dump.log", what="criu dump")
        if not leave_running:
            assert self.popen is not None
            self.popen.wait(timeout=10)  # free the pid for the restore

    async def verdict(self, after: int, timeout: float = 30.0) -> str:
        """Ask the process to check its buffer; its answer (OK/BAD), or DEAD."""
        verdict = self.dir / "verdict"
        verdict.unlink(missing_ok=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return "DEAD"
            with_counter = self.counter()
            if with_counter > after:
                os.kill(self.pid, signal.SIGUSR1)
                if verdict.exists():
                    return verdict.read_text().split()[0]
            await asyncio.sleep(0.1)
        return "TIMEOUT"

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        elif self.alive():
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    base = tmp_path / "fmlp"
    base.mkdir()
    try:
        yield base
    finally:
        remove_tree(base)


@pytest.fixture
async def workload(scratch: Path) -> AsyncIterator[Workload]:
    w = Workload(scratch)
    w.start()
    try:
        yield w
    finally:
        w.kill()


@dataclass
class LazyRun:
    outcome: LazyPagesOutcome
    stats: LazyServeStats
    layout: LazyLayoutStats
    restore_s: float
    served_s: float


async def lazy_restore(
    scratch: Path,
    full: Path,
    source: PageSource,
    netns: str,
) -> LazyRun:
    """Convert, serve and restore lazily; returns once the daemon has exited.

    The restore runs in ``netns`` (the "node"); the daemon gets a socket-pair channel to the
    server, so it needs no network of its own.
    """
    lazy = scratch / "lazy"
    work = scratch / "lazy-work"
    layout = await convert_to_lazy_layout(full, lazy)
    async with LazyPageServer(source=source) as server:
        async with LazyPagesDaemon(
            image_dir=lazy,
            work_dir=work,
            channel=await server.channel(),
            expected_tasks=layout.tasks,
        ) as daemon:
            started = time.monotonic()
            await run(
                [
                    *("criu", "restore", "-d", "--lazy-pages"),
                    *("-D", str(lazy), "-W", str(work), "-v4", "-o", "restore.log"),
                ],
                netns=netns,
                error=CriuError,
                log_path=work / "restore.log",
                what="criu restore --lazy-pages",
            )
            restore_s = time.monotonic() - started
            outcome = await daemon.wait(timeout=60, server=server)
            served_s = time.monotonic() - started
        stats = await server.wait_session(timeout=10)
    return LazyRun(outcome, stats, layout, restore_s, served_s)


def _report(label: str, r: LazyRun) -> None:
    s = r.stats
    print(
        f"\n{label}: layout {r.layout.files_written} files {r.layout.bytes_written} B, "
        f"{r.layout.lazy_pages} lazy / {r.layout.pages_kept} kept pages; restore "
        f"{r.restore_s:.3f} s; all pages in after {r.served_s:.3f} s; {s.requests} requests, "
        f"{s.pages_served} pages ({s.local_pages} local, {s.remote_pages} remote), "
        f"transfer time {s.faulted_pages_transfer_time}; {r.outcome.describe()}"
    )


async def test_postcopy_from_local_image(scratch: Path, workload: Workload, netns: str) -> None:
    full = scratch / "full"
    await workload.dump(full)
    at_dump = workload.counter()
    with LocalImagePages(full) as source:
        r = await lazy_restore(scratch, full, source, netns)
    _report("post-copy", r)

    r.outcome.raise_for_failure()
    assert r.outcome.ok
    assert r.outcome.pages_transferred == r.layout.lazy_pages
    assert r.stats.closed_cleanly, r.stats.error
    assert r.stats.error is None
    # The whole anonymous state went through the server, each page once.
    assert r.stats.pages_served == r.layout.lazy_pages
    assert r.stats.local_pages == r.layout.lazy_pages
    assert r.stats.remote_pages == 0
    assert r.layout.lazy_pages >= BUFFER_PAGES
    # The shipped layout is small: the buffer is not in it.
    assert r.layout.bytes_written < BUFFER_PAGES * PAGE_SIZE // 2
    assert await workload.verdict(after=at_dump) == "OK"
    assert workload.counter() > at_dump


def _changed_pages(base: Path, final: Path) -> dict[int, set[int]]:
    """Per task, the vaddrs of the final dump's pages that the base lacks or holds otherwise."""
    base_maps = read_pagemaps(base)
    changed: dict[int, set[int]] = {}
    for image_id, pm in read_pagemaps(final).items():
        if not image_id.isdigit():
            continue
        pages = load_pages(final, pm)
        old_pm = base_maps.get(image_id)
        old_pages = load_pages(base, old_pm) if old_pm is not None else None
        old_offsets = old_pm.page_offsets() if old_pm is not None else {}
        out: set[int] = set()
        for index, vaddr in enumerate(pm.present_vaddrs().tolist()):
            old = old_offsets.get(vaddr)
            if (
                old is None
                or old_pages is None
                or bytes(old_pages[old // PAGE_SIZE]) != bytes(pages[index])
            ):
                out.add(vaddr)
        changed[int(image_id)] = out
    return changed


def _lazy_vaddrs(image_dir: Path) -> dict[int, set[int]]:
    return {
        int(i): {int(v) for v in pm.vaddrs_with(2).tolist()}
        for i, pm in read_pagemaps(image_dir).items()
        if i.isdigit()
    }


async def test_hybrid_fetches_only_changed_pages(
    scratch: Path, workload: Workload, netns: str
) -> None:
    base = scratch / "base"
    await workload.dump(base, leave_running=True)
    await asyncio.sleep(0.6)  # a few rounds of the hot pages change
    final = scratch / "final"
    await workload.dump(final)
    at_dump = workload.counter()
    changed = _changed_pages(base, final)
    lazy_in_final = _lazy_vaddrs(final)
    expected_remote = {pid: changed[pid] & lazy_in_final[pid] for pid in changed}
    n_remote = sum(len(v) for v in expected_remote.values())
    assert 0 < n_remote < BUFFER_PAGES // 4  # a real delta, much smaller than the state

    fetched: dict[int, set[int]] = {}
    with LocalImagePages(final) as source_side, LocalImagePages(base) as local:

        async def fetch(pid_id: int, vaddr: int, nr_pages: int) -> bytes:
            await asyncio.sleep(0.001)  # a round trip, however short
            data = await source_side.read(pid_id, vaddr, nr_pages)
            pages = fetched.setdefault(pid_id, set())
            pages.update(vaddr + i * PAGE_SIZE for i in range(len(data) // PAGE_SIZE))
            return data

        layered = LayeredPages(local, RemotePages(fetch), changed)
        r = await lazy_restore(scratch, final, layered, netns)
    _report(f"hybrid ({n_remote} changed pages)", r)

    r.outcome.raise_for_failure()
    assert r.stats.closed_cleanly, r.stats.error
    assert fetched == {pid: v for pid, v in expected_remote.items() if v}
    assert r.stats.remote_pages == n_remote
    assert r.stats.local_pages == r.layout.lazy_pages - n_remote
    assert await workload.verdict(after=at_dump) == "OK"


async def test_memory_the_task_frees_during_the_transfer_is_no_failure(
    scratch: Path, netns: str
) -> None:
    workload = Workload(scratch, spare=BUFFER_PAGES)
    workload.start()
    try:
        full = scratch / "full"
        await workload.dump(full)
        at_dump = workload.counter()
        # The restored process frees its spare buffer on its first tick, while slow fetches
        # keep most of that buffer still unfetched: the daemon ends with copied < total.
        (workload.dir / "free").write_text("now")
        with LocalImagePages(full) as source_side:

            async def fetch(pid_id: int, vaddr: int, nr_pages: int) -> bytes:
                await asyncio.sleep(0.02)
                return await source_side.read(pid_id, vaddr, nr_pages)

            r = await lazy_restore(scratch, full, RemotePages(fetch), netns)
        _report("freed during transfer", r)

        assert (workload.dir / "freed").exists()
        short = [t for t in r.outcome.tasks if t.copied < t.total]
        assert short, "the process freed nothing before it was fetched: test did not bite"
        assert r.outcome.missing is not None
        assert all(r.outcome.missing[t.pid] == 0 for t in short)
        assert all(r.outcome.released[t.pid] >= t.total - t.copied for t in short)
        assert r.outcome.ok
        assert await workload.verdict(after=at_dump) == "OK"
    finally:
        workload.kill()


async def test_failing_remote_source_fails_the_transfer(
    scratch: Path, workload: Workload, netns: str
) -> None:
    full = scratch / "full"
    await workload.dump(full)
    at_dump = workload.counter()
    answered = 0

    with LocalImagePages(full) as source_side:

        async def fetch(pid_id: int, vaddr: int, nr_pages: int) -> bytes:
            nonlocal answered
            if answered >= 3:
                raise TransferError("source lost mid-transfer")
            answered += 1
            return await source_side.read(pid_id, vaddr, nr_pages)

        r = await lazy_restore(scratch, full, RemotePages(fetch), netns)
    _report("failing source", r)

    assert not r.outcome.ok
    assert r.outcome.pages_transferred < r.layout.lazy_pages
    with pytest.raises(LazyPagesFailed) as failure:
        r.outcome.raise_for_failure()
    assert failure.value.log_path is not None
    assert str(failure.value.log_path) in str(failure.value)
    assert not r.stats.closed_cleanly
    assert r.stats.error is not None
    assert "source lost" in r.stats.error
    # The restored process lost its memory: it must not pass its own check.
    assert await workload.verdict(after=at_dump, timeout=5) != "OK"
