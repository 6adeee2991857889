"""``fieldgate audit verify|show`` as a user runs them: exit codes and what they print, over a
log signed by a gateway identity issued from the development PKI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from gateway.audit import files
from gateway.core import audit
from gateway.identity import pki as pki_mod
from gateway.identity.auditkeys import load_signer

from conftest import fieldgate

GATEWAY = "gw-audit"


@pytest.fixture(scope="module")
def identity(pki_dir: Path) -> tuple[Path, Path]:
    """A gateway identity: what `pki init` should make (see docs/notes-audit.md)."""
    if not pki_mod.Pki(pki_dir).device_cert(GATEWAY).exists():
        pki_mod.issue(pki_dir, [GATEWAY])
    p = pki_mod.Pki(pki_dir)
    return p.device_cert(GATEWAY), p.device_key(GATEWAY)


def write_log(tmp: Path, pki_dir: Path, identity: tuple[Path, Path]) -> Path:
    signer = load_signer(identity[1], pki_mod.Pki(pki_dir).passphrase())
    items: list[audit.AuditRecord | audit.Head] = []
    last = None
    events = [
        ("start", None, {"version": "0.1.0"}),
        ("admission", "plc-1", {"fingerprint": "ACME 42"}),
        ("quarantine", "plc-2", {"why": "fingerprint changed"}),
        ("command-refused", "plc-1", {"point": "setpoint", "value": 95.5}),
        ("admission", "plc-2", {"fingerprint": "ACME 43"}),
    ]
    for n, (kind, device, details) in enumerate(events):
        last = audit.append(last, 1795900000.0 + 60 * n, kind, device, details, GATEWAY)
        items.append(last)
        if n in (2, 4):
            items.append(audit.sign_head(last, signer))
    log = tmp / "audit.jsonl"
    files.write(log, items)
    return log


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fieldgate("audit", *args), capture_output=True, text=True, timeout=60)


def test_verify_passes_an_intact_log_with_the_gateways_certificate(
    tmp_path: Path, pki_dir: Path, identity: tuple[Path, Path]
) -> None:
    log = write_log(tmp_path, pki_dir, identity)
    out = run("verify", str(log), "--cert", str(identity[0]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "chain gw-audit holds: 5 records (seq 0..4), 2 signed heads, the last at seq 4" in (
        out.stdout
    )
    out = run("verify", str(log), "--cert", str(identity[0]), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and doc["ok"] is True and doc["proven_seq"] == 4


def test_verify_names_an_edited_record_and_its_line(
    tmp_path: Path, pki_dir: Path, identity: tuple[Path, Path]
) -> None:
    log = write_log(tmp_path, pki_dir, identity)
    lines = log.read_text().splitlines()
    lines[4] = lines[4].replace('"value":95.5', '"value":45.5')  # record 3 (line 4: a head)
    log.write_text("\n".join(lines) + "\n")
    out = run("verify", str(log), "--cert", str(identity[0]))
    assert out.returncode == 1
    assert out.stdout.strip() == (
        f"{log}: chain gw-audit BROKEN (line 5): record 3: its hash does not match its "
        "contents (edited) [edited]"
    )


def test_verify_names_a_deleted_line_and_a_truncated_tail(
    tmp_path: Path, pki_dir: Path, identity: tuple[Path, Path]
) -> None:
    log = write_log(tmp_path, pki_dir, identity)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # record 1 deleted
    out = run("verify", str(log), "--cert", str(identity[0]), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and (doc["reason"], doc["seq"]) == ("missing", 1)
    log.write_text("\n".join(lines[:-2] + lines[-1:]) + "\n")  # record 4 gone, its head kept
    out = run("verify", str(log), "--cert", str(identity[0]))
    assert out.returncode == 1 and "[truncated]" in out.stdout and "record 4: missing" in out.stdout


def test_verify_refuses_a_head_signed_by_another_key(
    tmp_path: Path, pki_dir: Path, identity: tuple[Path, Path]
) -> None:
    """A log whose heads were made with another device's key: forged, as far as the gateway's
    certificate says."""
    pki_mod.issue(pki_dir, ["gw-other"]) if not pki_mod.Pki(pki_dir).device_cert(
        "gw-other"
    ).exists() else None
    p = pki_mod.Pki(pki_dir)
    log = write_log(tmp_path, pki_dir, (p.device_cert("gw-other"), p.device_key("gw-other")))
    out = run("verify", str(log), "--cert", str(identity[0]))
    assert out.returncode == 1 and "[signature]" in out.stdout and "line 4" in out.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "line 1: not JSON"),
        ('{"entry": {}}\n', "line 1: expected"),
        ('{"record": {"v": 1}}\n', "line 1: record: field 'seq' missing"),
    ],
)
def test_unreadable_input_exits_2_naming_the_line(
    tmp_path: Path, identity: tuple[Path, Path], content: str, message: str
) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text(content)
    out = run("verify", str(log), "--cert", str(identity[0]))
    assert out.returncode == 2 and message in out.stderr and str(log) in out.stderr


def test_a_key_file_that_is_not_a_certificate_exits_2(
    tmp_path: Path, pki_dir: Path, identity: tuple[Path, Path]
) -> None:
    log = write_log(tmp_path, pki_dir, identity)
    out = run("verify", str(log), "--cert", str(log))
    assert out.returncode == 2 and "not a PEM of an X.509 certificate" in out.stderr
    out = run("verify", str(tmp_path / "absent.jsonl"), "--cert", str(identity[0]))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_show_filters_by_kind_device_and_time(
    tmp_path: Path, pki_dir: Path, identity: tuple[Path, Path]
) -> None:
    log = write_log(tmp_path, pki_dir, identity)
    out = run("show", str(log))
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 5
    assert "not verified" in out.stderr
    out = run("show", str(log), "--kind", "admission", "--device", "plc-2", "--json")
    [doc] = [json.loads(line) for line in out.stdout.splitlines()]
    assert (doc["seq"], doc["details"]) == (4, {"fingerprint": "ACME 43"})
    out = run("show", str(log), "--since", "1795900060", "--until", "2026-11-28T21:09:10Z")
    seqs = [int(line.split()[0]) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and seqs == [1, 2]
    out = run("show", str(log), "--since", "yesterday")
    assert out.returncode == 2 and "ISO 8601" in out.stderr


def test_an_edited_record_still_shows_but_does_not_verify(
    tmp_path: Path, pki_dir: Path, identity: tuple[Path, Path]
) -> None:
    log = write_log(tmp_path, pki_dir, identity)
    read = files.read(log)
    records = list(read.records)
    records[2] = dataclasses.replace(records[2], device="plc-9")
    files.write(log, [*records, *read.heads])
    assert "plc-9" in run("show", str(log)).stdout
    assert run("verify", str(log), "--cert", str(identity[0])).returncode == 1
