"""What this node's kernel, CRIU and runc can do, probed by trying.

The migration engine and the policies consult these: post-copy needs userfaultfd
(``uffd-noncoop``), native pre-dump needs soft-dirty tracking (``mem_dirty_track``); without it
pre-copy and hybrid use the page-delta path. The agent publishes them in its status.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

MIN_CRIU = (4, 2)


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def parse_version(text: str) -> tuple[int, ...] | None:
    """Parse the first dotted version number in ``text`` (``Version: 4.2.1`` -> (4, 2, 1))."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


@dataclass(frozen=True, slots=True)
class CriuCapabilities:
    """CRIU's presence, version and the features the techniques depend on."""

    path: str | None
    version: str | None
    check_ok: bool
    check_message: str
    uffd_noncoop: bool
    mem_dirty_track: bool

    @property
    def version_ok(self) -> bool:
        v = parse_version(self.version or "")
        return v is not None and v[:2] >= MIN_CRIU

    @property
    def postcopy(self) -> bool:
        """Lazy (post-copy) restore works: userfaultfd is usable."""
        return self.check_ok and self.version_ok and self.uffd_noncoop

    @property
    def native_predump(self) -> bool:
        """CRIU's own pre-dump (soft-dirty) works; otherwise pre-copy uses page deltas."""
        return self.check_ok and self.version_ok and self.mem_dirty_track

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["postcopy"] = self.postcopy
        d["native_predump"] = self.native_predump
        return d


def _feature(criu: str, name: str) -> bool:
    return _run([criu, "check", "--feature", name]).returncode == 0


@cache
def criu_capabilities() -> CriuCapabilities:
    """Probe CRIU once per process (each probe is a few ``criu check`` runs)."""
    criu = shutil.which("criu")
    if criu is None:
        return CriuCapabilities(None, None, False, "criu not found on PATH", False, False)
    version_out = _run([criu, "--version"])
    m = re.search(r"Version:\s*(\S+)", version_out.stdout)
    version = m.group(1) if m else None
    check = _run([criu, "check"])
    lines = (check.stdout + check.stderr).strip().splitlines()
    errors = [ln for ln in lines if "Error" in ln]
    message = (errors[-1] if errors else lines[-1]) if lines else ""
    return CriuCapabilities(
        path=criu,
        version=version,
        check_ok=check.returncode == 0,
        check_message=message,
        uffd_noncoop=_feature(criu, "uffd-noncoop"),
        mem_dirty_track=_feature(criu, "mem_dirty_track"),
    )


@cache
def runc_version() -> str | None:
    runc = shutil.which("runc")
    if runc is None:
        return None
    out = _run([runc, "--version"]).stdout
    m = re.search(r"runc version\s+(\S+)", out)
    return m.group(1) if m else None


@cache
def has_netem() -> bool:
    """Whether tc can attach a netem qdisc, tried on loopback in a throwaway namespace."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    ns = f"fmprobe-{uuid.uuid4().hex[:8]}"
    if _run(["ip", "netns", "add", ns]).returncode != 0:
        return False
    try:
        nsenter = ["nsenter", f"--net=/var/run/netns/{ns}", "--"]
        _run([*nsenter, "ip", "link", "set", "lo", "up"])
        r = _run([*nsenter, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        return r.returncode == 0
    finally:
        _run(["ip", "netns", "del", ns])


def pipe_sysctls() -> dict[str, int]:
    """The two pipe limits the lazy page server needs raised (docs/platform.md)."""
    out: dict[str, int] = {}
    for name in ("pipe-max-size", "pipe-user-pages-soft"):
        out[name] = int(Path(f"/proc/sys/fs/{name}").read_text().strip())
    return out


def pipe_sysctls_ok() -> bool:
    s = pipe_sysctls()
    return s["pipe-max-size"] >= 8388608 and s["pipe-user-pages-soft"] == 0


def writable_tmp() -> bool:
    try:
        with tempfile.TemporaryFile():
            return True
    except OSError:
        return False
