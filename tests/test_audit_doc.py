"""docs/audit.md's worked example: every byte rebuilt from its key and events, its file
verified by the library and the command, its consumer example run."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit import files
from gateway.core import audit
from gateway.identity.auditkeys import Signer, Verifier

from conftest import fieldgate

DOC = (Path(__file__).parent.parent / "docs" / "audit.md").read_text()


def blocks_after(title: str) -> str:
    found = re.search(rf"^{re.escape(title)}.*?\n```\w*\n(.*?)\n```", DOC, re.M | re.S)
    assert found, title
    return found[1]


def example_key() -> Signer:
    scalar = blocks_after("A fixed test key")
    return Signer.of(ec.derive_private_key(int(scalar, 16), ec.SECP256R1()))


def example_chain() -> tuple[list[audit.AuditRecord], audit.Head]:
    chain = "gw-example"
    r0 = audit.append(
        None, 1795900000.0, "start", None, {"version": "0.1.0", "config_sha256": "9c1e"}, chain
    )
    r1 = audit.append(
        r0, 1795900000.25, "admission", "plc-1", {"fingerprint": "ACME PLC-3 SN 0042"}, chain
    )
    r2 = audit.append(
        r1,
        1795900007.5,
        "command-refused",
        "plc-1",
        {"point": "setpoint", "rule": "range", "value": 95.5},
        chain,
    )
    return [r0, r1, r2], audit.sign_head(r2, example_key(), 1795900008.0)


def test_the_worked_example_is_rebuilt_byte_for_byte() -> None:
    records, head = example_chain()
    key = example_key()
    assert key.public().public_pem().decode().strip() == blocks_after("(SHA-256 of").strip()
    for r in records:
        block = re.search(
            rf"^Record {r.seq}:\n```\n(.*?)\n```\nhash `([0-9a-f]{{64}})`", DOC, re.M | re.S
        )
        assert block, r.seq
        assert r.canonical() == block[1].encode()
        assert r.hash.hex() == block[2]
    assert head.message().decode() == blocks_after("Head message:")
    assert base64.b64encode(head.signature).decode() == blocks_after("signature (base64")
    assert audit.verify_head(head, key.public())
    assert blocks_after("The file:").splitlines() == [files.line(i) for i in [*records, head]]


def test_the_documented_signature_verifies_with_the_documented_public_key(tmp_path: Path) -> None:
    pem = tmp_path / "pub.pem"
    pem.write_text(blocks_after("(SHA-256 of") + "\n")
    from gateway.identity.auditkeys import load_verifier

    public_key: Verifier = load_verifier(pem, certificate=False)
    log = tmp_path / "audit.jsonl"
    log.write_text(blocks_after("The file:") + "\n")
    read = files.read(log)
    verdict = audit.verify(read.records, read.heads, public_key, "gw-example")
    assert verdict.ok and verdict.records == 3 and verdict.proven_seq == 2
    out = subprocess.run(
        fieldgate("audit", "verify", str(log), "--key-pub", str(pem)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"{log}: chain gw-example holds: 3 records (seq 0..2), 1 signed heads, the last at seq 2"
    )


def test_the_documented_consumer_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    example = re.search(r"^Library.*?\n```python\n(.*?)\n```", DOC, re.M | re.S)
    assert example
    (tmp_path / "gateway-pub.pem").write_text(blocks_after("(SHA-256 of") + "\n")
    monkeypatch.chdir(tmp_path)
    from gateway.core import codec

    names: dict[str, object] = {
        "messages": [codec.loads(line) for line in blocks_after("The file:").splitlines()]
    }
    exec(compile(example[1], "docs/audit.md", "exec"), names)
    verdict = names["verdict"]
    assert isinstance(verdict, audit.Verdict) and verdict.ok


def test_the_tamper_inputs_the_doc_shows_are_a_valid_config() -> None:
    import tomllib

    from gateway.config import validate

    section = DOC[DOC.index("### Tamper signals") :]
    device_toml, box_toml = re.findall(r"```toml\n(.*?)\n```", section, re.S)[:2]
    device = {
        "id": "plc-1",
        "cert": __file__,
        "key": __file__,
        "modbus": {"host": "127.0.0.1", "port": 5020},
        "identity": "none",
        "points": [{"name": "door", "address": 0, "table": "discrete", "type": "bool"}],
        **tomllib.loads(device_toml.replace("[[devices.tamper]]", "[[tamper]]")),
    }
    cfg = validate(
        {
            "hub": {"hostname": "localhost", "ca_file": __file__},
            "sealing": {"keyring": __file__, "key_id": "k1"},
            "audit": tomllib.loads(box_toml.replace("[[audit.tamper_files]]", "[[tamper_files]]")),
            "devices": [device],
        },
        "docs/audit.md",
        check_files=False,
    )
    assert cfg.devices[0].tamper[0].point == "door"
    assert cfg.audit.tamper_files[0].normal == "0"
