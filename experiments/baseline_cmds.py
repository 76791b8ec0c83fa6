"""The runc and CRIU command lines of the paper's toolchain, one per step of a technique.

Cold: checkpoint, rsync, restore. Pre-copy: a ``--pre-dump`` checkpoint, rsync, a final
checkpoint with ``--parent-path``, rsync, restore. Post-copy: a lazy checkpoint whose page
server stays up, rsync, ``criu lazy-pages`` and a lazy restore at the destination. Hybrid:
pre-copy's pre-dump, then post-copy with the pre-dump as parent. Pure functions; the
directories they name are laid out by :class:`ImageLayout`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fogmig.platform.base.vocabulary import PAGE_SIZE, Technique

PRE_DUMP_DIR: Final = "pre"
FINAL_DIR: Final = "final"
PARENT_LINK: Final = f"../{PRE_DUMP_DIR}"
"""``--parent-path`` is relative to the image directory of the final dump."""
LAZY_LOG: Final = "lazy-pages.log"
DIRTY_TRACK_CHECK: Final = ("criu", "check", "--feature", "mem_dirty_track")
"""What a pre-dump needs from the kernel: soft-dirty memory tracking."""
_UFFD_PAGES = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")

PRE_DUMP_TECHNIQUES: Final = frozenset({Technique.PRECOPY, Technique.HYBRID})
LAZY_TECHNIQUES: Final = frozenset({Technique.POSTCOPY, Technique.HYBRID})


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Where one side keeps its images and CRIU work directories during one migration."""

    root: Path

    @property
    def pre_dump(self) -> Path:
        return self.root / "images" / PRE_DUMP_DIR

    @property
    def final(self) -> Path:
        return self.root / "images" / FINAL_DIR

    @property
    def images(self) -> Path:
        return self.root / "images"

    def work(self, step: str) -> Path:
        return self.root / f"work-{step}"


def runc_base(runc_root: Path, criu: str = "criu") -> list[str]:
    return ["runc", "--root", str(runc_root), "--criu", criu]


def checkpoint_argv(
    runc_root: Path,
    cid: str,
    *,
    image_dir: Path,
    work_dir: Path,
    pre_dump: bool = False,
    parent: str | None = None,
    page_server: tuple[str, int] | None = None,
    status_fd: int | None = None,
    criu: str = "criu",
) -> list[str]:
    """``runc checkpoint``: a pre-dump, a final dump (with ``parent``) or a lazy dump
    (``page_server``: the address and port the source's page server listens on)."""
    argv = [*runc_base(runc_root, criu), "checkpoint"]
    argv += ["--image-path", str(image_dir), "--work-path", str(work_dir)]
    if pre_dump:
        argv.append("--pre-dump")
    if parent is not None:
        argv += ["--parent-path", parent]
    if page_server is not None:
        host, port = page_server
        argv += ["--lazy-pages", "--page-server", f"{host}:{port}"]
        if status_fd is not None:
            argv += ["--status-fd", str(status_fd)]
    return [*argv, cid]


def restore_argv(
    runc_root: Path,
    cid: str,
    *,
    bundle: Path,
    image_dir: Path,
    work_dir: Path,
    lazy: bool = False,
    criu: str = "criu",
) -> list[str]:
    argv = [*runc_base(runc_root, criu), "restore", "--detach"]
    argv += ["--image-path", str(image_dir), "--work-path", str(work_dir)]
    argv += ["--bundle", str(bundle)]
    if lazy:
        argv.append("--lazy-pages")
    return [*argv, cid]


def lazy_pages_argv(
    *, address: str, port: int, image_dir: Path, work_dir: Path, criu: str = "criu"
) -> list[str]:
    """The destination's ``criu lazy-pages``: it fetches faulted pages from the source's page
    server and serves the lazy restore through a socket in ``work_dir`` (which the restore
    must share). -v4: the per-task page summary is a debug line."""
    return [
        *(criu, "lazy-pages", "--page-server", "--address", address, "--port", str(port)),
        *("--images-dir", str(image_dir), "--work-dir", str(work_dir)),
        *("-v4", "--log-file", LAZY_LOG),
    ]


def uffd_pages(log_text: str) -> tuple[int, int]:
    """(pages transferred, pages expected) summed over every task of a lazy-pages log."""
    got = expected = 0
    for m in _UFFD_PAGES.finditer(log_text):
        got += int(m.group(1))
        expected += int(m.group(2))
    return got, expected


def uffd_bytes(log_text: str) -> int:
    return uffd_pages(log_text)[0] * PAGE_SIZE
