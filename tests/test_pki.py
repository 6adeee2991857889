"""The development PKI keeps its root key away from the gateway and replaces no identity unasked."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from conftest import fieldgate

ENV = {**os.environ, "FIELDGATE_KEY_PASSPHRASE": "correct horse battery"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fieldgate(*args), env=ENV, capture_output=True, text=True, timeout=60)


def test_pki_init_keeps_no_root_key_in_the_folder_and_says_it_is_for_development(
    tmp_path: Path,
) -> None:
    made = run("pki", "init", "--dir", str(tmp_path / "pki"))
    assert made.returncode == 0, made.stderr
    assert "DEVELOPMENT PKI" in made.stdout and "root key:" in made.stdout
    assert not list((tmp_path / "pki").rglob("root.key"))
    # What the hub stand-in reads is all there.
    for name in ("root.pem", "intermediate.pem", "intermediate.key", "hub/server.pem"):
        assert (tmp_path / "pki" / name).exists(), name


def test_pki_init_writes_the_root_key_only_outside_the_folder(tmp_path: Path) -> None:
    inside = run("pki", "init", "--dir", str(tmp_path / "a"), "--root-key", str(tmp_path / "a/r"))
    assert inside.returncode == 2 and "keep the root's key away" in inside.stderr
    assert not (tmp_path / "a" / "root.pem").exists()

    offline = tmp_path / "offline" / "root.key"
    made = run("pki", "init", "--dir", str(tmp_path / "b"), "--root-key", str(offline))
    assert made.returncode == 0, made.stderr
    assert offline.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(offline.stat().st_mode) == 0o600


def test_pki_issue_replaces_an_identity_only_with_renew(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert run("pki", "init", "--dir", str(pki)).returncode == 0
    assert run("pki", "issue", "--dir", str(pki), "boiler-7").returncode == 0
    cert, key = pki / "devices" / "boiler-7.pem", pki / "devices" / "boiler-7.key"
    before = cert.read_bytes(), key.read_bytes()

    again = run("pki", "issue", "--dir", str(pki), "pump-2", "boiler-7")
    assert again.returncode == 2
    assert "boiler-7: an identity exists already" in again.stderr and "--renew" in again.stderr
    assert (cert.read_bytes(), key.read_bytes()) == before
    assert not (pki / "devices" / "pump-2.pem").exists()  # nothing issued from a refused call

    renewed = run("pki", "issue", "--dir", str(pki), "--renew", "boiler-7")
    assert renewed.returncode == 0, renewed.stderr
    assert "boiler-7: renewed" in renewed.stdout
    assert cert.read_bytes() != before[0] and key.read_bytes() != before[1]
