"""The testbed's site CA for real: ``up`` issues the certificates, nodes authenticate each other
with them over an emulated data link, a reused testbed keeps them and ``down`` removes them.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from cryptography import x509

from fogmig.platform.security import Identity
from fogmig.platform.security.pki import certificate_identity, load_ca, load_certificate
from fogmig.platform.testbed import load_state
from fogmig.platform.testbed.pki import load_identity, node_identity, pki_dir
from fogmig.platform.testbed.state import TestbedState, exclusive_use, state_path

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(300),
]

FREE_WAIT = 120.0
PORT = 7443
SERVER = f"""
import asyncio
from fogmig.platform.security import check_peer, server_context, stream_tls
from fogmig.platform.testbed.pki import node_identity

async def main() -> None:
    done = asyncio.Event()

    async def handle(reader, writer):
        peer = check_peer(stream_tls(writer), {{"node"}})
        writer.write(f"{{peer}} {{stream_tls(writer).version()}}\\n".encode())
        await writer.drain()
        writer.close()
        done.set()

    ctx = server_context(node_identity("gw2"))
    server = await asyncio.start_server(handle, "{{ip}}", {PORT}, ssl=ctx)
    print("ready", flush=True)
    async with server:
        await asyncio.wait_for(done.wait(), 60)

asyncio.run(main())
"""
CLIENT = f"""
import asyncio
from fogmig.platform.security import Identity, client_context, open_connection
from fogmig.platform.testbed.pki import node_identity

async def main() -> None:
    ctx = client_context(node_identity("gw1"))
    reader, writer, peer = await open_connection(
        "{{ip}}", {PORT}, context=ctx, expected=Identity.node("gw2")
    )
    print(peer, (await reader.readline()).decode().strip(), flush=True)
    writer.close()

asyncio.run(main())
"""


def fogmig(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "fogmig.platform.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        check=False,
    )


def in_netns(state: TestbedState, node: str, script: str) -> list[str]:
    netns = state.node(node).netns
    return ["nsenter", f"--net=/var/run/netns/{netns}", sys.executable, "-P", "-c", script]


@pytest.fixture(scope="module")
def testbed() -> Iterator[TestbedState]:
    with exclusive_use(timeout=FREE_WAIT):
        # Someone who does not take the lease may still be using the testbed: wait a while
        # rather than tear theirs down.
        deadline = time.monotonic() + FREE_WAIT
        while state_path().exists():
            if time.monotonic() > deadline:
                pytest.skip("a testbed is up on this machine and stays in use elsewhere")
            time.sleep(1.0)
        fogmig("testbed", "down")  # leftovers of a crashed run
        done = fogmig("testbed", "up", "--profile", "lan", "--nodes", "2")
        assert done.returncode == 0, done.stderr + done.stdout
        try:
            yield load_state()
        finally:
            fogmig("testbed", "down")


def test_up_issues_the_identities(testbed: TestbedState) -> None:
    folder = pki_dir()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert os.stat(folder / "ca.key").st_mode & 0o777 == 0o600
    ca = load_ca(folder)
    principals = [Identity.node(n) for n in testbed.node_names]
    principals += [Identity.controller(), Identity.operator(), Identity.broker()]
    for identity in principals:
        files = load_identity(identity)
        assert files.key.stat().st_mode & 0o777 == 0o600
        cert = load_certificate(files.cert)
        assert certificate_identity(cert) == identity
        cert.verify_directly_issued_by(ca.cert)
    cert = load_certificate(node_identity("gw1").cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(testbed.node("gw1").data_ip)
    ]


def test_nodes_authenticate_over_a_data_link(testbed: TestbedState) -> None:
    ip = testbed.node("gw2").data_ip
    server = subprocess.Popen(
        in_netns(testbed, "gw2", SERVER.replace("{ip}", ip)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.run(
            in_netns(testbed, "gw1", CLIENT.replace("{ip}", ip)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        # The client saw gw2; the server saw gw1, over TLS 1.3.
        assert client.stdout.split() == ["fogmig:node:gw2", "fogmig:node:gw1", "TLSv1.3"]
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_reused_testbed_keeps_and_down_removes_them(testbed: TestbedState) -> None:
    ca_pem = (pki_dir() / "ca.pem").read_bytes()
    again = fogmig("testbed", "up", "--profile", "lan", "--nodes", "2")
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stdout
    assert (pki_dir() / "ca.pem").read_bytes() == ca_pem

    done = fogmig("testbed", "down")
    assert done.returncode == 0, done.stderr
    assert not pki_dir().exists()
    assert not state_path().exists()
