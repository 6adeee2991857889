"""Modbus/TCP Security: mutual TLS with a device, the gateway's role in its certificate.

Real handshakes on loopback: the gateway's link (pymodbus's TLS client, through the
transport) against a pymodbus TLS server that requires a client certificate from its CA and
authorizes requests by the role extension. Certificates come from real development PKIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.base import DOWN, UP, DeviceHealth, Evidence
from adapters.modbus.config import ModbusEndpoint, ModbusTls, Point, TcpLink
from adapters.modbus.link import ModbusBus, ModbusLink
from adapters.modbus.security import (
    EXPIRED,
    FINGERPRINT,
    HANDSHAKE,
    NAME_MISMATCH,
    REFUSED_US,
    UNKNOWN_CA,
    TlsRefused,
    client_context,
)
from adapters.modbus.sim.server import TlsDeviceServer, server_context
from gateway import config as config_mod
from gateway.config import render_toml
from gateway.core.errors import ConfigError, PkiError
from gateway.core.readings import GOOD, Scan
from gateway.events import read_events
from gateway.identity import pki as pki_mod
from gateway.identity.keyring import Keyring
from gateway.testbed.certs import issue_leaf
from gateway.testbed.simconfig import device_files, skeleton

from conftest import (
    Proc,
    fieldgate,
    free_ports,
    opened_from,
    start_hub,
    start_simulator,
    wait_until,
)

UNIT = 1
POINTS = [
    Point(name="flow", address=3, table="holding", type="uint16", period=0.05),
    Point(name="level", address=7, table="holding", type="uint16", period=0.05),
]
EXPECTED = {"flow": 103, "level": 107}  # the simulated device holds 100 + address


async def _registers(_fc: int, _addr: int, _count: int, registers: list[int], _w: bool) -> None:
    registers[:] = [100 + i for i in range(len(registers))]


@dataclass
class Plant:
    """Two development PKIs: the plant's (gateway and its devices) and another's."""

    root: Path
    other: Path
    tmp: Path

    @property
    def passphrase(self) -> bytes:
        return pki_mod.Pki(self.root).passphrase()

    def device_cert(self, name: str, *, other_ca: bool = False, **kw: Any) -> tuple[Path, Path]:
        cert, key = self.tmp / f"{name}.pem", self.tmp / f"{name}.key"
        issue_leaf(
            self.other if other_ca else self.root,
            cert,
            key,
            cn=name,
            server=True,
            ips=["127.0.0.1"],
            encrypt=False,  # the device's side: a key of its own PKI, no passphrase at hand
            **kw,
        )
        return cert, key


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Plant:
    base = tmp_path_factory.mktemp("mbtls")
    root, other = base / "plant", base / "other"
    pki_mod.init(root)
    pki_mod.init(other, root_name="someone else's root")
    pki_mod.issue(root, ["gw-operator"], modbus_role="operator")
    pki_mod.issue(root, ["gw-viewer"], modbus_role="viewer")
    pki_mod.issue(root, ["gw-norole"])
    pki_mod.issue(other, ["gw-stranger"], modbus_role="operator")
    (base / "certs").mkdir()
    return Plant(root, other, base / "certs")


@dataclass
class Outcome:
    scans: list[Scan] = field(default_factory=list)
    events: list[tuple[str, str | None, str, dict[str, Any]]] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    health: DeviceHealth = field(default_factory=lambda: DeviceHealth("plc-tls"))
    attempts: int = 0
    refusals: int = 0
    roles_seen: list[str | None] = field(default_factory=list)

    def kinds(self, kind: str) -> list[tuple[str, str | None, str, dict[str, Any]]]:
        return [e for e in self.events if e[0] == kind]


def _run(
    plant: Plant,
    *,
    gateway: str = "gw-operator",
    device: tuple[Path, Path] | None = None,
    fingerprint: str | None = None,
    server_ctx: ssl.SSLContext | None = None,
    until: str = "scans",
    attempts: int = 3,
    gateway_pki: Path | None = None,
    port: int | None = None,
    server_name: str | None = None,
    shared: bool = False,
) -> Outcome:
    """A TLS device allowing role ``operator`` and a link to it, until the link delivered
    scans of every point (``until="scans"``), or has made ``attempts`` connections
    (``"attempts"``), or the device refused requests (``"refusals"``). With ``port``, the
    device is one already listening there (another TLS stack). ``shared``: the device is a
    unit of a configured ``tcp`` link with the ``tls`` table (one task for the link)."""
    cert, key = device or plant.device_cert("plc-tls")
    issuer = pki_mod.Pki(gateway_pki or plant.root)
    gw_cert, gw_key = issuer.device_cert(gateway), issuer.device_key(gateway)
    tls = ModbusTls(
        ca=plant.root / "root.pem",
        cert=gw_cert,
        key=gw_key,
        fingerprint=fingerprint,
        server_name=server_name,
    )
    external = port is not None
    port = port or free_ports(1)
    endpoint = ModbusEndpoint(host="127.0.0.1", port=port, unit=UNIT, timeout=2.0, tls=tls)
    out = Outcome()
    sslctx = server_ctx or server_context(cert, key, None, plant.root / "root.pem")

    def admit(evidence: Evidence) -> None:
        out.evidence.append(evidence)

    def on_event(kind: str, device_id: str | None, reason: str, **fields: Any) -> None:
        out.events.append((kind, device_id, reason, fields))

    async def main() -> None:
        server = TlsDeviceServer(
            "127.0.0.1", port, UNIT, 64, _registers, sslctx=sslctx, roles=frozenset({"operator"})
        )
        async with contextlib.nullcontext() if external else server:
            tls_gw = TcpLink(name="tls-gw", type="tcp", host="127.0.0.1", port=port, tls=tls)
            link = ModbusLink(
                "plc-tls",
                ModbusEndpoint(link="tls-gw", unit=UNIT).on(tls_gw) if shared else endpoint,
                POINTS,
                out.scans.append,
                admit,
                out.health,
                backoff_min=0.05,
                backoff_max=0.2,
                on_event=on_event,
                tls_context=client_context(tls, issuer.passphrase()),
            )
            context = client_context(tls, issuer.passphrase())
            runner = (
                ModbusBus(tls_gw, [link], backoff_min=0.05, backoff_max=0.2, tls_context=context)
                if shared
                else link
            )
            task = asyncio.create_task(runner.run(), name="poll[plc-tls]")

            def done() -> bool:
                if until == "scans":
                    got = {n for s in out.scans if s.quality == GOOD for n in s.names}
                    return got >= set(EXPECTED)
                if until == "refusals":
                    return server.refusals >= 3
                return link.attempt >= attempts

            try:
                async with asyncio.timeout(15):
                    # What is awaited lives in the link and the server, which signal nothing.
                    while not done():  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
            finally:
                out.attempts = link.attempt
                out.refusals = server.refusals
                out.roles_seen = list(server.roles_seen)
                task.cancel("the test is over")
                with pytest.raises(asyncio.CancelledError):
                    await task

    asyncio.run(main())
    return out


def _der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificates(pem.read_bytes())[0].public_bytes(Encoding.DER)


# -- served -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["own-host", "tcp-link-with-tls"])
def test_the_right_role_is_served_and_readings_arrive_with_the_devices_values(
    plant: Plant, shared: bool
) -> None:
    device = plant.device_cert("plc-served")
    pin = hashlib.sha256(_der(device[0])).hexdigest()
    out = _run(plant, device=device, fingerprint=pin, shared=shared)
    values = {
        n: v for s in out.scans if s.quality == GOOD for n, v in zip(s.names, s.values, strict=True)
    }
    assert values == EXPECTED
    assert out.health.state == UP
    assert out.refusals == 0 and out.roles_seen == ["operator"]
    assert not out.kinds("modbus-tls-refused") and not out.kinds("modbus-role-refused")
    # What the device proved goes with the admission (recorded in its event).
    facts = out.evidence[0].fingerprint
    assert facts["tls_peer_sha256"] == hashlib.sha256(_der(device[0])).hexdigest()
    assert facts["tls_version"] in ("TLSv1.2", "TLSv1.3")


def test_a_configured_server_name_is_checked_against_the_device_certificate(
    plant: Plant,
) -> None:
    named = plant.device_cert("plc-named", names=["plc-7.plant.example"])
    served = _run(plant, device=named, server_name="plc-7.plant.example")
    assert served.health.state == UP and served.roles_seen == ["operator"]

    out = _run(plant, device=named, server_name="plc-8.plant.example", until="attempts")
    _refused_once(out, NAME_MISMATCH, "does not name tls.server_name")


# -- refused at the TLS layer: one event per transition, not per retry ------------------------


def _refused_once(out: Outcome, check: str, words: str) -> str:
    assert out.attempts >= 3, "the link keeps retrying with backoff"
    assert not out.scans and not out.evidence, "nothing of a refused device is admitted"
    assert out.health.state == DOWN and f"TLS refused ({check})" in (out.health.last_error or "")
    refused = out.kinds("modbus-tls-refused")
    assert len(refused) == 1, refused  # once for the transition, not once per attempt
    _kind, device_id, reason, fields = refused[0]
    assert device_id == "plc-tls" and fields["check"] == check
    assert fields["endpoint"].startswith("127.0.0.1:")
    assert words in reason, reason
    return reason


def test_a_device_certificate_from_another_ca_is_refused_and_recorded(plant: Plant) -> None:
    out = _run(plant, device=plant.device_cert("plc-other", other_ca=True), until="attempts")
    _refused_once(out, UNKNOWN_CA, "not issued by tls.ca")
    assert out.roles_seen == []  # the device never saw a request


def test_an_expired_device_certificate_is_refused_and_recorded(plant: Plant) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = plant.device_cert(
        "plc-expired", start=now - dt.timedelta(days=30), until=now - dt.timedelta(days=1)
    )
    out = _run(plant, device=expired, until="attempts")
    _refused_once(out, EXPIRED, "has expired")


def test_a_device_whose_certificate_is_not_the_pinned_one_is_refused_and_recorded(
    plant: Plant,
) -> None:
    # Same CA, valid, but another device's certificate: only the pin tells them apart.
    pinned = hashlib.sha256(_der(plant.device_cert("plc-pinned")[0])).hexdigest()
    impostor = plant.device_cert("plc-impostor")
    out = _run(plant, device=impostor, fingerprint=pinned, until="attempts")
    reason = _refused_once(out, FINGERPRINT, "not the pinned")
    seen = hashlib.sha256(_der(impostor[0])).hexdigest()
    assert seen.upper()[:2] + ":" in reason and pinned.upper()[:2] in reason


def test_a_device_offering_only_cbc_suites_on_tls12_is_refused(plant: Plant) -> None:
    cert, key = plant.device_cert("plc-weak")
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA")  # no forward-secret AEAD suite
    weak.verify_mode = ssl.CERT_REQUIRED
    weak.load_verify_locations(cafile=str(plant.root / "root.pem"))
    weak.load_cert_chain(str(cert), str(key))
    out = _run(plant, device=(cert, key), server_ctx=weak, until="attempts")
    _refused_once(out, HANDSHAKE, "TLS handshake failed")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_device_that_refuses_our_certificate_is_recorded_once(
    plant: Plant, tmp_path: Path
) -> None:
    """Another TLS stack as the device (OpenSSL's s_server), trusting only the plant's CA;
    the gateway presents a certificate of someone else's. On TLS 1.3 the device's refusal
    (an alert) comes after our side of the handshake is done, at the first request."""
    cert, key = plant.device_cert("plc-openssl")
    port = free_ports(1)
    log = tmp_path / "s_server.log"
    with log.open("wb") as output:
        # stdin stays open: s_server ends its session at EOF on its input.
        device = subprocess.Popen(
            [
                "openssl", "s_server", "-accept", str(port), "-naccept", "100",
                "-cert", str(cert), "-cert_chain", str(cert), "-key", str(key),
                "-CAfile", str(plant.root / "root.pem"), "-Verify", "1", "-verify_return_error",
            ],
            stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "ACCEPT" in log.read_text(), 10, "s_server to listen")
        out = _run(
            plant, gateway="gw-stranger", gateway_pki=plant.other, port=port, until="attempts"
        )
    finally:
        device.kill()
        device.wait(10)
        assert device.stdin is not None
        device.stdin.close()
    refused = out.kinds("modbus-tls-refused")
    assert len(refused) == 1, refused
    _kind, _device, reason, fields = refused[0]
    assert fields["check"] == REFUSED_US
    assert "did not accept the gateway's certificate" in reason and "UNKNOWN_CA" in reason
    assert not out.scans and out.health.state == DOWN
    assert "certificate verify failed" in log.read_text()


# -- refused by the device's authorization: exception 01 --------------------------------------


@pytest.mark.parametrize(("gateway", "role"), [("gw-norole", None), ("gw-viewer", "viewer")])
def test_a_missing_or_wrong_role_is_answered_illegal_function_and_recorded(
    plant: Plant, gateway: str, role: str | None
) -> None:
    out = _run(plant, gateway=gateway, until="refusals")
    assert out.roles_seen and set(out.roles_seen) == {role}
    assert out.refusals >= 3
    assert not [s for s in out.scans if s.quality == GOOD], "no reading from refused requests"
    refused = out.kinds("modbus-role-refused")
    # One block (both points coalesce into one read): one event, however often it is refused.
    assert len(refused) == 1, refused
    _kind, device_id, reason, fields = refused[0]
    assert device_id == "plc-tls" and "exception 0x01" in reason and "role" in reason
    assert (fields["table"], fields["address"]) == ("holding", 3)
    assert not out.kinds("modbus-tls-refused")  # the handshake itself passed


# -- the gateway's certificate ----------------------------------------------------------------


def test_pki_issue_modbus_role_puts_the_role_extension_in_a_client_certificate(
    tmp_path: Path,
) -> None:
    env = {"FIELDGATE_KEY_PASSPHRASE": "correct horse battery", "PATH": "/usr/bin:/bin"}
    root = tmp_path / "pki"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(fieldgate(*args), env=env, capture_output=True, text=True, timeout=60)

    assert run("pki", "init", "--dir", str(root)).returncode == 0
    made = run("pki", "issue", "--dir", str(root), "--modbus-role", "operator", "gw-1")
    assert made.returncode == 0, made.stderr
    assert "Modbus role 'operator'" in made.stdout
    cert = x509.load_pem_x509_certificates((root / "devices" / "gw-1.pem").read_bytes())[0]
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.50316.802.1"))
    assert ext.critical is False
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x0c\x08operator"  # DER UTF8String, 8 octets
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki_mod.modbus_role(cert) == "operator"

    # Without the option, no role; a role with control characters is refused, nothing issued.
    assert run("pki", "issue", "--dir", str(root), "gw-2").returncode == 0
    plain = x509.load_pem_x509_certificates((root / "devices" / "gw-2.pem").read_bytes())[0]
    assert pki_mod.modbus_role(plain) is None
    bad = run("pki", "issue", "--dir", str(root), "--modbus-role", "a\tb", "gw-3")
    assert bad.returncode == 2 and "--modbus-role" in bad.stderr
    assert not (root / "devices" / "gw-3.pem").exists()

    openssl = shutil.which("openssl")
    if openssl is not None:
        text = subprocess.run(
            [openssl, "x509", "-noout", "-text", "-in", str(root / "devices" / "gw-1.pem")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after = text.split("1.3.6.1.4.1.50316.802.1:", 1)[1].splitlines()
        assert "operator" in after[1], text
        assert "TLS Web Client Authentication" in text


def test_a_malformed_role_extension_is_an_error_not_a_guess() -> None:
    for value in (b"", b"\x13\x08operator", b"\x0c\x09operator", b"\x0c\x81\x08operator"):
        with pytest.raises(PkiError, match="not a DER UTF8String"):
            pki_mod._utf8string(value)
    long_role = "r" * 128
    assert pki_mod._utf8string(pki_mod.modbus_role_der(long_role)) == long_role


# -- through the gateway: config, preflight, `fieldgate run` ----------------------------------


def _tls_device(
    pki_dir: Path, tmp: Path, device_id: str, port: int, tls: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": device_id,
        **device_files(pki_dir, device_id),
        "modbus": {"host": "127.0.0.1", "port": port, "unit": UNIT, "tls": tls},
        "identity": "none",
        "points": [{"name": p.name, "address": p.address, "period": 0.1} for p in POINTS],
    }


@pytest.fixture(scope="module")
def gateway_identity(pki_dir: Path) -> tuple[Path, Path]:
    """The gateway's Modbus client identity in the shared development PKI (role operator)."""
    name = "fieldgate-modbus-client"
    if not pki_mod.existing(pki_dir, [name]):
        pki_mod.issue(pki_dir, [name], modbus_role="operator")
    p = pki_mod.Pki(pki_dir)
    return p.device_cert(name), p.device_key(name)


def _config(tmp: Path, pki_dir: Path, devices: list[dict[str, Any]], hub_port: int = 1) -> Path:
    doc = skeleton(pki_dir=pki_dir, hub_port=hub_port, state_dir=tmp / "state", max_age=0.3)
    doc["devices"] = devices
    path = tmp / "gateway.toml"
    path.write_text(render_toml(doc))
    return path


def _relative_tls(tmp: Path, pki_dir: Path, identity: tuple[Path, Path]) -> dict[str, str]:
    """The device's CA and the gateway's identity copied beside the config, named relatively."""
    (tmp / "tls").mkdir(exist_ok=True)
    for src, name in (
        (pki_dir / "root.pem", "ca.pem"),
        (identity[0], "gw.pem"),
        (identity[1], "gw.key"),
    ):
        shutil.copy(src, tmp / "tls" / name)
    (tmp / "tls" / "gw.key").chmod(0o600)
    return {"ca": "tls/ca.pem", "cert": "tls/gw.pem", "key": "tls/gw.key"}


def test_tls_config_paths_are_relative_to_the_config_and_bad_values_name_their_field(
    tmp_path: Path, pki_dir: Path, gateway_identity: tuple[Path, Path]
) -> None:
    tls = _relative_tls(tmp_path, pki_dir, gateway_identity)
    path = _config(tmp_path, pki_dir, [_tls_device(pki_dir, tmp_path, "plc-1", 802, tls)])
    cfg = config_mod.load(path)
    loaded = cfg.devices[0].modbus
    assert loaded is not None and loaded.tls is not None and loaded.port == 802
    assert loaded.tls.ca == tmp_path / "tls" / "ca.pem" and loaded.tls.key.is_absolute()

    def refused(tls: dict[str, Any]) -> str:
        bad = _config(tmp_path, pki_dir, [_tls_device(pki_dir, tmp_path, "plc-1", 802, tls)])
        with pytest.raises(ConfigError) as err:
            config_mod.load(bad)
        return str(err.value)

    assert "devices[0].modbus.tls.fingerprint: a SHA-256 fingerprint is 64 hex digits" in refused(
        {**tls, "fingerprint": "12:34"}
    )
    assert "devices[0].modbus.tls.ca: file not found" in refused({**tls, "ca": "tls/none.pem"})
    assert "devices[0].modbus.tls.sever_name: unknown field" in refused(
        {**tls, "sever_name": "plc"}
    )
    (tmp_path / "tls" / "gw.key").chmod(0o644)
    assert "devices[0].modbus.tls.key: " in refused(tls) and "chmod 600" in refused(tls)
    (tmp_path / "tls" / "gw.key").chmod(0o600)

    # The gateway's identity itself: a role, and a key encrypted at rest.
    p = pki_mod.Pki(pki_dir)
    shutil.copy(p.device_cert("plc-2"), tmp_path / "tls" / "norole.pem")
    why = refused({**tls, "cert": "tls/norole.pem"})
    assert "devices[0].modbus.tls.cert: " in why and "carries no Modbus role" in why
    clear = tmp_path / "tls" / "clear.key"
    clear.write_bytes(pki_mod.decrypted_key_pem(gateway_identity[1], p.passphrase()))
    clear.chmod(0o600)
    why = refused({**tls, "key": "tls/clear.key"})
    assert "devices[0].modbus.tls.key: " in why and "in the clear" in why


def test_the_gateway_delivers_a_tls_device_and_records_a_refused_one(
    tmp_path: Path,
    pki_dir: Path,
    keyring: Keyring,
    gateway_identity: tuple[Path, Path],
    procs: list[Proc],
) -> None:
    """`fieldgate run` with two Modbus/TCP Security devices: plc-3's readings reach the hub
    with the device's values; plc-4's certificate has expired, so it is refused, recorded
    once, and costs plc-3 nothing."""
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    now = dt.datetime.now(dt.UTC)
    good, expired = (
        (tmp_path / "good.pem", tmp_path / "good.key"),
        (
            tmp_path / "old.pem",
            tmp_path / "old.key",
        ),
    )
    issue_leaf(pki_dir, *good, cn="plc-3", server=True, ips=["127.0.0.1"], encrypt=False)
    issue_leaf(
        pki_dir,
        *expired,
        cn="plc-4",
        server=True,
        ips=["127.0.0.1"],
        encrypt=False,
        start=now - dt.timedelta(days=30),
        until=now - dt.timedelta(days=1),
    )
    ports = free_ports(2)
    tls = _relative_tls(tmp_path, pki_dir, gateway_identity)
    config = _config(
        tmp_path,
        pki_dir,
        [
            _tls_device(pki_dir, tmp_path, "plc-3", ports, tls),
            _tls_device(pki_dir, tmp_path, "plc-4", ports + 1, tls),
        ],
        hub_port,
    )
    servers = [
        TlsDeviceServer(
            "127.0.0.1",
            port,
            UNIT,
            64,
            _registers,
            sslctx=server_context(*files, None, pki_dir / "root.pem"),
            roles=frozenset({"operator"}),
        )
        for port, files in ((ports, good), (ports + 1, expired))
    ]
    with _serving(servers):
        gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
        procs.append(gateway)

        def delivered() -> list[Any]:
            opened, _, _ = opened_from(record, keyring)
            return [r for o in opened if o.device_id == "plc-3" for r in o.readings]

        wait_until(lambda: len(delivered()) >= 20, 40, "plc-3's readings at the hub")
        assert gateway.stop() == 0, gateway.output()[-2000:]
    readings = delivered()
    assert {r.point: r.value for r in readings} == EXPECTED
    opened, errors, _ = opened_from(record, keyring)
    assert errors == [] and {o.device_id for o in opened} == {"plc-3"}
    assert servers[0].roles_seen[:1] == ["operator"] and servers[0].refusals == 0

    events = read_events(tmp_path / "state")
    admitted = [e for e in events if e["kind"] == "device-admitted" and e["device"] == "plc-3"]
    # What the device proved at the handshake is recorded with its admission.
    assert admitted and admitted[0]["tls_peer_sha256"] == hashlib.sha256(_der(good[0])).hexdigest()
    assert admitted[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    refused = [e for e in events if e["kind"] == "modbus-tls-refused"]
    assert [e["device"] for e in refused] == ["plc-4"], refused
    assert refused[0]["check"] == EXPIRED and "has expired" in refused[0]["reason"]
    assert not [e for e in events if e["device"] == "plc-4" and e["kind"] == "device-admitted"]


@contextlib.contextmanager
def _serving(servers: list[TlsDeviceServer]) -> Iterator[None]:
    """The devices on their own event loop in a thread, while the gateway runs as a process."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def serve() -> None:
        nonlocal stop
        stop = loop.create_future()
        async with contextlib.AsyncExitStack() as stack:
            for server in servers:
                await stack.enter_async_context(server)
            started.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the TLS devices did not start"
    try:
        yield
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()


def test_simulate_modbus_with_tls_roles_serves_devices_the_gateway_delivers(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    """`fieldgate simulate modbus --tls-roles operator --write-config` issues what both sides
    need; the config it writes runs as is, over Modbus/TCP Security."""
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _sim = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--tls-roles", "operator", "--period", "0.2"
    )
    cfg = config_mod.load(config)
    for device in cfg.devices:
        assert device.modbus is not None and device.modbus.tls is not None
        assert device.modbus.tls.ca == pki_dir / "root.pem"
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)

    def devices() -> set[str]:
        opened, _, _ = opened_from(record, keyring)
        return {o.device_id for o in opened if o.readings}

    wait_until(lambda: devices() == {d.id for d in cfg.devices}, 40, "both devices' readings")
    assert gateway.stop() == 0, gateway.output()[-2000:]
    events = read_events(tmp_path / "state")
    admitted = [e for e in events if e["kind"] == "device-admitted"]
    assert len(admitted) == 2 and all(len(e["tls_peer_sha256"]) == 64 for e in admitted)
    assert not [e for e in events if e["kind"].startswith("modbus-")]


def test_a_different_tls_refusal_is_a_new_event() -> None:
    from adapters.modbus.link import ModbusLink

    events: list[tuple[Any, ...]] = []

    async def go() -> None:
        link = ModbusLink(
            "plc",
            ModbusEndpoint(host="h", port=802),
            [],
            lambda _s: None,
            lambda _e: None,
            DeviceHealth("plc"),
            on_event=lambda *a, **f: events.append((a, f)),
        )
        link.tls_refused(TlsRefused("plc", "h:802", "expired", "the certificate has expired"))
        link.tls_refused(TlsRefused("plc", "h:802", "expired", "the certificate has expired"))
        link.tls_refused(TlsRefused("plc", "h:802", "fingerprint", "not the pinned certificate"))

    asyncio.run(go())
    assert [f["check"] for _a, f in events] == ["expired", "fingerprint"], events
