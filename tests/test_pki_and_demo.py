"""The development PKI, and the demo a new user runs first."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
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
def test_demo_shows_the_devices_and_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    brokers_before = _pids("mosquitto")
    output = _demo_until_ctrl_c(state, tmp_path / "demo.out", records=12)
    for device in ("plc-1", "plc-2", "plc-3"):
        assert device in output
    assert "gateway exit code 0" in output
    opened = _open_summary(state)
    assert opened.returncode == 0, opened.stderr
    assert " 0 refused" in opened.stderr and " 0 gaps" in opened.stderr
    gateway_log = (state / "logs" / "gateway.log").read_text()
    assert re.search(r"readings: (\d+) read, \1 delivered, 0 dropped", gateway_log)
    # Nothing the demo started survives it.
    assert _pids("-f", str(state)) == set()
    assert _pids("mosquitto") <= brokers_before


@pytest.mark.slow
def test_demo_ctrl_c_the_hub_gets_every_delivered_reading_run_after_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for run, records in enumerate((12, 0)):
        # The second run is stopped as soon as the hub opened anything of its own.
        _demo_until_ctrl_c(state, tmp_path / f"demo-{run}.out", records=records)
        delivered = re.findall(
            r"readings: (\d+) read, (\d+) delivered, 0 dropped",
            (state / "logs" / "gateway.log").read_text(),
        )
        assert len(delivered) == run + 1
        opened = _open_summary(state)
        assert opened.returncode == 0, opened.stderr
        # Everything the gateway delivered, in this run and the ones before, is in the record.
        total = re.search(r"(\d+) readings, (\d+) duplicates dropped, (\d+) gaps", opened.stderr)
        assert total, opened.stderr
        assert int(total[1]) == sum(int(d) for _, d in delivered), (delivered, opened.stderr)
        assert total[3] == "0", opened.stderr


def _demo_until_ctrl_c(state: Path, log: Path, *, records: int) -> str:
    """Run the demo until the hub's record grew by ``records`` lines (or, with 0, until the
    gateway of this run delivered something), Ctrl-C it, return what it printed."""
    record = state / "hub-record.jsonl"
    before = len(record.read_bytes().splitlines()) if record.exists() else 0
    with open(log, "wb") as out:
        # A session of its own, like a terminal: Ctrl-C reaches the whole process group.
        demo = subprocess.Popen(
            fieldgate("demo", "--state", str(state), "--devices", "3"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "160"},
        )
        try:
            # The live table reaches a pipe only at the end; the hub's record shows progress.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                not record.exists()
                or len(record.read_bytes().splitlines()) < before + max(records, 1)
            ):
                time.sleep(0.2)
            os.killpg(demo.pid, signal.SIGINT)
            code = demo.wait(60)
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    return output


def _open_summary(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fieldgate(
            "open", str(state / "hub-record.jsonl"), "--pki", str(state / "pki"), "--summary"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _pids(*pattern: str) -> set[str]:
    found = subprocess.run(["pgrep", *pattern], capture_output=True, text=True)
    return set(found.stdout.split())
