"""The development PKI, and the demo a new user runs first."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import fieldgate


def test_pki_init_and_issue_make_encrypted_keys_and_verifiable_chains(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    env = {**os.environ, "FIELDGATE_KEY_PASSPHRASE": "correct horse battery"}
    assert (
        subprocess.run(
            fieldgate("pki", "init", "--dir", str(root)), env=env, capture_output=True, timeout=60
        ).returncode
        == 0
    )
    done = subprocess.run(
        fieldgate("pki", "issue", "--dir", str(root), "boiler-7", "pump-2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert not (root / "passphrase").exists()  # the environment variable was used

    for key in root.rglob("*.key"):
        assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----"), key
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key

    chain = x509.load_pem_x509_certificates((root / "devices" / "boiler-7.pem").read_bytes())
    leaf, intermediate = chain
    rootcert = x509.load_pem_x509_certificate((root / "root.pem").read_bytes())
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "boiler-7"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(rootcert)

    again = subprocess.run(
        fieldgate("pki", "init", "--dir", str(root)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "refusing to replace" in again.stderr

    bad = subprocess.run(
        fieldgate("pki", "issue", "--dir", str(root), "bad/id"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a valid device id" in bad.stderr


@pytest.mark.slow
def test_demo_runs_shows_the_devices_and_leaves_nothing_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    brokers_before = _pids("mosquitto")
    result = subprocess.run(
        fieldgate("demo", "--state", str(state), "--duration", "6", "--devices", "3"),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for device in ("plc-1", "plc-2", "plc-3"):
        assert device in result.stdout
    assert "gateway exit code 0" in result.stdout
    record = state / "hub-record.jsonl"
    opened = subprocess.run(
        fieldgate("open", str(record), "--pki", str(state / "pki"), "--summary"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert opened.returncode == 0, opened.stderr
    assert " 0 refused" in opened.stderr and " 0 gaps" in opened.stderr
    # Nothing the demo started survives it: no process mentions its state folder.
    assert _pids("-f", str(state)) == set()
    assert _pids("mosquitto") <= brokers_before


def _pids(*pattern: str) -> set[str]:
    found = subprocess.run(["pgrep", *pattern], capture_output=True, text=True)
    return set(found.stdout.split())
