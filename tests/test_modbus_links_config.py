"""The [[links]] config: link types, units on links, and errors that name file, field and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_config import good

from adapters.modbus.config import RtuLink
from gateway.config import Config, load, render_toml
from gateway.config.loading import validate
from gateway.core.errors import ConfigError
from gateway.workers import worker_config

BASE: dict[str, Any] = {
    "hub": {"hostname": "h", "ca_file": "ca.pem"},
    "sealing": {"keyring": "k.json", "key_id": "k1"},
}
LINKS: list[dict[str, Any]] = [
    {"name": "bus-1", "type": "rtu", "port": "/dev/ttyUSB0", "baud": 9600, "max_registers": 16},
    {"name": "gw", "type": "tcp", "host": "10.0.0.9", "timeout": 0.5},
    {"name": "serial-server", "type": "rtu-over-tcp", "host": "10.0.0.10", "port": 4001},
]


def _device(name: str, **modbus: Any) -> dict[str, Any]:
    return {
        "id": name,
        "cert": "c.pem",
        "key": "k.pem",
        "modbus": modbus,
        "identity": "none",
        "points": [{"name": "p", "address": 0}],
    }


def _config(devices: list[dict[str, Any]], links: list[dict[str, Any]] = LINKS) -> Config:
    return validate({**BASE, "links": links, "devices": devices}, "gw.toml", check_files=False)


def _refused(devices: list[dict[str, Any]], links: list[dict[str, Any]] = LINKS) -> str:
    with pytest.raises(ConfigError) as err:
        _config(devices, links)
    text = str(err.value)
    assert text.startswith("gw.toml: invalid config")
    return text


def test_units_on_links_inherit_the_links_settings() -> None:
    cfg = _config(
        [
            _device("m1", link="bus-1", unit=1),
            _device("m2", link="bus-1", unit=2, max_registers=8),
            _device("g1", link="gw", unit=0),
            _device("g2", link="gw", unit=255),
            _device("own", host="10.0.0.5", unit=3),
        ]
    )
    links = cfg.modbus_links()
    assert [(link.name, [d.id for d in ds]) for link, ds in links] == [
        ("own", ["own"]),
        ("bus-1", ["m1", "m2"]),
        ("gw", ["g1", "g2"]),
    ]
    own, bus, gw = (link for link, _ in links)
    assert gw.label == "tcp 10.0.0.9:502" and gw.timeout == 0.5
    assert own.type == "tcp" and own.label == "tcp 10.0.0.5:502"
    assert isinstance(bus, RtuLink) and bus.parity == "E" and bus.char_bits == 11
    assert bus.gap == pytest.approx(3.5 * 11 / 9600)
    m1, m2 = (d.modbus.on(bus) for d in links[1][1] if d.modbus is not None)
    assert (m1.max_registers, m2.max_registers) == (16, 8)
    assert m1.label == "bus-1/unit 1"
    devices = {d.id: d for d in cfg.devices}
    assert cfg.transport_of(devices["m1"]) == "modbus-rtu"
    assert cfg.transport_of(devices["g1"]) == "modbus-tcp"
    assert cfg.transport_of(devices["own"]) == "modbus-tcp"
    assert devices["g2"].endpoint == "gw/unit 255"


def test_workers_keep_a_links_units_together() -> None:
    cfg = _config(
        [_device(f"m{u}", link="bus-1", unit=u) for u in range(1, 5)]
        + [_device(f"g{u}", link="gw", unit=u) for u in range(1, 5)]
    )
    shares = [worker_config(cfg, i, 2) for i in range(2)]
    assert [sorted(d.id for d in s.devices) for s in shares] == [
        ["m1", "m2", "m3", "m4"],
        ["g1", "g2", "g3", "g4"],
    ]


@pytest.mark.parametrize(
    ("devices", "links", "expected"),
    [
        (
            [_device("a", link="bus-1", unit=0)],
            LINKS,
            "devices[0].modbus.unit: 0 is not a unit id on rtu link 'bus-1' (1 to 247)",
        ),
        (
            [_device("a", link="bus-1", unit=248)],
            LINKS,
            "devices[0].modbus.unit: 248 is not a unit id on rtu link 'bus-1' (1 to 247)",
        ),
        (
            [_device("a", link="bus-1", unit=7), _device("b", link="bus-1", unit=7)],
            LINKS,
            "devices[1].modbus: link 'bus-1' unit 7 is already bound to device 'a'",
        ),
        (
            [_device("a", link="bus-2", unit=1)],
            LINKS,
            "devices[0].modbus.link: no [[links]] entry is named 'bus-2' (links: 'bus-1', 'gw', "
            "'serial-server')",
        ),
        (
            [_device("a", link="gw", host="10.0.0.9")],
            LINKS,
            "devices[0].modbus: give either host (the device's own TCP connection) or link",
        ),
        (
            [_device("a", unit=1)],
            LINKS,
            "devices[0].modbus: give either host",
        ),
        (
            [_device("a", link="gw", port=503)],
            LINKS,
            "devices[0].modbus: port: set on links entry 'gw'",
        ),
        (
            [_device("a", link="gw")],
            [*LINKS, {"name": "gw", "type": "tcp", "host": "x"}],
            "links[3].name: 'gw' is already links[1]",
        ),
        (
            [_device("a", link="gw")],
            [*LINKS, {"name": "bus-2", "type": "rtu", "port": "/dev/ttyUSB0"}],
            "links[3].port: /dev/ttyUSB0 is already links[0] (one serial port is one bus",
        ),
        (
            [_device("a", link="bus-1")],
            [{"name": "bus-1", "type": "rtu", "port": "/dev/ttyS0", "parity": "X"}],
            "links[0].parity: 'X' is not one of 'N', 'E' or 'O'",
        ),
        (
            [_device("a", link="bus-1")],
            [{"name": "bus-1", "type": "rtu", "port": "/dev/ttyS0", "stop_bits": 3}],
            "links[0].stop_bits:",
        ),
        (
            [_device("a", link="bus-1")],
            [{"name": "bus-1", "type": "rs485", "port": "/dev/ttyS0"}],
            "links[0]: type 'rs485' is not one of 'tcp', 'rtu', 'rtu-over-tcp'",
        ),
        (
            [_device("a", link="bus-1")],
            [{"name": "bus-1", "port": "/dev/ttyS0"}],
            "links[0]: type required: one of 'tcp', 'rtu', 'rtu-over-tcp'",
        ),
        (
            [_device("a", link="gw")],
            [{"name": "gw", "type": "tcp", "host": "x", "max_in_flight": 4}],
            "links[0].max_in_flight: 4: a link keeps one connection and pymodbus 3.16 sends one "
            "request at a time",
        ),
        (
            [_device("a", link="gw")],
            [{"name": "gw", "type": "tcp"}],
            "links[0].host: field required",
        ),
    ],
)
def test_bad_links_are_refused_naming_the_field(
    devices: list[dict[str, Any]], links: list[dict[str, Any]], expected: str
) -> None:
    assert expected in _refused(devices, links)


def test_the_documented_example_is_a_valid_config() -> None:
    import re
    import tomllib

    notes = Path(__file__).parent.parent / "docs" / "modbus.md"
    example = re.search(r"```toml\n(.*?)```", notes.read_text(), re.S)
    assert example is not None
    cfg = validate({**BASE, **tomllib.loads(example.group(1))}, "notes", check_files=False)
    by_id = {d.id: d for d in cfg.devices}
    assert cfg.transport_of(by_id["meter-7"]) == "modbus-rtu"
    assert by_id["pump-2"].endpoint == "hall-gateway/unit 2"
    assert [link.name for link, _ in cfg.modbus_links()] == ["bus-1", "hall-gateway"]


def test_a_tcp_links_unit_at_a_devices_own_address_is_refused(
    pki_dir: Path, tmp_path: Path
) -> None:
    """The same device reached twice (its own host, and a unit of a tcp link to that host):
    refused before anything starts, as two devices at one address are."""
    doc = good(pki_dir, tmp_path)
    doc["links"] = [{"name": "gw", "type": "tcp", "host": "localhost", "port": 1503}]
    doc["devices"][1]["modbus"] = {"link": "gw", "unit": 1}
    path = tmp_path / "gateway.toml"
    path.write_text(render_toml(doc))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert (
        "devices[1].modbus: localhost:1503 unit 1 is 127.0.0.1:1503 unit 1, already bound to "
        "device 'plc-1' (both are 127.0.0.1)"
    ) in str(err.value)
    doc["devices"][1]["modbus"] = {"link": "gw", "unit": 2}
    path.write_text(render_toml(doc))
    assert load(path).transport_of(load(path).devices[1]) == "modbus-tcp"


def test_a_point_wider_than_its_links_read_limit_is_refused() -> None:
    device = {
        **_device("a", link="bus-1", unit=1),
        "points": [{"name": "e", "address": 0, "type": "float64"}],
    }
    links = [{**LINKS[0], "max_registers": 2}, *LINKS[1:]]
    with pytest.raises(ConfigError) as refused:
        _config([device], links)
    assert (
        "devices[0].points[0] 'e' (float64) takes 4 registers, more than max_registers = 2"
        in str(refused.value)
    )
    assert "(link 'bus-1')" in str(refused.value)
    # The device's own limit counts before the link's.
    own = {**device, "modbus": {"link": "bus-1", "unit": 1, "max_registers": 4}}
    assert _config([own], links).devices[0].modbus is not None
