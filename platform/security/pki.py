"""The site's certificate authority and the certificates it issues to principals.

One CA per site signs a certificate per principal (fog node, device, controller, broker) naming
it as a URI SAN and as the common name (see :mod:`identity`); a node's certificate also carries
its data address as an IP SAN. Keys are ECDSA P-256, written with mode 0600 from the start into
folders of mode 0700; a CA key that others can read is refused.

Layout of a folder of key material: ``ca.pem``, ``ca.key``, then ``<stem>.pem`` and
``<stem>.key`` per principal (stem ``node-gw1``, ``controller``; see ``Identity.file_stem``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fogmig.platform.base.errors import SecurityError
from fogmig.platform.security.identity import Identity

CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 365
# Clocks of the hosts may disagree a little; a certificate valid "from now" could be refused.
BACKDATE = dt.timedelta(minutes=5)
CA_NAME = "fogmig site CA"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"


@dataclass(frozen=True, kw_only=True)
class CertificateAuthority:
    """The site CA: its certificate and private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, kw_only=True)
class IssuedCertificate:
    """A principal's certificate and private key, as issued (not yet on disk)."""

    identity: Identity
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, kw_only=True)
class IdentityFiles:
    """Where a principal's certificate, key and the site CA's certificate are (PEM files)."""

    identity: Identity
    cert: Path
    key: Path
    ca: Path

    def check(self) -> IdentityFiles:
        """Raise SecurityError when one of the files is missing."""
        missing = [str(p) for p in (self.cert, self.key, self.ca) if not p.is_file()]
        if missing:
            raise SecurityError(f"key material of {self.identity} is missing: {', '.join(missing)}")
        return self


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(*, name: str = CA_NAME, valid_days: int = CA_VALID_DAYS) -> CertificateAuthority:
    """A new self-signed CA that may sign principals' certificates (and no other CA)."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def issue(
    ca: CertificateAuthority,
    identity: Identity,
    *,
    ip_addresses: Iterable[str] = (),
    valid_days: int = LEAF_VALID_DAYS,
) -> IssuedCertificate:
    """A certificate for ``identity``, good as TLS server and client, with its new key."""
    key = _new_key()
    try:
        ips = [ipaddress.ip_address(a) for a in ip_addresses]
    except ValueError as exc:
        raise SecurityError(f"bad address for the certificate of {identity}: {exc}") from None
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    san += [x509.IPAddress(ip) for ip in ips]
    now = _now()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.principal)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=valid_days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        # Critical: the subject (a bare name) is not what a peer must check; the URI is.
        .add_extension(x509.SubjectAlternativeName(san), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCertificate(identity=identity, cert=cert, key=key)


# --- files ------------------------------------------------------------------------------------


def _private_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically, with ``mode`` from the start (a key is never briefly readable)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have taken bits away; never adds any
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def save_ca(ca: CertificateAuthority, folder: Path) -> Path:
    """Write the CA into ``folder`` (made 0700); returns the CA certificate's path."""
    _private_folder(folder)
    _write(folder / CA_KEY_FILE, _key_pem(ca.key), 0o600)
    _write(folder / CA_CERT_FILE, _cert_pem(ca.cert), 0o644)
    return folder / CA_CERT_FILE


def load_ca(folder: Path) -> CertificateAuthority:
    """The CA kept in ``folder``; refuses a key that others can read or that does not match."""
    cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
    try:
        mode = key_path.stat().st_mode
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise SecurityError(f"no site CA in {folder}: {exc.filename} is missing") from None
    except ValueError as exc:
        raise SecurityError(f"unreadable site CA in {folder}: {exc}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise SecurityError(
            f"the CA key {key_path} can be read by others (mode {stat.S_IMODE(mode):o})",
            hint=f"chmod 600 {key_path}, and consider the CA compromised",
        )
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise SecurityError(f"the CA key {key_path} does not belong to {cert_path}")
    return CertificateAuthority(cert=cert, key=key)


def load_or_create_ca(folder: Path) -> CertificateAuthority:
    """The CA kept in ``folder``, made and saved there first if there is none."""
    if not (folder / CA_CERT_FILE).exists() and not (folder / CA_KEY_FILE).exists():
        ca = create_ca()
        save_ca(ca, folder)
        return ca
    return load_ca(folder)


def identity_files(folder: Path, identity: Identity) -> IdentityFiles:
    """Where :func:`save_identity` puts ``identity``'s files in ``folder`` (not checked)."""
    return IdentityFiles(
        identity=identity,
        cert=folder / f"{identity.file_stem}.pem",
        key=folder / f"{identity.file_stem}.key",
        ca=folder / CA_CERT_FILE,
    )


def save_identity(issued: IssuedCertificate, folder: Path) -> IdentityFiles:
    """Write a principal's certificate and key (0600) next to the CA certificate."""
    _private_folder(folder)
    files = identity_files(folder, issued.identity)
    _write(files.key, _key_pem(issued.key), 0o600)
    _write(files.cert, _cert_pem(issued.cert), 0o644)
    return files


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise SecurityError(f"no certificate at {path}") from None
    except ValueError as exc:
        raise SecurityError(f"unreadable certificate {path}: {exc}") from None


def certificate_identity(cert: x509.Certificate) -> Identity:
    """The identity a certificate names in its URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SecurityError("the certificate names no identity (no SAN)") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SecurityError(f"the certificate names {len(uris)} URIs, not one identity")
    return Identity.parse(uris[0])
