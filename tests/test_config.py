"""A bad config is refused before anything starts, naming the file, the field and why."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest

from gateway import cli
from gateway.config import load, render_toml

from conftest import fieldgate


def good(pki_dir: Path, tmp: Path) -> dict[str, object]:
    return {
        "hub": {
            "hostname": "localhost",
            "address": "127.0.0.1",
            "port": 1,
            "ca_file": str(pki_dir / "root.pem"),
        },
        "sealing": {"keyring": str(pki_dir / "keyring.json"), "key_id": "k1"},
        "secrets": {"passphrase_file": str(pki_dir / "passphrase")},
        "gateway": {"state_dir": str(tmp / "state")},
        "devices": [
            {
                "id": f"plc-{i}",
                "cert": str(pki_dir / "devices" / f"plc-{i}.pem"),
                "key": str(pki_dir / "devices" / f"plc-{i}.key"),
                "modbus": {"host": "127.0.0.1", "port": 1502 + i},
                "identity": "none",
                "points": [
                    {"name": f"p{j}", "address": j * 2, "type": "float32"} for j in range(3)
                ],
            }
            for i in range(1, 5)
        ],
    }


def refused(tmp: Path, text: str) -> str:
    """``fieldgate run --config`` on ``text``, in this process (the command's own ``main``; a
    process per case made this file six times slower): exit 2, the file named, nothing made.
    ``test_a_missing_file_is_refused`` runs the real command as a process."""
    path = tmp / "gateway.toml"
    path.write_text(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["run", "--config", str(path)])
    stderr = err.getvalue()
    assert code == 2, stderr
    assert str(path) in stderr
    # Nothing started: the gateway never made its state folder.
    assert not (tmp / "state").exists()
    return stderr


def test_the_good_config_loads(pki_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(good(pki_dir, tmp_path)))
    cfg = load(path)
    assert [d.id for d in cfg.devices] == ["plc-1", "plc-2", "plc-3", "plc-4"]
    assert cfg.batching.max_bytes == 4000 and cfg.batching.max_age == 1.0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c: c["devices"][3]["points"][2].update(type="flaot32"),
            "devices[3].points[2].type: 'flaot32' is not one of 'int16', 'uint16', 'int32', "
            "'uint32', 'float32', 'float64' or 'bool'",
        ),
        (
            lambda c: c["devices"][0]["points"][0].update(tabel="input"),
            "devices[0].points[0].tabel: unknown field (check its spelling)",
        ),
        (lambda c: c["hub"].pop("hostname"), "hub.hostname: field required"),
        (
            lambda c: c["devices"][1]["modbus"].update(port=70000),
            "devices[1].modbus.port: Input should be less than or equal to 65535",
        ),
        (
            lambda c: c["devices"][2].update(id="plc-1"),
            "devices[2].id: 'plc-1' is already devices[0]",
        ),
        (lambda c: c["devices"][0]["points"][1].update(name="p0"), "point name 'p0' is used twice"),
        (
            lambda c: c["devices"][0]["points"][0].update(table="coil"),
            "devices[0].points[0]: table 'coil' holds bits; type must be 'bool', not 'float32'",
        ),
        (
            lambda c: c["devices"][0]["points"][0].update(address=65535),
            "float32 at address 65535 runs past register 65535",
        ),
        (
            lambda c: c["devices"][0]["modbus"].update(max_registers=1),
            "devices[0]: points[0] 'p0' (float32) takes 2 registers, more than max_registers = 1 "
            "allows in one read",
        ),
        (
            lambda c: c["devices"][0].update(cert="/nonexistent/plc-1.pem"),
            "devices[0].cert: file not found: /nonexistent/plc-1.pem",
        ),
        (
            lambda c: c["devices"][1]["modbus"].update(port=1502 + 1),
            "devices[1].modbus: 127.0.0.1:1503 unit 1 is already bound to device 'plc-1'",
        ),
        (
            lambda c: (
                c["batching"].update(max_bytes=300000)
                if "batching" in c
                else c.update(batching={"max_bytes": 300000})
            ),
            "batching.max_bytes: Input should be less than or equal to 262144",
        ),
        (
            lambda c: c["devices"][0].update(
                control={"channels": ["method"], "writes": {"p9": {}}}
            ),
            "devices[0]: control.writes.p9: the device has no point 'p9' (points: p0, p1, p2)",
        ),
        (
            lambda c: c["devices"][0].update(control={"writes": {"p0": {}}}),
            "devices[0]: control.channels: writes are listed but no channel may write",
        ),
        (
            lambda c: c["devices"][0].update(
                control={"channels": ["method"], "writes": {"p0": {"min": 5, "max": 1}}}
            ),
            "devices[0].control.writes.p0: min 5.0 is above max 1.0",
        ),
        (
            lambda c: c["devices"][0].update(control={"channels": ["sms"]}),
            "devices[0].control.channels[0]: 'sms' is not one of 'method', 'c2d' or 'twin'",
        ),
        (
            lambda c: (
                c["devices"][0]["points"][0].update(table="input"),
                c["devices"][0].update(control={"channels": ["twin"], "writes": {"p0": {}}}),
            ),
            "control.writes.p0: an input point cannot be written",
        ),
        (lambda c: c.update(control={"enabled": "maybe"}), "control.enabled: Input should be"),
    ],
)
def test_each_bad_field_is_named_with_the_reason(
    pki_dir: Path, tmp_path: Path, change: object, expected: str
) -> None:
    doc = good(pki_dir, tmp_path)
    assert callable(change)
    change(doc)
    assert expected in refused(tmp_path, render_toml(doc))


def test_toml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    err = refused(tmp_path, "[hub]\nhostname = \n")
    assert "not valid TOML" in err and "line 2" in err


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        fieldgate("run", "--config", str(tmp_path / "none.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "none.toml: invalid config" in result.stderr and "cannot read" in result.stderr


def test_a_wrong_passphrase_refuses_the_start(pki_dir: Path, tmp_path: Path) -> None:
    doc = good(pki_dir, tmp_path)
    (tmp_path / "wrong").write_text("not the passphrase\n")
    (tmp_path / "wrong").chmod(0o600)
    doc["secrets"] = {"passphrase_file": str(tmp_path / "wrong")}
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    result = subprocess.run(
        fieldgate("run", "--config", str(path)), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "sealing.keyring" in result.stderr and "wrong passphrase" in result.stderr
