"""A hub the uplink cannot trust, or that refuses it, leaves one security event per transition,
a log line that says why, and is retried only at the longest backoff."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from fakehub import FakeHub

from gateway.config import HubConfig
from gateway.core.iothub import iothub_username
from gateway.events import SecurityEvents, read_events
from gateway.identity import pki as pki_mod
from gateway.identity.pki import Pki
from gateway.identity.tls import client_context
from gateway.store.memory import MemoryQueue
from gateway.testbed.certs import issue_leaf
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.ports import free_ports
from gateway.uplink.mqtt import MqttClient
from gateway.uplink.session import DeviceSession
from gateway.uplink.throttle import RateLimiter

from conftest import Proc, edit_config, fieldgate, start_simulator, wait_until

NOW = dt.datetime.now(dt.UTC)


def _server(pki_dir: Path, tmp: Path, name: str, **kwargs: Any) -> tuple[Path, Path, bytes]:
    pki = Pki(pki_dir)
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    hub: dict[str, Any] = {"server": True, "days": 30, "names": ["localhost"], "ips": ["127.0.0.1"]}
    issue_leaf(pki_dir, cert, key, **{**hub, **kwargs})
    return cert, key, pki.passphrase()


def _rogue(pki_dir: Path, tmp: Path) -> tuple[Path, Path, bytes]:
    impostor = pki_mod.init(tmp / "impostor", root_name="someone else's root")
    return impostor.server_cert, impostor.server_key, impostor.passphrase()


ATTACKS: dict[str, tuple[Any, dict[str, Any], str, str]] = {
    # name: (certificate maker, server options, cause, words in the log line)
    "rogue-ca": (_rogue, {}, "untrusted", "unable to get local issuer certificate"),
    "expired": (
        lambda d, t: _server(d, t, "expired", start=NOW - dt.timedelta(days=30), until=NOW),
        {},
        "expired",
        "certificate has expired",
    ),
    "not-yet-valid": (
        lambda d, t: _server(d, t, "future", start=NOW + dt.timedelta(days=1)),
        {},
        "not-yet-valid",
        "not yet valid",
    ),
    "wrong-host": (
        lambda d, t: _server(d, t, "other", names=["other.example.net"], ips=[]),
        {},
        "hostname",
        "Hostname mismatch",
    ),
    "wrong-eku": (
        lambda d, t: _server(d, t, "client", server=False),
        {},
        "eku",
        "unsuitable certificate purpose",
    ),
    "tls-1.1-only": (
        lambda d, t: _server(d, t, "old"),
        {
            "tls_min": ssl.TLSVersion.TLSv1_1,
            "tls_max": ssl.TLSVersion.TLSv1_1,
            "ciphers": "DEFAULT:@SECLEVEL=0",
        },
        "protocol",
        "no TLS version in common",
    ),
    "hangs-up-in-handshake": (
        lambda d, t: _server(d, t, "mute"),
        {"hang_up": True},
        "handshake",
        "the server closed the connection",
    ),
}


def _session(
    pki_dir: Path, port: int, events: SecurityEvents, identity: Pki | None = None, **hub: Any
) -> DeviceSession:
    pki = Pki(pki_dir)
    device = identity or pki
    config = HubConfig(
        hostname="localhost",
        address="127.0.0.1",
        port=port,
        ca_file=pki.root_cert,
        connect_timeout=5,
        **hub,
    )
    context = client_context(
        pki.root_cert, device.device_cert("plc-1"), device.device_key("plc-1"), device.passphrase()
    )
    return DeviceSession(
        "plc-1",
        config,
        context,
        MemoryQueue(),
        RateLimiter(0),
        RateLimiter(0),
        on_event=events.record,
    )


async def _until(predicate: Any, task: asyncio.Task[None]) -> None:
    """Wait for ``predicate``: the server runs on a thread of its own, and its counters are
    all there is to watch."""
    async with asyncio.timeout(30):
        while True:
            if predicate():
                return
            assert not task.done(), task
            await asyncio.sleep(0.02)


async def _run_until(session: DeviceSession, done: Any) -> None:
    task = asyncio.create_task(session.run())
    try:
        await _until(done, task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_tls_attack_is_refused_with_one_security_event_naming_its_cause(
    attack: str, pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make, options, cause, words = ATTACKS[attack]
    cert, key, passphrase = make(pki_dir, tmp_path)
    events = SecurityEvents(tmp_path / "state")
    with caplog.at_level(logging.WARNING), FakeHub(cert, key, passphrase, **options) as hub:
        session = _session(pki_dir, hub.port, events, backoff_min=0.01, backoff_max=0.05)
        # Three attempts: the second and third are the same refusal, and record nothing.
        asyncio.run(_run_until(session, lambda: hub.attempts >= 3))
    events.close()
    refused = [e for e in read_events(tmp_path / "state") if e["kind"] == "uplink-refused"]
    assert len(refused) == 1, refused
    assert refused[0]["cause"] == cause and refused[0]["device"] == "plc-1"
    assert refused[0]["endpoint"] == f"127.0.0.1:{hub.port}"
    assert words in refused[0]["reason"] and refused[0]["detail"]
    assert hub.handshakes == 0  # never got as far as MQTT
    down = [r.getMessage() for r in caplog.records if "uplink down" in r.getMessage()]
    assert len(down) == 1 and words in down[0], down
    assert not down[0].rstrip().endswith(":"), down


def test_a_refusal_is_recorded_again_after_a_successful_connection(
    pki_dir: Path, tmp_path: Path
) -> None:
    events = SecurityEvents(tmp_path / "state")
    good = _server(pki_dir, tmp_path, "good")
    bad = _server(pki_dir, tmp_path, "future", start=NOW + dt.timedelta(days=1))

    async def scenario() -> None:
        # Down (refused), up (the same port, now a good certificate), down again.
        with FakeHub(*bad) as first:
            session = _session(pki_dir, first.port, events, backoff_min=0.01, backoff_max=0.05)
            port = first.port
            task = asyncio.create_task(session.run())
            await _until(lambda: first.attempts >= 2, task)
        with FakeHub(*good, port=port) as second:
            await _until(lambda: session.stats.connects >= 1, task)
        with FakeHub(*bad, port=port) as third:
            await _until(lambda: third.attempts >= 2, task)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert second.handshakes >= 1

    asyncio.run(scenario())
    events.close()
    kinds = [e["cause"] for e in read_events(tmp_path / "state") if e["kind"] == "uplink-refused"]
    assert kinds == ["not-yet-valid", "not-yet-valid"]


def test_a_connack_refusal_backs_off_to_the_maximum_and_is_recorded_once(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    cert, key, passphrase = _server(pki_dir, tmp_path, "hub")
    with FakeHub(cert, key, passphrase, connack=5) as hub:
        config, _ = start_simulator(procs, tmp_path, pki_dir, hub.port, 1)
        # Without the long backoff, 10 ms doubling up to 3 s makes about eight attempts in
        # the first four seconds; with it, one at once and then one every 1.5 to 3 s.
        # The hub counts every connection: the gateway's own (audit) session stays off here.
        edit_config(config, hub={"backoff_min": 0.01, "backoff_max": 3.0}, audit={"stream": False})
        gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
        procs.append(gateway)
        state = tmp_path / "state"

        def refused() -> list[dict[str, Any]]:
            return [e for e in read_events(state) if e["kind"] == "uplink-refused"]

        wait_until(lambda: refused() != [], 30, "the refusal recorded")
        first = hub.attempts
        # It still retries: two more attempts after the refusal was recorded.
        wait_until(lambda: hub.attempts >= first + 2, 30, "two more attempts")
        assert gateway.stop() == 0
    # Each retry after a refusal waits at least half of backoff_max (1.5 s): the gaps the
    # server saw. A loaded machine can only make them longer.
    gaps = [b - a for a, b in zip(hub.times[first - 1 :], hub.times[first:], strict=False)]
    assert gaps and min(gaps) >= 1.4, gaps
    (event,) = refused()
    assert event["cause"] == "refused-connack" and event["connack"] == 5
    assert "not authorized" in event["reason"]
    assert gateway.output().count("uplink down") == 1, gateway.output()[-2000:]


def test_uplink_offers_only_aead_suites_and_refuses_a_cbc_only_hub(
    pki_dir: Path, tmp_path: Path
) -> None:
    pki = Pki(pki_dir)
    context = client_context(
        pki.root_cert, pki.device_cert("plc-1"), pki.device_key("plc-1"), pki.passphrase()
    )
    offered = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert offered and all(c["aead"] and c["kea"] == "kx-ecdhe" for c in offered), offered

    cert, key, passphrase = _server(pki_dir, tmp_path, "cbc")
    events = SecurityEvents(tmp_path / "state")
    cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA"
    options: dict[str, Any] = {"tls_max": ssl.TLSVersion.TLSv1_2, "ciphers": cbc}
    with FakeHub(cert, key, passphrase, **options) as hub:
        session = _session(pki_dir, hub.port, events, backoff_min=0.01, backoff_max=0.05)
        asyncio.run(_run_until(session, lambda: hub.attempts >= 2))
    events.close()
    assert hub.handshakes == 0
    refused = [e for e in read_events(tmp_path / "state") if e["kind"] == "uplink-refused"]
    assert [e["cause"] for e in refused] == ["handshake"], refused
    assert "handshake failed" in refused[0]["reason"]


def test_uplink_still_reaches_the_stand_in_over_tls_1_2(pki_dir: Path) -> None:
    pki = Pki(pki_dir)
    context = client_context(
        pki.root_cert, pki.device_cert("plc-1"), pki.device_key("plc-1"), pki.passphrase()
    )
    # TLS 1.3 would not show the TLS 1.2 list at work.
    context.maximum_version = ssl.TLSVersion.TLSv1_2

    async def scenario() -> tuple[str, str] | None:
        port = free_ports(1)
        async with (
            Broker(pki, port=port),
            MqttClient(
                host="127.0.0.1",
                port=port,
                client_id="plc-1",
                ssl_context=context,
                server_hostname="localhost",
                username=iothub_username("localhost", "plc-1"),
                connect_timeout=5,
            ) as client,
        ):
            delivered = client.publish("devices/plc-1/messages/events/a=1", b"x")
            assert delivered is not None
            await asyncio.wait_for(delivered, 5)
            return client.tls_cipher()

    cipher = asyncio.run(scenario())
    assert cipher is not None and cipher[1] == "TLSv1.2" and "GCM" in cipher[0], cipher


def test_gateway_records_an_expired_hub_certificate_once_and_still_stops_cleanly(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    cert, key, passphrase = _server(
        pki_dir, tmp_path, "expired", start=NOW - dt.timedelta(days=30), until=NOW
    )
    with FakeHub(cert, key, passphrase) as hub:
        config, _ = start_simulator(procs, tmp_path, pki_dir, hub.port, 1)
        edit_config(config, hub={"backoff_min": 0.01, "backoff_max": 0.2})
        gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
        procs.append(gateway)
        wait_until(lambda: hub.attempts >= 3, 30, "three attempts at the hub")
        assert gateway.stop() == 0
    refused = [e for e in read_events(tmp_path / "state") if e["kind"] == "uplink-refused"]
    # Once per identity: the device's session, and the gateway's own (its audit stream).
    assert sorted((e["device"], e["cause"]) for e in refused) == [
        ("fieldgate", "expired"),
        ("plc-1", "expired"),
    ], refused
    assert {e["endpoint"] for e in refused} == {f"127.0.0.1:{hub.port}"}
    down = [line for line in gateway.output().splitlines() if "plc-1: uplink down" in line]
    assert len(down) == 1 and down[0].endswith(
        "server certificate refused: certificate has expired"
    )


def test_a_hub_that_refuses_the_devices_certificate_is_recorded_once(
    pki_dir: Path, tmp_path: Path
) -> None:
    # The stand-in trusts only our root; this device's certificate comes from another one.
    stranger = pki_mod.init(tmp_path / "stranger", root_name="another root")
    pki_mod.issue(stranger.root, ["plc-1"])
    events = SecurityEvents(tmp_path / "state")

    async def scenario() -> None:
        port = free_ports(1)
        async with Broker(Pki(pki_dir), port=port):
            session = _session(pki_dir, port, events, stranger, backoff_min=0.01, backoff_max=0.05)
            task = asyncio.create_task(session.run())
            # TLS 1.3: the broker refuses a client certificate after the handshake, by
            # closing the connection before any CONNACK.
            await _until(lambda: session.stats.last_error is not None, task)
            await _until(lambda: len(read_events(tmp_path / "state")) >= 1, task)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    events.close()
    refused = [e for e in read_events(tmp_path / "state") if e["kind"] == "uplink-refused"]
    assert [e["cause"] for e in refused] == ["handshake"], refused
    assert "before its CONNACK" in refused[0]["reason"]
