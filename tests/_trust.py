"""Helpers for the authentication and authorisation tests: another local user to act as, a
throw-away PKI (a CA and the leaf certificates it issues, or a self-signed certificate, as PEM
files), and the warnings xrpc logged."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from _timeouts import T

TEST_USER = "xrpctest"


def other_user(why: str) -> pwd.struct_passwd:
    """The throw-away user ``TEST_USER``, created if need be; the test is skipped (``needs root to
    <why>``) unless this runs as root, or if the user cannot be created."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to {why}")
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        pytest.skip("useradd is not available to create a throw-away user")
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
        check=False,
        capture_output=True,
        timeout=6 * T,
    )
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"could not create the user {TEST_USER}")


def xrpc_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the WARNING records the ``xrpc`` logger emitted."""
    return [r.getMessage() for r in caplog.records if r.name == "xrpc" and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- PKI
def name(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def cn_name(cn: str, organization: str) -> x509.Name:
    return name((NameOID.COMMON_NAME, cn), (NameOID.ORGANIZATION_NAME, organization))


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def make_ca(subject: x509.Name) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-256, valid from an hour ago for a day)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(subject, subject, key, ca=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], subject: x509.Name, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for ``subject`` issued by ``ca``, for ``usage`` (server or client auth)."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(subject, ca_cert.subject, key, ca=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = (
        builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pem(d: Path, stem: str, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> tuple[str, str]:
    """Write ``<stem>.pem`` (and ``<stem>.key`` unless ``key`` is None) in ``d``; their paths."""
    cert_path = d / f"{stem}.pem"
    key_path = d / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return str(cert_path), str(key_path)


def self_signed(d: Path) -> tuple[str, str]:
    """A self-signed P-256 certificate for 127.0.0.1 (valid from a day ago for two days), written
    to ``d`` as ``cert.pem`` and ``key.pem``; their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = d / "cert.pem", d / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(certfile), str(keyfile)
