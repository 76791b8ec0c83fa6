"""Transfer channel between two network namespaces over a real, shaped veth link.

Each side is its own process inside its own namespace, as two agents would be, each with its
certificate of a CA made for the test (mutual TLS 1.3, as between agents). Checked with
real kernel parts: a rate-limited link (tbf), a real tiny tmpfs that fills up, and a link that
goes down in the middle of a transfer (both sides must notice within their idle timeouts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import create_ca, issue, save_ca, save_identity

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, tc and tmpfs need root"),
]

A_IP = "10.232.0.1"
B_IP = "10.232.0.2"

# One script, two roles: "serve" (destination agent) and "send" (source agent).
DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path
    from fogmig.platform.base.errors import ConfigError
    from fogmig.platform.security.identity import Identity
    from fogmig.platform.security.pki import identity_files
    from fogmig.platform.transfer.client import TransferClient
    from fogmig.platform.transfer.server import TransferServer

    PKI = Path(sys.argv[2])

    class Handler:
        async def on_call(self, session, op, params):
            if op == "sleep":
                await asyncio.sleep(params["seconds"])
                return {}
            raise ConfigError(f"no op {op}")

    async def serve(root, host, idle):
        me = identity_files(PKI, Identity.node("fmtxb"))
        async with TransferServer(host=host, port=0, security=me,
                                  root=Path(root), handler=Handler(), idle_timeout=idle) as srv:
            print(json.dumps({"port": srv.port}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    async def send(host, port, src, idle):
        start = time.monotonic()
        try:
            me = identity_files(PKI, Identity.node("fmtxa"))
            async with TransferClient.connect(host, port, security=me,
                                              peer="fmtxb", idle_timeout=idle) as ch:
                rtt = await ch.ping()
                print(json.dumps({"connected": True}), flush=True)
                stats = await ch.send_dir("fmtx-m1", Path(src))
                out = {"ok": True, "bytes": stats.bytes, "files": stats.files,
                       "seconds": stats.seconds, "rtt": rtt}
        except Exception as exc:
            out = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                   "hint": getattr(exc, "hint", None)}
        out["elapsed"] = time.monotonic() - start
        print(json.dumps(out), flush=True)

    role = sys.argv[1]
    if role == "serve":
        asyncio.run(serve(sys.argv[3], sys.argv[4], float(sys.argv[5])))
    else:
        asyncio.run(send(sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6])))
    """
)


def sh(*argv: str, netns: str | None = None, check: bool = True) -> str:
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}", "--"] if netns else []
    done = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr}")
    return done.stdout


@dataclass
class Link:
    a: str
    b: str
    veth_a: str
    veth_b: str


@pytest.fixture
def link() -> Iterator[Link]:
    tag = uuid.uuid4().hex[:6]
    net = Link(a=f"fmtx-a{tag}", b=f"fmtx-b{tag}", veth_a=f"fmtxa{tag}", veth_b=f"fmtxb{tag}")
    try:
        sh("ip", "netns", "add", net.a)
        sh("ip", "netns", "add", net.b)
        sh("ip", "link", "add", net.veth_a, "type", "veth", "peer", "name", net.veth_b)
        sh("ip", "link", "set", net.veth_a, "netns", net.a)
        sh("ip", "link", "set", net.veth_b, "netns", net.b)
        for ns, dev, ip in ((net.a, net.veth_a, A_IP), (net.b, net.veth_b, B_IP)):
            sh("ip", "addr", "add", f"{ip}/30", "dev", dev, netns=ns)
            sh("ip", "link", "set", dev, "up", netns=ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
            # 40 Mbit/s each way: slow enough that a transfer can be cut in the middle.
            sh(
                "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", "40mbit", "burst", "64kb", "latency", "200ms",
                netns=ns,
            )  # fmt: skip
        yield net
    finally:
        sh("ip", "netns", "del", net.a, check=False)
        sh("ip", "netns", "del", net.b, check=False)


class Side:
    """One agent process inside a namespace, talking JSON lines on stdout."""

    def __init__(self, netns: str, driver: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONSAFEPATH": "1"}
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{netns}", "--", sys.executable, str(driver), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        assert raw, f"process ended: {self.proc.stderr.read() if self.proc.stderr else ''}"
        result: dict[str, Any] = json.loads(raw)
        return result

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # a server ends cleanly at end of input
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def pki(tmp_path: Path) -> str:
    """A CA of the test and both ends' node certificates."""
    folder = tmp_path / "pki"
    ca = create_ca()
    save_ca(ca, folder)
    for node in ("fmtxa", "fmtxb"):
        save_identity(issue(ca, Identity.node(node)), folder)
    return str(folder)


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "fmtx-tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", str(mnt), check=False)


def files_below(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def make_source(base: Path, big_mb: int) -> Path:
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    (src / "pages-1.img").write_bytes(os.urandom(big_mb * 1024 * 1024))
    (src / "sub" / "core-1.img").write_bytes(os.urandom(20_000))
    (src / "inventory.img").write_bytes(b"inventory")
    return src


def test_transfer_between_namespaces_over_a_shaped_link(
    link: Link, driver: Path, tmp_path: Path, pki: str
) -> None:
    root = tmp_path / "recv"
    root.mkdir()
    src = make_source(tmp_path, 4)
    server = Side(link.b, driver, "serve", pki, str(root), B_IP, "5")
    try:
        port = server.line()["port"]
        sender = Side(link.a, driver, "send", pki, B_IP, str(port), str(src), "5")
        try:
            assert sender.line() == {"connected": True}
            result = sender.line()
        finally:
            sender.stop()
    finally:
        server.stop()
    assert result["ok"], result
    assert files_below(root / "fmtx-m1") == files_below(src)
    mbit = result["bytes"] * 8 / result["seconds"] / 1e6
    print(f"shaped link: {mbit:.1f} Mbit/s, ping {result['rtt'] * 1000:.2f} ms")
    # The link, not the channel, sets the pace.
    assert 20 < mbit < 44, mbit


def test_disk_full_on_a_real_tmpfs(
    link: Link, driver: Path, tmp_path: Path, small_tmpfs: Path, pki: str
) -> None:
    src = make_source(tmp_path, 3)
    server = Side(link.b, driver, "serve", pki, str(small_tmpfs), B_IP, "5")
    try:
        port = server.line()["port"]
        sender = Side(link.a, driver, "send", pki, B_IP, str(port), str(src), "5")
        try:
            sender.line()
            result = sender.line()
        finally:
            sender.stop()
        assert result["ok"] is False
        assert result["error"] == "NoSpaceError", result
        assert "pages-1.img" in result["message"]
        assert result["hint"]
        # Nothing partial is left; what was stored whole is intact.
        for name, data in files_below(small_tmpfs).items():
            assert not name.endswith(".fmtx-part"), name
            assert data == (src / Path(name).relative_to("fmtx-m1")).read_bytes()
        # The destination still serves the next sender.
        (src / "pages-1.img").unlink()
        sender = Side(link.a, driver, "send", pki, B_IP, str(port), str(src), "5")
        try:
            sender.line()
            assert sender.line()["ok"]
        finally:
            sender.stop()
    finally:
        server.stop()


def test_link_down_mid_transfer_fails_both_sides_in_time(
    link: Link, driver: Path, tmp_path: Path, pki: str
) -> None:
    root = tmp_path / "recv"
    root.mkdir()
    src = make_source(tmp_path, 40)  # about 8 s at 40 Mbit/s
    idle = 2.0
    server = Side(link.b, driver, "serve", pki, str(root), B_IP, str(idle))
    try:
        port = server.line()["port"]
        sender = Side(link.a, driver, "send", pki, B_IP, str(port), str(src), str(idle))
        try:
            sender.line()
            under_way = time.monotonic() + 5
            while not any(p.name.endswith(".fmtx-part") for p in root.rglob("*")):
                assert time.monotonic() < under_way, "the transfer did not start"
                time.sleep(0.05)
            time.sleep(0.5)
            # Cut the link: packets vanish, nobody closes anything.
            sh("ip", "link", "set", link.veth_b, "down", netns=link.b)
            cut = time.monotonic()
            result = sender.line()
            sender_noticed = time.monotonic() - cut
        finally:
            sender.stop()
        deadline = time.monotonic() + 3 * idle + 5
        while any(p.name.endswith(".fmtx-part") for p in root.rglob("*")):
            assert time.monotonic() < deadline, "the receiver kept the partial file"
            time.sleep(0.1)
        receiver_noticed = time.monotonic() - cut
    finally:
        server.stop()
    print(
        f"link cut: sender failed after {sender_noticed:.2f} s, receiver cleaned up after "
        f"{receiver_noticed:.2f} s (idle timeout {idle} s): {result['message']}"
    )
    assert result["ok"] is False
    assert result["error"] == "PeerError", result
    assert "fmtxb" in result["message"]
    assert sender_noticed < 3 * idle, sender_noticed
    assert receiver_noticed < 3 * idle + 5, receiver_noticed
    assert not (root / "fmtx-m1" / "pages-1.img").exists()
