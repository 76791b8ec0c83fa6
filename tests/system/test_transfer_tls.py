"""The transfer channel between two agents of the testbed, attacked on the data link.

The agents of gw1 and gw2 run as always (mutual TLS 1.3 with the testbed's node certificates).
A client with gw1's certificate talks to gw2's agent through a relaying proxy in gw1's namespace
that flips or injects bytes in the middle of a file, or records everything it relays; a node
with a valid certificate of the testbed's CA that takes no part (gw9) tries to pass for gw1 and
to drive a migration whose source is gw1. Each client runs inside a node's namespace
(``transfer_peer.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fogmig.platform.agent.config import DEFAULT_TRANSFER_PORT
from fogmig.platform.agent.launcher import agents_dir
from fogmig.platform.base import paths
from fogmig.platform.base.vocabulary import Technique
from fogmig.platform.migration.handover.messages import (
    Abort,
    Commit,
    LazyStatus,
    Prepare,
    Request,
    encode_call,
)
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import identity_files, issue, load_ca, save_identity
from fogmig.platform.testbed.pki import node_identity, pki_dir
from fogmig.platform.testbed.state import TestbedState
from fogmig.platform.transfer.wire import FileAbort, encode_message
from fogmig.services.image import ensure_image, find_image

pytestmark = [pytest.mark.system, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

PEER = Path(__file__).with_name("transfer_peer.py")
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def testbed(lan_testbed: TestbedState) -> TestbedState:
    return lan_testbed


def node(state: TestbedState, name: str) -> Any:
    return next(n for n in state.nodes if n.name == name)


def endpoint(state: TestbedState, name: str) -> list[Any]:
    return [node(state, name).data_ip, DEFAULT_TRANSFER_PORT]


def run_peer(state: TestbedState, where: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``transfer_peer.py`` with ``spec`` inside node ``where``'s namespace."""
    netns = node(state, where).netns
    argv = ["nsenter", f"--net=/var/run/netns/{netns}", "--", sys.executable, "-P", str(PEER)]
    done = subprocess.run(
        [*argv, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def as_node(name: str, *, claim: str | None = None) -> dict[str, Any]:
    """A client spec with the testbed's certificate of node ``name``."""
    files = node_identity(name)
    return {
        "identity": files.identity.uri,
        "cert": str(files.cert),
        "key": str(files.key),
        "ca": str(files.ca),
        "claim": claim or name,
    }


@pytest.fixture
def outsider(testbed: TestbedState, tmp_path: Path) -> dict[str, Any]:
    """gw9: a valid node certificate of the testbed's CA, for a node that takes no part."""
    folder = tmp_path / "gw9"
    folder.mkdir(mode=0o700)
    shutil.copy(pki_dir() / "ca.pem", folder / "ca.pem")
    files = save_identity(issue(load_ca(pki_dir()), Identity.node("gw9")), folder)
    assert files == identity_files(folder, Identity.node("gw9"))
    return {
        "identity": files.identity.uri,
        "cert": str(files.cert),
        "key": str(files.key),
        "ca": str(files.ca),
        "claim": "gw9",
    }


def incoming(name: str, mid: str) -> Path:
    return paths.node_dir(name) / "incoming" / mid


def stored(name: str, mid: str) -> list[str]:
    root = incoming(name, mid)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class AgentLog:
    """What an agent logged since this object was made."""

    def __init__(self, name: str) -> None:
        self.path = agents_dir() / f"{name}.log"
        self.start = self.path.stat().st_size

    def new(self) -> str:
        with self.path.open("rb") as fh:
            fh.seek(self.start)
            return fh.read().decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while text not in (seen := self.new()):
            assert time.monotonic() < deadline, f"{text!r} not logged: {seen[-2000:]}"
            time.sleep(0.2)
        return seen


@pytest.fixture
def mid() -> Iterator[str]:
    name = f"tls-{uuid.uuid4().hex[:10]}"
    yield name
    shutil.rmtree(incoming("gw2", name), ignore_errors=True)


def image_dir(base: Path, size: int) -> Path:
    src = base / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(size))
    return src


@pytest.mark.parametrize(
    "alter",
    [
        {"alter": "flip"},
        # A forged FILE_ABORT in the channel's own framing: protocol 1 took such a frame.
        {"alter": "inject", "inject": encode_message(FileAbort(seq=0, reason="forged")).hex()},
    ],
    ids=["flipped-byte", "injected-frame"],
)
def test_data_altered_between_the_agents_fails_the_transfer_and_stores_nothing(
    testbed: TestbedState, tmp_path: Path, mid: str, alter: dict[str, Any]
) -> None:
    src = image_dir(tmp_path, 24 * MiB)
    log = AgentLog("gw2")
    proxy = {"listen": node(testbed, "gw1").data_ip, "at": 8 * MiB, **alter}
    result = run_peer(
        testbed,
        "gw1",
        {
            **as_node("gw1"),
            "peer": "gw2",
            "target": endpoint(testbed, "gw2"),
            "proxy": proxy,
            "actions": [{"op": "send", "mid": mid, "src": str(src)}],
        },
    )
    assert result["connected"], result
    assert result["altered"], result
    [sent] = result["results"]
    assert sent["ok"] is False, result
    assert "PeerError" in sent["kinds"], sent
    # The destination's agent names the cause: TLS refused the altered record.
    seen = log.wait_for("nothing of it was used")
    line = next(line for line in seen.splitlines() if "nothing of it was used" in line)
    print(f"{alter['alter']}: sender: {sent['error']}: {sent['message']}\ngw2: {line}")
    if alter["alter"] == "flip":
        assert "bad record MAC" in line
    deadline = time.monotonic() + 10
    while stored("gw2", mid):
        assert time.monotonic() < deadline, stored("gw2", mid)
        time.sleep(0.2)
    assert not (incoming("gw2", mid) / "pages-1.img").exists()


def test_a_node_that_is_not_the_wanted_peer_is_refused(testbed: TestbedState) -> None:
    # gw2 wants gw3, but the address it has leads to a node with a valid certificate: gw1.
    result = run_peer(
        testbed,
        "gw2",
        {**as_node("gw2"), "peer": "gw3", "target": endpoint(testbed, "gw1"), "actions": []},
    )
    assert result["connected"] is False
    assert result["error"]["error"] == "AuthError", result
    assert "is fogmig:node:gw1, not the expected fogmig:node:gw3" in result["error"]["message"]
    assert result["error"]["hint"]


def test_a_certificate_cannot_speak_for_another_node(
    testbed: TestbedState, outsider: dict[str, Any]
) -> None:
    log = AgentLog("gw2")
    result = run_peer(
        testbed,
        "gw1",
        {
            **outsider,
            "claim": "gw1",
            "peer": "gw2",
            "target": endpoint(testbed, "gw2"),
            "actions": [],
        },
    )
    assert result["connected"] is False
    assert result["error"]["error"] == "AuthError", result
    assert "claims to be gw1 but its certificate names gw9" in result["error"]["message"]
    log.wait_for("claims to be gw1 but its certificate names gw9")


@pytest.fixture(scope="module")
def image() -> Path:
    """The service image: the destination makes a bundle from it at ``prepare``."""
    found = find_image()
    return found if found is not None else asyncio.run(ensure_image())


def test_only_the_source_of_a_migration_may_call_its_operations(
    testbed: TestbedState, outsider: dict[str, Any], mid: str, image: Path
) -> None:
    service = f"fmtls-{uuid.uuid4().hex[:6]}"
    epoch = 1

    def call(request: Request) -> dict[str, Any]:
        name, params = encode_call(request)
        return {"op": "call", "name": name, "params": params}

    prepare = call(
        Prepare(
            migration_id=mid,
            service=service,
            epoch=epoch,
            source="gw1",
            technique=Technique.COLD,
            args=["/bin/sleep", "60"],
        )
    )
    source = {**as_node("gw1"), "peer": "gw2", "target": endpoint(testbed, "gw2")}
    prepared = run_peer(testbed, "gw1", {**source, "actions": [prepare]})
    assert prepared["results"][0]["ok"], prepared
    assert prepared["results"][0]["result"]["kind"] == "ok", prepared
    try:
        ops = [
            call(LazyStatus(migration_id=mid)),
            call(Commit(migration_id=mid, epoch=epoch)),
            call(Abort(migration_id=mid, epoch=epoch, reason="an outsider")),
        ]
        intruder = run_peer(
            testbed,
            "gw1",
            {**outsider, "peer": "gw2", "target": endpoint(testbed, "gw2"), "actions": ops},
        )
        assert intruder["connected"], intruder
        for answer in intruder["results"]:
            # The destination refuses: the migration is gw1's, and gw9's certificate says gw9.
            assert answer["ok"], answer
            assert answer["result"]["kind"] == "refused", answer
            assert answer["result"]["state"] == "invalid", answer
            assert f"{mid} is not gw9's" in answer["result"]["detail"], answer
    finally:
        aborted = run_peer(
            testbed,
            "gw1",
            {**source, "actions": [call(Abort(migration_id=mid, epoch=epoch, reason="done"))]},
        )
    result = aborted["results"][0]
    assert result["ok"], aborted
    assert result["result"]["outcome"] == "aborted", aborted


def test_a_marker_written_into_a_file_never_crosses_the_link_in_clear(
    testbed: TestbedState, tmp_path: Path, mid: str
) -> None:
    marker = f"FOGMIG-MARKER-{uuid.uuid4().hex}".encode()
    src = tmp_path / "src"
    src.mkdir()
    payload = (marker + b"\n") * 20_000 + os.urandom(MiB)
    (src / "pages-1.img").write_bytes(payload)
    capture = tmp_path / "capture.bin"
    spec = {
        **as_node("gw1"),
        "peer": "gw2",
        "target": endpoint(testbed, "gw2"),
        "proxy": {"listen": node(testbed, "gw1").data_ip, "capture": str(capture)},
        "actions": [{"op": "send", "mid": mid, "src": str(src)}],
    }
    result = run_peer(testbed, "gw1", spec)
    assert result["results"] == [{"ok": True, "bytes": len(payload)}], result
    assert (incoming("gw2", mid) / "pages-1.img").read_bytes() == payload
    seen = capture.read_bytes()
    assert len(seen) >= len(payload)  # the whole file went through the capture
    assert marker not in seen
    assert marker[:16] not in seen
    # The control: the same capture of the benchmarks' plaintext mode shows the marker.
    plain_root = tmp_path / "plain"
    plain_root.mkdir()
    control = run_peer(
        testbed,
        "gw1",
        {
            **spec,
            "plaintext": True,
            "plain_server": str(plain_root),
            "proxy": {"listen": "127.0.0.1", "capture": str(tmp_path / "plain.bin")},
        },
    )
    assert control["results"] == [{"ok": True, "bytes": len(payload)}], control
    assert marker in (tmp_path / "plain.bin").read_bytes()
