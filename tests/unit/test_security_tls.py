"""Real TLS 1.3 handshakes over loopback between principals of a site CA made in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fogmig.platform.base.errors import IdentityError, SecurityError
from fogmig.platform.security import (
    Identity,
    IdentityFiles,
    PrincipalKind,
    check_peer,
    client_context,
    open_connection,
    server_context,
    stream_tls,
)
from fogmig.platform.security.pki import create_ca, issue, save_ca, save_identity
from fogmig.platform.security.tls import identity_from_peercert

GW1, GW2, CONTROLLER = Identity.node("gw1"), Identity.node("gw2"), Identity.controller()
IO_TIMEOUT = 10.0


@dataclass
class Site:
    files: dict[Identity, IdentityFiles]
    stranger: IdentityFiles
    """gw1 as issued by another CA."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca()
    save_ca(ca, root / "site")
    files = {
        i: save_identity(issue(ca, i, ip_addresses=["127.0.0.1"]), root / "site")
        for i in (GW1, GW2, CONTROLLER)
    }
    other = create_ca()
    save_ca(other, root / "other")
    stranger = save_identity(issue(other, GW1), root / "other")
    return Site(files=files, stranger=stranger)


@dataclass
class Server:
    port: int
    accepted: list[Identity] = field(default_factory=list)
    refused: list[IdentityError] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve(
    files: IdentityFiles, expected: Identity | Collection[PrincipalKind]
) -> AsyncIterator[Server]:
    """An echo server on loopback that serves only peers that are ``expected``."""
    holder: list[Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = check_peer(stream_tls(writer), expected)
        except IdentityError as exc:
            holder[0].refused.append(exc)
        else:
            holder[0].accepted.append(peer)
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                writer.write(await reader.readline())
                await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(files))
    holder.append(Server(port=server.sockets[0].getsockname()[1]))
    try:
        yield holder[0]
    finally:
        server.close()
        await server.wait_closed()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def echo_refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the server refuses to echo: an error or the end of the stream at first read."""
    try:
        writer.write(b"hello\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        await close(writer)
    return line == b""


def bare_client_context(ca: Path) -> ssl.SSLContext:
    """A TLS 1.3 client that trusts the site CA but has no certificate of its own."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


async def test_mutual_authentication(site: Site) -> None:
    async with serve(site.files[GW2], {"node"}) as server:
        ctx = client_context(site.files[GW1])
        reader, writer, peer = await open_connection(
            "127.0.0.1", server.port, context=ctx, expected=GW2
        )
        assert peer == GW2
        assert stream_tls(writer).version() == "TLSv1.3"
        writer.write(b"hello\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), IO_TIMEOUT) == b"hello\n"
        await close(writer)
    assert server.accepted == [GW1]
    assert server.refused == []


async def test_client_without_certificate_is_refused(site: Site) -> None:
    async with serve(site.files[GW2], {"node"}) as server:
        ctx = bare_client_context(site.files[GW1].ca)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
        assert await echo_refused(reader, writer)
    assert server.accepted == []
    assert server.refused == []  # refused by TLS itself


async def test_client_of_another_ca_is_refused(site: Site) -> None:
    ctx = client_context(site.stranger)
    ctx.load_verify_locations(cafile=str(site.files[GW1].ca))  # it would trust the server
    async with serve(site.files[GW2], {"node"}) as server:
        reader, writer, _ = await open_connection(
            "127.0.0.1", server.port, context=ctx, expected=GW2
        )
        assert await echo_refused(reader, writer)
    assert server.accepted == []
    assert server.refused == []  # refused by TLS itself


async def test_server_of_another_ca_is_refused(site: Site) -> None:
    async with serve(site.stranger, {"node"}) as server:
        with pytest.raises(IdentityError, match="TLS handshake"):
            await open_connection(
                "127.0.0.1",
                server.port,
                context=client_context(site.files[GW2]),
                expected=GW1,
            )
    assert server.accepted == []


async def test_unexpected_server_is_refused(site: Site) -> None:
    async with serve(site.files[GW2], {"node"}) as server:
        with pytest.raises(IdentityError, match="peer is fogmig:node:gw2, not the expected"):
            await open_connection(
                "127.0.0.1",
                server.port,
                context=client_context(site.files[CONTROLLER]),
                expected=GW1,
            )


@pytest.mark.parametrize("expected", [CONTROLLER, {"controller"}])
async def test_unexpected_client_is_refused(
    site: Site, expected: Identity | Collection[PrincipalKind]
) -> None:
    async with serve(site.files[GW2], expected) as server:
        reader, writer, _ = await open_connection(
            "127.0.0.1", server.port, context=client_context(site.files[GW1]), expected=GW2
        )
        assert await echo_refused(reader, writer)
    assert server.accepted == []
    assert len(server.refused) == 1
    assert "fogmig:node:gw1" in str(server.refused[0])


async def test_tls12_client_is_refused(site: Site) -> None:
    ctx = client_context(site.files[GW1])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serve(site.files[GW2], {"node"}) as server:
        with pytest.raises(IdentityError, match="TLS handshake"):
            await open_connection("127.0.0.1", server.port, context=ctx, expected=GW2)
    assert server.accepted == []


def test_contexts_require_tls13_and_a_peer_certificate(site: Site) -> None:
    for ctx in (server_context(site.files[GW1]), client_context(site.files[GW1])):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED


def test_context_with_missing_files(tmp_path: Path) -> None:
    files = IdentityFiles(
        identity=GW1, cert=tmp_path / "a.pem", key=tmp_path / "a.key", ca=tmp_path / "ca.pem"
    )
    with pytest.raises(SecurityError, match="missing"):
        server_context(files)


@pytest.mark.parametrize(
    ("cert", "message"),
    [
        ({}, "no verified certificate"),
        (None, "no verified certificate"),
        ({"subject": ((("commonName", "gw1"),),)}, "0 URIs"),
        (
            {
                "subject": ((("commonName", "gw1"),),),
                "subjectAltName": (("URI", "fogmig:node:gw1"), ("URI", "fogmig:controller")),
            },
            "2 URIs",
        ),
        (
            {
                "subject": ((("commonName", "gw2"),),),
                "subjectAltName": (("URI", "fogmig:node:gw1"),),
            },
            "common name",
        ),
        (
            {
                "subject": ((("commonName", "gw1"),),),
                "subjectAltName": (("URI", "https://gw1"),),
            },
            "not a fogmig identity",
        ),
    ],
)
def test_identity_from_peercert_refuses(cert: dict[str, object] | None, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        identity_from_peercert(cert)


def test_identity_from_peercert() -> None:
    cert = {
        "subject": ((("commonName", "gw1"),),),
        "subjectAltName": (("URI", "fogmig:node:gw1"), ("IP Address", "10.79.0.1")),
    }
    assert identity_from_peercert(cert) == GW1
