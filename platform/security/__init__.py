"""Identities of the platform's principals: the site CA, their certificates, mutual TLS 1.3.

What other components use: :class:`Identity`, :class:`IdentityFiles` (where a principal's
certificate, key and the CA certificate are), :func:`server_context`, :func:`client_context`,
:func:`check_peer` and :func:`open_connection`.
"""

from fogmig.platform.security.identity import Identity, PrincipalKind
from fogmig.platform.security.pki import IdentityFiles
from fogmig.platform.security.tls import (
    broker_client_context,
    check_peer,
    client_context,
    open_connection,
    peer_identity,
    server_context,
    stream_tls,
)

__all__ = [
    "Identity",
    "IdentityFiles",
    "PrincipalKind",
    "broker_client_context",
    "check_peer",
    "client_context",
    "open_connection",
    "peer_identity",
    "server_context",
    "stream_tls",
]
