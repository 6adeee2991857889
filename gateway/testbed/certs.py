"""Test certificates the development PKI never issues: any CN, validity window, EKU and names,
the key encrypted or in the clear. Tests use them for what a start must refuse (a device
certificate naming another device, an expired or not-yet-valid one, a server EKU on a client)
and for what the uplink must refuse from a hub (expired, wrong EKU, wrong host).

One builder for both sides: it reuses the development PKI's own leaf builder and writers, so a
test leaf differs from a real one only in what the test asks for. It lives in the testbed
because only tests use it; the product keeps ``pki.init`` and ``pki.issue``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from gateway.identity.pki import (
    Pki,
    _cert_pem,
    _key_pem,
    _leaf,
    _load_intermediate,
    _new_key,
    _write_private,
    _write_public,
    decrypted_key_pem,
)


def issue_leaf(
    root: Path,
    cert_path: Path,
    key_path: Path,
    *,
    cn: str = "hub",
    server: bool = False,
    start: dt.datetime | None = None,
    until: dt.datetime | None = None,
    days: int = 365,
    names: Iterable[str] = (),
    ips: Iterable[str] = (),
    encrypt: bool = True,
) -> None:
    """A leaf signed by the intermediate of the PKI in ``root``: CN ``cn``, EKU server or
    client auth, valid from ``start`` for ``days`` (or until ``until``), DNS ``names`` and
    ``ips`` as subject alternative names. The key is encrypted under the PKI's passphrase
    unless ``encrypt`` is false; the certificate file holds leaf + intermediate."""
    pki = Pki(Path(root))
    passphrase = pki.passphrase()
    inter_cert, inter_key = _load_intermediate(pki, passphrase)
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = _leaf(
        cn,
        key,
        inter_cert,
        inter_key,
        server=server,
        days=days,
        sans=sans,
        start=start,
        until=until,
    )
    _write_private(key_path, _key_pem(key, passphrase))
    if not encrypt:
        _write_private(key_path, decrypted_key_pem(key_path, passphrase))
    _write_public(cert_path, _cert_pem(cert, inter_cert))
