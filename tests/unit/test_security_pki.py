"""Identities, the site CA, issued certificates and the testbed's key material (no root)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fogmig.platform.base.errors import IdentityError, SecurityError, TestbedError
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    certificate_identity,
    create_ca,
    issue,
    load_ca,
    load_certificate,
    load_or_create_ca,
    save_ca,
    save_identity,
)
from fogmig.platform.testbed import pki as testbed_pki
from fogmig.platform.testbed import topology
from fogmig.platform.testbed.profiles import load_profile

# --- identities -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "identity"),
    [
        ("fogmig:node:gw1", Identity.node("gw1")),
        ("fogmig:device:d1", Identity.device("d1")),
        ("fogmig:controller", Identity.controller()),
        ("fogmig:operator", Identity.operator()),
        ("fogmig:broker", Identity.broker()),
    ],
)
def test_identity_uri_round_trip(uri: str, identity: Identity) -> None:
    assert Identity.parse(uri) == identity
    assert identity.uri == uri
    assert str(identity) == uri


def test_identity_principal_and_file_stem() -> None:
    assert Identity.node("gw1").principal == "gw1"
    assert Identity.controller().principal == "controller"
    assert Identity.operator().principal == "operator"
    assert Identity.node("gw1").file_stem == "node-gw1"
    assert Identity.broker().file_stem == "broker"
    assert Identity.node("gw1") != Identity.device("gw1")


@pytest.mark.parametrize(
    "uri",
    [
        "fogmig:node:GW1",  # the node-name rule: lowercase
        "fogmig:node:1gw",
        "fogmig:node:gateway-one",
        "fogmig:node:abcdefghijk",  # 11 characters
        "fogmig:node",
        "fogmig:node:",
        "fogmig:node:gw1:x",
        "fogmig:controller:c1",
        "fogmig:agent:gw1",
        "spiffe://site/node/gw1",
        "fogmig:node:controller",  # would share the controller's common name
        "",
    ],
)
def test_identity_parse_refuses(uri: str) -> None:
    with pytest.raises(IdentityError):
        Identity.parse(uri)


def test_identity_constructor_validates() -> None:
    with pytest.raises(IdentityError, match="invalid node name"):
        Identity.node("Gw1")
    with pytest.raises(IdentityError, match="has no name"):
        Identity(kind="broker", name="b1")


# --- CA and certificates ----------------------------------------------------------------------


def test_issued_certificate_names_the_principal() -> None:
    ca = create_ca()
    issued = issue(ca, Identity.node("gw1"), ip_addresses=["10.79.0.1"])
    cert = issued.cert
    assert isinstance(issued.key, ec.EllipticCurvePrivateKey)
    assert issued.key.curve.name == "secp256r1"
    assert cert.issuer == ca.cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["fogmig:node:gw1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.79.0.1")]
    assert certificate_identity(cert) == Identity.node("gw1")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(ca.cert)
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now < dt.timedelta(days=366)
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_serials_are_random_and_keys_fresh() -> None:
    ca = create_ca()
    a = issue(ca, Identity.controller())
    b = issue(ca, Identity.controller())
    assert a.cert.serial_number != b.cert.serial_number
    assert a.cert.serial_number.bit_length() > 64
    assert a.key.public_key() != b.key.public_key()
    assert ca.cert.serial_number not in {a.cert.serial_number, b.cert.serial_number}


def test_bad_address_is_refused() -> None:
    with pytest.raises(SecurityError, match="bad address"):
        issue(create_ca(), Identity.node("gw1"), ip_addresses=["gw1.local"])


def test_key_files_are_0600_in_a_0700_folder(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    old = os.umask(0)  # the modes must not depend on a permissive umask
    try:
        ca = create_ca()
        save_ca(ca, folder)
        files = save_identity(issue(ca, Identity.node("gw1")), folder)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert files.ca == folder / CA_CERT_FILE
    assert certificate_identity(load_certificate(files.cert)) == Identity.node("gw1")
    assert sorted(p.name for p in folder.iterdir()) == [
        "ca.key",
        "ca.pem",
        "node-gw1.key",
        "node-gw1.pem",
    ]


def test_ca_is_kept_and_loaded(tmp_path: Path) -> None:
    first = load_or_create_ca(tmp_path / "ca")
    again = load_or_create_ca(tmp_path / "ca")
    assert again.cert == first.cert
    assert again.key.private_numbers() == first.key.private_numbers()


def test_load_ca_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    save_ca(create_ca(), tmp_path)
    (tmp_path / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(SecurityError, match="read by others"):
        load_ca(tmp_path)


def test_load_ca_refuses_a_foreign_key(tmp_path: Path) -> None:
    save_ca(create_ca(), tmp_path / "a")
    save_ca(create_ca(), tmp_path / "b")
    (tmp_path / "b" / CA_CERT_FILE).replace(tmp_path / "a" / CA_CERT_FILE)
    with pytest.raises(SecurityError, match="does not belong"):
        load_ca(tmp_path / "a")


def test_load_ca_missing(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="no site CA"):
        load_ca(tmp_path)


# --- the testbed's key material ---------------------------------------------------------------


def test_testbed_pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOGMIG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FOGMIG_RUN_DIR", str(tmp_path / "run"))
    state = topology.plan(load_profile("lan"), 3)
    with pytest.raises(TestbedError, match="no certificate for fogmig:node:gw1") as missing:
        testbed_pki.node_identity("gw1")
    assert (missing.value.hint or "").startswith("fogmig testbed up")

    issued = testbed_pki.create_pki(state)
    assert {f.identity for f in issued} == {
        Identity.node("gw1"),
        Identity.node("gw2"),
        Identity.node("gw3"),
        Identity.controller(),
        Identity.operator(),
        Identity.broker(),
    }
    folder = testbed_pki.pki_dir()
    assert folder == tmp_path / "state" / "testbed" / "pki"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(f.key.stat().st_mode & 0o777 == 0o600 for f in issued)

    gw2 = testbed_pki.node_identity("gw2")
    cert = load_certificate(gw2.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(state.node("gw2").data_ip)
    ]
    ca = load_ca(folder)
    cert.verify_directly_issued_by(ca.cert)
    broker = load_certificate(testbed_pki.load_identity(Identity.broker()).cert)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(state.broker.ip)]

    # Making it again replaces the CA: certificates of the old one are not of this site.
    testbed_pki.create_pki(state)
    assert load_ca(folder).cert != ca.cert

    assert testbed_pki.remove_pki() is True
    assert not folder.exists()
    assert testbed_pki.remove_pki() is False
