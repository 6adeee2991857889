"""The pure BLE pieces (decode tables, the challenge) and the BLE part of the config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_config import good, refused

from adapters.ble import gatt
from gateway.config import render_toml

from conftest import DEVICES


def test_a_decode_table_scales_each_field_and_refuses_a_value_of_the_wrong_length() -> None:
    decoder = gatt.Decoder(
        "<hHB?",
        (gatt.Field("t", 0.01), gatt.Field("h", 0.1, -5), gatt.Field("b"), gatt.Field("ok")),
    )
    assert decoder.decode(decoder.encode([-1234, 500, 7, True])) == [-12.34, 45.0, 7, True]
    with pytest.raises(ValueError, match="5 bytes, the decode table expects 6"):
        decoder.decode(b"\x00" * 5)
    padded = gatt.Decoder(
        "<2h?xB", (gatt.Field("a", 0.5), gatt.Field("b", 2), gatt.Field("c", 3.0), gatt.Field("d"))
    )
    assert padded.decode(padded.encode([2, 3, True, 10])) == [1.0, 6, True, 10]
    assert gatt.struct_fields("<IhHB") == 4
    assert gatt.struct_fields("<2h3xf") == 3
    for bad in ("<s", "<", "hello", "<0h"):
        with pytest.raises(ValueError):
            gatt.struct_fields(bad)


def test_the_challenge_binds_key_nonce_and_identity_address() -> None:
    key, nonce = os.urandom(32), os.urandom(16)
    answer = gatt.challenge_response(key, nonce, "C0:FE:00:00:00:01")
    assert gatt.check_response(key, nonce, "C0:FE:00:00:00:01", answer)
    assert not gatt.check_response(key, os.urandom(16), "C0:FE:00:00:00:01", answer)
    assert not gatt.check_response(key, nonce, "C0:FE:00:00:00:02", answer)
    assert not gatt.check_response(os.urandom(32), nonce, "C0:FE:00:00:00:01", answer)
    assert gatt.read_key(key.hex().encode() + b"\n") == key
    with pytest.raises(ValueError, match="at least 32 bytes"):
        gatt.read_key(b"00ff")


def ble_device(pki_dir: Path, **ble: Any) -> dict[str, Any]:
    table = {
        "uuid": gatt.MEASUREMENT,
        "format": "<IhHB",
        "values": [{"name": n} for n in ("counter", "t", "h", "b")],
    }
    return {
        "id": DEVICES[-1],
        "cert": str(pki_dir / "devices" / f"{DEVICES[-1]}.pem"),
        "key": str(pki_dir / "devices" / f"{DEVICES[-1]}.key"),
        "ble": {
            "address": "C0:FE:00:00:00:01",
            "bond": "just-works",
            "characteristics": [table],
            **ble,
        },
    }


@pytest.mark.parametrize(
    ("ble", "message"),
    [
        (
            {"app_id": "s-1"},
            "devices[4].ble: give exactly one of address (identity address) and app_id",
        ),
        (
            {"address": None, "app_id": "s-1"},
            "devices[4].ble: a device matched by app_id must have a challenge",
        ),
        (
            {"bond": "authenticated"},
            "devices[4].ble: bond 'authenticated' needs the device's passkey",
        ),
        (
            {"bond": "weak"},
            "devices[4].ble.bond: 'weak' is not one of 'none', 'just-works' or 'authenticated'",
        ),
        ({"address": "C0:FE:00:00:01"}, "devices[4].ble.address: String should match pattern"),
        (
            {
                "characteristics": [
                    {"uuid": gatt.STATUS, "format": "<HI", "values": [{"name": "v"}]}
                ]
            },
            "devices[4].ble.characteristics[0]: format '<HI' holds 2 values, but 1 are named",
        ),
        (
            {
                "characteristics": [
                    {"uuid": gatt.STATUS, "format": "<Hs", "values": [{"name": "v"}]}
                ]
            },
            "devices[4].ble.characteristics[0]: format '<Hs' is not a struct format",
        ),
    ],
)
def test_a_bad_ble_device_is_refused_naming_the_field(
    pki_dir: Path, tmp_path: Path, ble: dict[str, Any], message: str
) -> None:
    doc = good(pki_dir, tmp_path)
    device = ble_device(pki_dir, **ble)
    device["ble"] = {k: v for k, v in device["ble"].items() if v is not None}
    doc["devices"].append(device)  # type: ignore[attr-defined]
    assert message in refused(tmp_path, render_toml(doc))


def test_workers_split_modbus_devices_and_keep_each_radio_in_one_process(
    pki_dir: Path, tmp_path: Path
) -> None:
    from gateway.config import load
    from gateway.workers import worker_config

    doc = good(pki_dir, tmp_path)
    for n, adapter in enumerate(("hci0", "hci1", "hci0", "hci1", "hci0")):
        device = ble_device(pki_dir, adapter=adapter, address=f"C0:FE:00:00:01:{n:02X}")
        device["id"] = f"ble-{n}"
        doc["devices"].append(device)  # type: ignore[attr-defined]
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    cfg = load(path, check_files=False)  # shares one certificate: only the split counts
    shares = [[d.id for d in worker_config(cfg, i, 2).devices] for i in range(2)]
    assert shares == [
        ["plc-1", "plc-3", "ble-0", "ble-2", "ble-4"],
        ["plc-2", "plc-4", "ble-1", "ble-3"],
    ]
