"""A device whose identity files cannot work is refused at start, naming the device and why."""

from __future__ import annotations

import datetime as dt
import subprocess
import tomllib
from pathlib import Path

import pytest
from test_config import good

from gateway.config import load, render_toml
from gateway.core.errors import ConfigError
from gateway.testbed.certs import issue_leaf

from conftest import fieldgate, start_hub, start_simulator


def problems(pki_dir: Path, tmp: Path, doc: dict[str, object]) -> list[str]:
    path = tmp / "gateway.toml"
    path.write_text(render_toml(doc))
    with pytest.raises(ConfigError) as refused:
        load(path)
    return refused.value.problems


def device(doc: dict[str, object], index: int) -> dict[str, object]:
    devices = doc["devices"]
    assert isinstance(devices, list)
    entry = devices[index]
    assert isinstance(entry, dict)
    return entry


def leaf(pki_dir: Path, tmp: Path, cn: str, **kwargs: object) -> dict[str, str]:
    cert, key = tmp / f"{cn}.pem", tmp / f"{cn}.key"
    issue_leaf(pki_dir, cert, key, cn=cn, **kwargs)  # type: ignore[arg-type]
    return {"cert": str(cert), "key": str(key)}


def test_a_certificate_that_names_another_device_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    doc = good(pki_dir, tmp_path)
    device(doc, 1).update(leaf(pki_dir, tmp_path, "other-dev"))
    assert problems(pki_dir, tmp_path, doc) == [
        "devices[1].cert: plc-2's certificate has CN 'other-dev', not the device id: IoT Hub "
        "takes the CN as the identity of a CA-signed device (a device registered by "
        'thumbprint: auth = "x509-thumbprint")'
    ]


def test_a_device_registered_by_thumbprint_may_carry_any_cn(pki_dir: Path, tmp_path: Path) -> None:
    doc = good(pki_dir, tmp_path)
    device(doc, 1).update(leaf(pki_dir, tmp_path, "other-dev"), auth="x509-thumbprint")
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    assert load(path).devices[1].auth == "x509-thumbprint"


def test_another_devices_certificate_is_refused_even_by_thumbprint(
    pki_dir: Path, tmp_path: Path
) -> None:
    doc = good(pki_dir, tmp_path)
    device(doc, 0).update(auth="x509-thumbprint")
    device(doc, 2).update(
        auth="x509-thumbprint",
        cert=device(doc, 0)["cert"],
        key=device(doc, 0)["key"],
    )
    assert problems(pki_dir, tmp_path, doc) == [
        "devices[2].cert: plc-3 uses the certificate of devices[0] (plc-1); one identity, "
        "one session: each device needs its own"
    ]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"start": dt.datetime.now(dt.UTC) - dt.timedelta(days=20), "days": 10},
            "devices[0].cert: plc-1's certificate expired on ",
        ),
        (
            {"start": dt.datetime.now(dt.UTC) + dt.timedelta(days=2)},
            "devices[0].cert: plc-1's certificate is not valid before ",
        ),
        (
            {"server": True},
            "devices[0].cert: plc-1's certificate does not allow TLS client authentication",
        ),
    ],
)
def test_a_certificate_that_cannot_authenticate_now_is_refused(
    pki_dir: Path, tmp_path: Path, kwargs: dict[str, object], expected: str
) -> None:
    doc = good(pki_dir, tmp_path)
    device(doc, 0).update(leaf(pki_dir, tmp_path, "plc-1", **kwargs))
    found = problems(pki_dir, tmp_path, doc)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_key_in_the_clear_is_refused_unless_allowed(pki_dir: Path, tmp_path: Path) -> None:
    doc = good(pki_dir, tmp_path)
    files = leaf(pki_dir, tmp_path, "plc-4", encrypt=False)
    device(doc, 3).update(files)
    assert problems(pki_dir, tmp_path, doc) == [
        f"devices[3].key: plc-4's key {files['key']} is in the clear; encrypt it (PKCS#8 "
        "under the passphrase) or set secrets.allow_clear_keys = true"
    ]
    secrets = doc["secrets"]
    assert isinstance(secrets, dict)
    secrets["allow_clear_keys"] = True
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    assert load(path).secrets.allow_clear_keys


def test_a_key_of_another_certificate_refuses_the_start_naming_the_device(
    pki_dir: Path, tmp_path: Path
) -> None:
    doc = good(pki_dir, tmp_path)
    device(doc, 2).update(key=device(doc, 0)["key"])
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    result = subprocess.run(
        fieldgate("run", "--config", str(path)), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "devices[2] (plc-3): the key does not belong to the certificate" in result.stderr
    assert not (tmp_path / "state").exists()


def test_a_device_with_another_devices_cn_is_refused_before_it_delivers_to_nobody(
    procs: list[object], pki_dir: Path, tmp_path: Path
) -> None:
    # The stand-in, like IoT Hub, takes the CN as the identity: its ACL drops every publish of
    # tank-9 under other-dev's name, yet answers PUBACK; the store would delete what was "sent".
    hub_port, record = start_hub(procs, tmp_path, pki_dir)  # type: ignore[arg-type]
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1)  # type: ignore[arg-type]
    doc = tomllib.loads(config.read_text())
    doc["devices"][0].update(id="tank-9", **leaf(pki_dir, tmp_path, "other-dev"))
    config.write_text(render_toml(doc))
    try:
        result = subprocess.run(
            fieldgate("run", "--config", str(config)), capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the gateway started with a certificate that names another device")
    assert result.returncode == 2, result.stderr
    assert "devices[0].cert: tank-9's certificate has CN 'other-dev'" in result.stderr
    assert not record.exists() or not record.read_text().strip()
    assert not (tmp_path / "state").exists()


def test_keys_allowed_in_the_clear_are_named_in_a_warning_at_start(
    pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.app import Gateway

    doc = good(pki_dir, tmp_path)
    device(doc, 3).update(leaf(pki_dir, tmp_path, "plc-4", encrypt=False))
    doc["secrets"] = {**doc["secrets"], "allow_clear_keys": True}  # type: ignore[dict-item]
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    with caplog.at_level("WARNING", logger="fieldgate"):
        _, contexts = Gateway(load(path))._prepare()
    assert len(contexts) == 4
    assert "secrets.allow_clear_keys: 1 device keys are in the clear (plc-4)" in caplog.text
