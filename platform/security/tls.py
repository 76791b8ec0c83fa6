"""TLS 1.3 with mutual authentication against the site CA, and checking who the peer is.

Both ends present a certificate of the site CA. Host names are not checked: addresses change
as the fog is reconfigured, the principal does not, so after the handshake each end checks the
peer's identity (the URI SAN) with :func:`check_peer`; :func:`open_connection` does it for a
client. In TLS 1.3 the server judges the client's certificate after the client has finished its
handshake, so a client that the server refuses learns it at its first read (an ``ssl.SSLError``
or the end of the stream), not in :func:`open_connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Collection, Mapping
from typing import Any

from fogmig.platform.base.errors import IdentityError, SecurityError
from fogmig.platform.security.identity import Identity, PrincipalKind
from fogmig.platform.security.pki import IdentityFiles

STREAM_LIMIT = 2**16


def _context(protocol: int, files: IdentityFiles) -> ssl.SSLContext:
    files.check()
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Refuse certificates that bend X.509's rules, as newer Pythons do by default.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
        ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise SecurityError(f"cannot load the key material of {files.identity}: {exc}") from exc
    return ctx


def server_context(files: IdentityFiles) -> ssl.SSLContext:
    """For a server that only accepts TLS 1.3 clients with a certificate of the site CA."""
    return _context(ssl.PROTOCOL_TLS_SERVER, files)


def client_context(files: IdentityFiles) -> ssl.SSLContext:
    """For a client that presents ``files``' certificate and requires one of the site CA.

    The host name is not checked (see the module's docstring): call :func:`check_peer`.
    """
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = False
    return ctx


def broker_client_context(files: IdentityFiles) -> ssl.SSLContext:
    """For a client of the site's MQTT broker: ``files``' certificate, the site CA's broker.

    Unlike the transfer channel the broker is checked by address (its certificate carries the
    address it listens on as an IP SAN), since the MQTT library cannot call
    :func:`check_peer`; the broker takes the client's common name as its user name.
    """
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = True
    return ctx


def identity_from_peercert(cert: Mapping[str, Any] | None) -> Identity:
    """The identity in a verified peer certificate as ``getpeercert()`` returns it.

    It must name exactly one fogmig URI, and its common name must be that principal's.
    """
    if not cert:
        raise IdentityError("the peer presented no verified certificate")
    uris = [value for key, value in cert.get("subjectAltName", ()) if key == "URI"]
    if len(uris) != 1:
        raise IdentityError(f"the peer's certificate names {len(uris)} URIs, not one identity")
    identity = Identity.parse(uris[0])
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if names != [identity.principal]:
        raise IdentityError(
            f"the peer's certificate for {identity} has common name {names}, "
            f"not [{identity.principal!r}]"
        )
    return identity


def peer_identity(conn: ssl.SSLObject | ssl.SSLSocket) -> Identity:
    """Who the peer of an established TLS connection is."""
    return identity_from_peercert(conn.getpeercert())


def check_peer(
    conn: ssl.SSLObject | ssl.SSLSocket, expected: Identity | Collection[PrincipalKind]
) -> Identity:
    """The peer's identity if it is ``expected`` (an identity, or any of some kinds).

    Raises IdentityError otherwise.
    """
    peer = peer_identity(conn)
    if isinstance(expected, Identity):
        if peer != expected:
            raise IdentityError(f"the peer is {peer}, not the expected {expected}")
    elif peer.kind not in expected:
        raise IdentityError(f"the peer is {peer}, not a {' or '.join(sorted(expected))}")
    return peer


def stream_tls(writer: asyncio.StreamWriter) -> ssl.SSLObject:
    """The TLS side of an asyncio stream; IdentityError when the stream is not TLS."""
    obj = writer.get_extra_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject):
        raise IdentityError("the connection is not protected by TLS")
    return obj


async def open_connection(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext,
    expected: Identity,
    limit: int = STREAM_LIMIT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Identity]:
    """Connect over TLS and make sure the server is ``expected``; closes the connection if not.

    A failed handshake (the server's certificate is not the site CA's, or it refuses us: a
    server drops a client it refuses during the handshake, often without an alert, so a reset
    counts) raises IdentityError; an unreachable address raises OSError as ``asyncio`` does.
    """
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=context, limit=limit)
    except (ssl.SSLError, ConnectionResetError) as exc:
        why = str(exc) or "the server reset the connection"
        raise IdentityError(f"TLS handshake with {host}:{port} failed: {why}") from exc
    try:
        peer = check_peer(stream_tls(writer), expected)
    except IdentityError:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise
    return reader, writer, peer
