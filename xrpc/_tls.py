"""TLS contexts for ``tls://`` URLs, built with the standard ``ssl`` module.

Defaults are strict: TLS 1.2 or newer, certificates verified, hostnames checked on the client.
Passing ``cafile`` to ``server_ssl_context`` turns on mutual authentication: a client must then
present a certificate signed by that CA, and its subject and SANs appear in ``conn.peer``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import ssl
from typing import Any

from ._peer import CertSubject, Peer

__all__ = ("server_ssl_context", "client_ssl_context", "cert_subject", "peer_with_certificate")

_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}

_PathLike = str | os.PathLike[str]


def server_ssl_context(certfile: _PathLike, keyfile: _PathLike | None = None, *, cafile: _PathLike | None = None) -> ssl.SSLContext:
    """A server context presenting ``certfile``; with ``cafile``, clients must present a certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if cafile is not None:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(
    cafile: _PathLike | None = None, *, certfile: _PathLike | None = None, keyfile: _PathLike | None = None, check_hostname: bool = True
) -> ssl.SSLContext:
    """A client context trusting ``cafile`` (default: the system's CAs), optionally with a client certificate."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def cert_subject(info: dict[str, Any]) -> CertSubject:
    """The subject of a certificate as ``ssl.SSLSocket.getpeercert()`` decodes it, keeping every
    value of an attribute that appears more than once (``CN=guest/CN=agent``), in order.  ``CN``,
    ``O``, ``OU`` and ``C`` use their short names; other attributes keep OpenSSL's long names."""
    pairs: list[tuple[str, str]] = []
    for rdn in info.get("subject", ()):
        for key, value in rdn:
            if isinstance(key, str) and isinstance(value, str):
                pairs.append((_SHORT_NAMES.get(key, key), value))
    return CertSubject(pairs)


def peer_with_certificate(peer: Peer, sslobj: Any) -> Peer:
    """``peer`` with the facts of the verified certificate of a TLS connection (``sslobj``, an
    ``ssl.SSLObject`` or ``ssl.SSLSocket``); ``peer`` itself when there is no TLS."""
    if sslobj is None:
        return peer
    der = sslobj.getpeercert(binary_form=True)
    info = sslobj.getpeercert() or {}
    subject = cert_subject(info)  # every value of every attribute: CN=guest/CN=agent keeps both
    sans = tuple(f"{kind}:{value}" for kind, value in info.get("subjectAltName", ()))
    return dataclasses.replace(
        peer,
        transport="tls",
        cert_subject=subject,
        cert_sans=sans,
        cert_fingerprint=hashlib.sha256(der).hexdigest() if der else None,
    )
