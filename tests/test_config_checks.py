"""Configs that look valid field by field but cannot work are refused, naming the field."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_config import good

from gateway.config import load, render_toml
from gateway.core.errors import ConfigError

Change = Callable[[dict[str, Any], Path], object]


def _device(doc: dict[str, Any], index: int) -> dict[str, Any]:
    entry: dict[str, Any] = doc["devices"][index]
    return entry


def _garbage_ca(doc: dict[str, Any], tmp: Path) -> None:
    (tmp / "ca.pem").write_text("this is not a certificate\n")
    doc["hub"]["ca_file"] = str(tmp / "ca.pem")


def _state_is_a_file(doc: dict[str, Any], tmp: Path) -> None:
    (tmp / "state-file").write_text("")
    doc["gateway"]["state_dir"] = str(tmp / "state-file")


def _state_under_a_file(doc: dict[str, Any], tmp: Path) -> None:
    (tmp / "state-file").write_text("")
    doc["gateway"]["state_dir"] = str(tmp / "state-file" / "gateway")


def _open_passphrase(doc: dict[str, Any], tmp: Path) -> None:
    path = tmp / "passphrase"
    path.write_bytes(Path(doc["secrets"]["passphrase_file"]).read_bytes())
    path.chmod(0o640)
    doc["secrets"]["passphrase_file"] = str(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c, t: _device(c, 1)["modbus"].update(host="localhost", port=1502 + 1),
            "devices[1].modbus: localhost:1503 unit 1 is 127.0.0.1:1503 unit 1, already bound to "
            "device 'plc-1' (both are 127.0.0.1)",
        ),
        (
            lambda c, t: _device(c, 2)["points"][1].update(address=3),
            "devices[2]: points[2] 'p2' (holding 4-5) overlaps points[1] 'p1' (holding 3-4)",
        ),
        (
            lambda c, t: _device(c, 0)["points"].append(
                {"name": "b", "address": 1, "type": "uint16"}
            ),
            "devices[0]: points[3] 'b' (holding 1) overlaps points[0] 'p0' (holding 0-1)",
        ),
        (
            lambda c, t: _device(c, 0)["points"][0].update(scale=float("nan")),
            "devices[0].points[0].scale: Input should be a finite number",
        ),
        (
            lambda c, t: _device(c, 0)["points"][0].update(offset=float("inf")),
            "devices[0].points[0].offset: Input should be a finite number",
        ),
        (
            lambda c, t: c["hub"].update(keepalive=1178),
            "hub.keepalive: 1178 s is more than 1177 s: IoT Hub waits 1.5 x the keep-alive and "
            "at most 1,767 s, so it would cut the connection off between pings",
        ),
        (_garbage_ca, "hub.ca_file: "),
        (_state_is_a_file, "gateway.state_dir: "),
        (_state_under_a_file, "gateway.state_dir: cannot make "),
        (_open_passphrase, "secrets.passphrase_file: "),
    ],
)
def test_a_config_that_cannot_work_is_refused_naming_the_field(
    pki_dir: Path, tmp_path: Path, change: Change, expected: str
) -> None:
    doc = good(pki_dir, tmp_path)
    change(doc, tmp_path)
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    with pytest.raises(ConfigError) as refused:
        load(path)
    assert any(p.startswith(expected) for p in refused.value.problems), refused.value.problems


def test_the_reasons_say_what_to_do(pki_dir: Path, tmp_path: Path) -> None:
    doc = good(pki_dir, tmp_path)
    _open_passphrase(doc, tmp_path)
    _garbage_ca(doc, tmp_path)
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    with pytest.raises(ConfigError) as refused:
        load(path)
    passphrase = tmp_path / "passphrase"
    assert refused.value.problems == [
        f"hub.ca_file: {tmp_path / 'ca.pem'} holds no PEM certificates that TLS can load "
        "(NO_CERTIFICATE_OR_CRL_FOUND)",
        f"secrets.passphrase_file: {passphrase} is mode 0640: group or others may read it; "
        f"chmod 600 {passphrase}",
    ]


def test_adjacent_points_and_one_host_under_one_name_are_fine(
    pki_dir: Path, tmp_path: Path
) -> None:
    doc = good(pki_dir, tmp_path)
    for i in range(4):
        _device(doc, i)["modbus"]["host"] = "localhost"
    _device(doc, 0)["points"].append({"name": "c", "address": 0, "table": "coil", "type": "bool"})
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    assert len(load(path).devices[0].points) == 4


def test_a_name_that_does_not_resolve_is_compared_by_its_spelling(
    pki_dir: Path, tmp_path: Path
) -> None:
    doc = good(pki_dir, tmp_path)
    _device(doc, 0)["modbus"]["host"] = "plc-a.invalid"
    _device(doc, 1)["modbus"].update(host="plc-b.invalid", port=1502 + 1)
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    assert load(path).devices[1].modbus is not None


def test_garbage_ca_file_and_state_dir_file_exit_2_without_a_traceback(
    pki_dir: Path, tmp_path: Path
) -> None:
    from test_config import refused

    doc = good(pki_dir, tmp_path)
    _garbage_ca(doc, tmp_path)
    _state_is_a_file(doc, tmp_path)
    err = refused(tmp_path, render_toml(doc))
    assert "hub.ca_file: " in err and "gateway.state_dir: " in err
    assert "Traceback" not in err
    assert os.path.isfile(tmp_path / "state-file")


def test_a_ble_value_scaled_by_nan_is_refused() -> None:
    from pydantic import ValidationError

    from gateway.config import BleValue

    with pytest.raises(ValidationError, match="finite number"):
        BleValue.model_validate({"name": "t", "scale": float("nan")})


def test_names_are_resolved_together_and_a_hung_resolver_does_not_hold_the_start() -> None:
    import threading

    from gateway.preflight import resolve_all

    release = threading.Event()

    def resolver(name: str) -> set[str]:
        if name.startswith("hung"):
            release.wait(10)  # a DNS server that does not answer
        return {"10.0.0.1"} if name == "plc" else {name}

    try:
        found = resolve_all(["plc", *(f"hung-{i}" for i in range(20))], resolver, within=0.2)
    finally:
        release.set()
    # The hung names stand for themselves; the answered one is resolved.
    assert found["plc"] == {"10.0.0.1"} and found["hung-3"] == {"hung-3"}
