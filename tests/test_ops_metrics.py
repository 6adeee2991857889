"""The ops listener against a real run: a Modbus simulator, the hub stand-in (mosquitto), and
`fieldgate run` with ``[metrics]``; scraped over HTTP like Prometheus does, and checked with
Debian's promtool."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_commands_e2e import CONTROL, until_connected, until_up

from gateway.config import render_toml
from gateway.core.readings import Envelope, Header
from gateway.events import read_events
from gateway.identity.keyring import Keyring
from gateway.identity.pki import Pki
from gateway.ops.health import readiness
from gateway.ops.http import parse_head
from gateway.ops.metrics import Latency, ObservedQueue, samples
from gateway.store.memory import MemoryQueue
from gateway.testbed.localhub.control import HubControl
from gateway.testbed.ports import free_ports

from conftest import (
    Proc,
    add_modbus_device,
    edit_config,
    fieldgate,
    opened_from,
    start_hub,
    start_simulator,
    wait_until,
)


def get(port: int, path: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def scrape(port: int) -> dict[str, float]:
    status, body, _ = get(port, "/metrics")
    assert status == 200
    return samples(body.decode())


def delivered_at_hub(record: Path, keyring: Keyring) -> dict[str, int]:
    opened, errors, _ = opened_from(record, keyring)
    assert errors == []
    out: dict[str, int] = defaultdict(int)
    for o in opened:
        out[o.device_id] += len(o.readings)
    return out


DEVICES = ("plc-1", "plc-2")


def with_metrics(config: Path, pki_dir: Path, dead_port: int) -> int:
    """Add ``[metrics]`` on a free port and plc-3, a device nobody answers for, to ``config``."""
    port = free_ports(1)
    edit_config(config, metrics={"listen": f"127.0.0.1:{port}"})
    points = tomllib.loads(config.read_text())["devices"][0]["points"]
    add_modbus_device(config, pki_dir, "plc-3", dead_port, points, timeout=0.3)
    return port


def test_the_metrics_agree_with_the_hub_and_show_a_dead_device_and_a_stopped_hub(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    hub = procs[-1]
    config, simulator = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.2", "--max-age", "0.5"
    )
    port = with_metrics(config, pki_dir, free_ports(1))
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    gateway.wait_for("metrics, /healthz and /readyz on")

    def up(m: dict[str, float], device: str) -> bool:
        return m.get(f'fieldgate_device_state{{device="{device}",state="up"}}') == 1

    wait_until(
        lambda: all(delivered_at_hub(record, keyring).get(d, 0) >= 50 for d in ("plc-1", "plc-2")),
        30,
        "readings at the hub",
    )
    m = scrape(port)
    assert up(m, "plc-1") and up(m, "plc-2")
    assert m['fieldgate_device_state{device="plc-3",state="down"}'] == 1
    assert m['fieldgate_device_state{device="plc-3",state="up"}'] == 0
    assert m['fieldgate_device_reads_total{device="plc-3",outcome="ok"}'] == 0
    assert m['fieldgate_device_readings_delivered_total{device="plc-3"}'] == 0
    assert m['fieldgate_uplink_connected{device="plc-1"}'] == 1
    assert m['fieldgate_uplink_sessions{state="connected"}'] == 3
    assert m['fieldgate_device_verified{device="plc-3"}'] == 0  # identity = "none"
    assert m["fieldgate_uplink_publish_ack_seconds_count"] > 0
    assert m["fieldgate_read_to_hub_seconds_count"] > 0
    assert m["fieldgate_process_resident_memory_bytes"] > 0
    # Each device's last good read is recent; plc-3 was never read: no series for it.
    now = time.time()
    for d in ("plc-1", "plc-2"):
        assert now - 10 < m[f'fieldgate_device_last_read_timestamp_seconds{{device="{d}"}}'] <= now
    assert 'fieldgate_device_last_read_timestamp_seconds{device="plc-3"}' not in m
    # Devices on their own connections share one latency series: every read is a request.
    requests = m['fieldgate_link_request_seconds_count{link="_own"}']
    reads = sum(m[f'fieldgate_device_reads_total{{device="{d}",outcome="ok"}}'] for d in DEVICES)
    assert requests >= reads > 0
    assert m['fieldgate_link_request_seconds_bucket{le="5.0",link="_own"}'] == requests
    assert get(port, "/healthz")[0] == 200
    status, body, _ = get(port, "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "reasons": []})

    # The exposition is valid as Prometheus reads it.
    _, text, _ = get(port, "/metrics")
    promtool_check(text)
    # Prometheus asks for gzip; the same text comes back compressed.
    status, packed, headers = get(port, "/metrics", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"fieldgate_device_state" in gzip.decompress(packed)

    # Stop the simulated devices: plc-1 and plc-2 go down, and once their last envelopes are
    # acknowledged, the delivered counter of each is exactly what the hub's consumer has.
    simulator.stop()
    wait_until(lambda: not up(scrape(port), "plc-1"), 15, "plc-1 down")
    m = scrape(port)
    assert m['fieldgate_device_state{device="plc-1",state="down"}'] == 1
    assert m['fieldgate_device_reads_total{device="plc-1",outcome="failed"}'] > 0

    def settled() -> bool:
        m = scrape(port)
        queued = sum(v for k, v in m.items() if k.startswith("fieldgate_store_envelopes{"))
        at_hub = delivered_at_hub(record, keyring)
        return queued == 0 and all(
            m[f'fieldgate_device_readings_delivered_total{{device="{d}"}}'] == at_hub.get(d, 0)
            for d in ("plc-1", "plc-2")
        )

    wait_until(settled, 15, "delivered counters equal to the hub's readings")
    m = scrape(port)
    at_hub = delivered_at_hub(record, keyring)
    for d in ("plc-1", "plc-2"):
        assert m[f'fieldgate_device_readings_delivered_total{{device="{d}"}}'] == at_hub[d] > 0
        assert m[f'fieldgate_store_readings{{device="{d}"}}'] == 0
        # Everything sealed was delivered: nothing is left in the store.
        assert m[f'fieldgate_device_readings_sealed_total{{device="{d}"}}'] == at_hub[d]

    # The hub goes away: the sessions are down and the gateway is not ready, saying why.
    hub.stop()
    wait_until(lambda: get(port, "/readyz")[0] == 503, 20, "/readyz 503")
    status, body, headers = get(port, "/readyz")
    answer = json.loads(body)
    assert headers["Content-Type"] == "application/json"
    assert answer["ready"] is False
    assert answer["reasons"] == ["uplink: 3 of 3 sessions not connected (plc-1, plc-2, plc-3)"]
    m = scrape(port)
    assert m['fieldgate_uplink_connected{device="plc-1"}'] == 0
    assert m['fieldgate_uplink_sessions{state="disconnected"}'] == 3
    # Each of the three connections was closed by the hub; the retries since found no one.
    reasons = {k: v for k, v in m.items() if k.startswith("fieldgate_uplink_disconnects_total{")}
    assert reasons['fieldgate_uplink_disconnects_total{reason="lost"}'] == 3, reasons
    assert get(port, "/healthz")[0] == 200  # alive all the same

    # It comes back on the same port: ready again.
    start_hub(procs, tmp_path, pki_dir, port=hub_port)
    wait_until(lambda: get(port, "/readyz")[0] == 200, 40, "/readyz 200 again")
    assert scrape(port)['fieldgate_uplink_connects_total{device="plc-1"}'] >= 2

    assert gateway.stop() == 0, gateway.output()[-2000:]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_readings_kept_while_the_hub_is_away_and_commands_by_channel_and_outcome(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    """The gateway starts with no hub: the sessions count why they cannot connect and the
    store's readings are those sealed; the hub comes, the store drains to 0 readings; then
    commands on each channel, counted as their security events say."""
    hub_port = free_ports(1)  # nobody listens here yet
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.2", "--max-age", "0.5"
    )
    doc = tomllib.loads(config.read_text())
    doc["devices"][0]["control"] = CONTROL
    config.write_text(render_toml(doc))
    port = free_ports(1)
    edit_config(config, metrics={"listen": f"127.0.0.1:{port}"})
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    gateway.wait_for("metrics, /healthz and /readyz on")

    def kept() -> bool:
        m = scrape(port)
        return all(
            m.get(f'fieldgate_store_readings{{device="{d}"}}', 0)
            == m[f'fieldgate_device_readings_sealed_total{{device="{d}"}}']
            >= 50
            for d in DEVICES
        )

    wait_until(kept, 30, "readings kept in the store while the hub is away")
    m = scrape(port)
    assert m['fieldgate_uplink_disconnects_total{reason="unreachable"}'] >= 2
    assert not any(k.startswith("fieldgate_uplink_connects_total{") and v for k, v in m.items())

    start_hub(procs, tmp_path, pki_dir, port=hub_port)

    def drained() -> bool:
        m = scrape(port)
        return all(m[f'fieldgate_store_readings{{device="{d}"}}'] == 0 for d in DEVICES) and all(
            m[f'fieldgate_device_readings_delivered_total{{device="{d}"}}'] > 0 for d in DEVICES
        )

    wait_until(drained, 40, "the store drained to the hub")

    async def commands() -> None:
        async with HubControl(
            Pki(pki_dir), "127.0.0.1", hub_port, broker_log=tmp_path / "broker.log"
        ) as hub:
            await until_connected(hub, *DEVICES)
            await until_up(hub, "plc-1")
            written, _ = await hub.invoke("plc-1", "write", {"point": "float32_0", "value": 4.5})
            assert written == 200
            # Not in the device's writes: refused by its policy.
            refused, _ = await hub.invoke("plc-1", "write", {"point": "uint16_2", "value": 1})
            assert refused == 403
            # Not a request at all: refused before any policy.
            malformed, _ = await hub.invoke("plc-1", "write", "not an object")
            assert malformed == 400
            await hub.c2d("plc-1", {"point": "int16_1", "value": 12.3})
            await hub.c2d("plc-1", {"point": "int16_1", "value": 99999})  # cannot hold it
            await hub.desire("plc-1", {"points": {"float32_0": 7.25}})
            async with asyncio.timeout(30):
                while True:  # the gateway's report, in another process's twin: ask again
                    twin = await hub.twin("plc-1")
                    if "float32_0" in twin["reported"].get("points", {}):
                        break
                    await asyncio.sleep(0.2)

    asyncio.run(commands())

    def counted() -> dict[str, float]:
        return {k: v for k, v in scrape(port).items() if k.startswith("fieldgate_commands_total{")}

    # The C2D messages are carried out in the background: wait for both outcomes.
    wait_until(lambda: len([k for k in counted() if 'channel="c2d"' in k]) == 2, 20, "c2d")
    commands_seen = counted()
    assert commands_seen['fieldgate_commands_total{channel="c2d",outcome="accepted"}'] == 1
    assert commands_seen['fieldgate_commands_total{channel="c2d",outcome="failed"}'] == 1
    assert commands_seen['fieldgate_commands_total{channel="method",outcome="refused"}'] == 2
    assert commands_seen['fieldgate_commands_total{channel="twin",outcome="accepted"}'] == 1
    assert commands_seen['fieldgate_commands_total{channel="method",outcome="accepted"}'] >= 1
    _, text, _ = get(port, "/metrics")
    promtool_check(text)
    assert gateway.stop() == 0, gateway.output()[-2000:]
    # The counts are those of the command-* security events, channel by channel.
    events: dict[str, int] = defaultdict(int)
    for e in read_events(tmp_path / "state"):
        if e["kind"].startswith("command-"):
            outcome = e["kind"].removeprefix("command-")
            events[f'fieldgate_commands_total{{channel="{e["channel"]}",outcome="{outcome}"}}'] += 1
    assert commands_seen == events


def promtool_check(text: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is absent: bash scripts/setup installs Debian's prometheus package")
    run = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert run.returncode == 0, (run.stdout + run.stderr).decode()[-3000:]


def test_a_shared_link_shows_its_backed_off_unit_and_bad_requests_are_refused(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    # Three units behind one Modbus TCP gateway (a [[links]] entry); unit 3 never answers.
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 3, "--gateway", "--fault", "3=dead", "--period", "0.2"
    )
    [link] = [entry["name"] for entry in tomllib.loads(config.read_text())["links"]]
    port = free_ports(1)
    edit_config(config, metrics={"listen": f"127.0.0.1:{port}"})
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    gateway.wait_for("metrics, /healthz and /readyz on")

    def backed_off() -> bool:
        m = scrape(port)
        return m.get(f'fieldgate_link_units{{link="{link}",state="backed_off"}}') == 1

    wait_until(backed_off, 20, "unit 3 backed off on the link")
    m = scrape(port)
    assert m[f'fieldgate_link_units{{link="{link}",state="polled"}}'] == 2
    assert m[f'fieldgate_link_reads_total{{link="{link}"}}'] > 0
    assert m[f'fieldgate_link_connect_attempt{{link="{link}"}}'] == 0
    # The link's own latency series: the answered requests are fast on loopback; each of the
    # dead unit's requests waited the whole timeout.
    timeout = tomllib.loads(config.read_text())["links"][0].get("timeout", 1.0)
    hist = f'fieldgate_link_request_seconds_bucket{{le="%s",link="{link}"}}'
    count = m[f'fieldgate_link_request_seconds_count{{link="{link}"}}']
    assert count >= m[f'fieldgate_link_reads_total{{link="{link}"}}'] > 0
    assert m[hist % "0.1"] > 0
    assert count - m[hist % "0.5"] >= 1  # the dead unit's timeout
    assert m[f'fieldgate_link_request_seconds_sum{{link="{link}"}}'] >= timeout
    assert 'fieldgate_link_request_seconds_count{link="_own"}' not in m  # no device of its own
    dead = next(
        d
        for d in ("plc-1", "plc-2", "plc-3")
        if m[f'fieldgate_device_state{{device="{d}",state="down"}}']
    )
    assert m[f'fieldgate_device_reads_total{{device="{dead}",outcome="failed"}}'] > 0

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(data)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    assert raw(b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(b"GET /nothing HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert raw(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n") == b""
    head = raw(b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert get(port, "/healthz")[0] == 200

    # A second gateway cannot take the port (nor the state): the start is refused, naming why.
    other = tmp_path / "other.toml"
    text = config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "state-2"))
    other.write_text(text)
    run = subprocess.run(
        fieldgate("run", "--config", str(other)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}" in run.stderr
    assert gateway.stop() == 0, gateway.output()[-2000:]

    # A listen address that is not HOST:PORT is refused with the file and the field named.
    edit_config(config, metrics={"listen": "9464"})
    run = subprocess.run(
        fieldgate("run", "--config", str(config)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert str(config) in run.stderr and "metrics.listen" in run.stderr
    assert "'9464' is not HOST:PORT" in run.stderr


def test_readiness_names_each_reason() -> None:
    assert readiness(stopping=False, store_problem=None, connected={"a": True}).ready
    state = readiness(
        stopping=True, store_problem="the disk is full", connected={"a": False, "b": True}
    )
    assert not state.ready
    assert state.reasons == [
        "stopping",
        "store: the disk is full",
        "uplink: 1 of 2 sessions not connected (a)",
    ]
    many = readiness(
        stopping=False, store_problem=None, connected={f"d{i:02}": False for i in range(12)}
    )
    assert many.reasons == [
        "uplink: 12 of 12 sessions not connected "
        "(d00, d01, d02, d03, d04, d05, d06, d07, d08, d09, ...)"
    ]
    assert json.loads(many.body()) == {"ready": False, "reasons": many.reasons}


def test_request_heads_are_parsed_strictly() -> None:
    assert parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nAccept-Encoding: gzip") == (
        "GET",
        "/metrics",
        {"accept-encoding": "gzip"},
    )
    assert parse_head(b"GET /metrics") is None
    assert parse_head(b"GET /metrics SPDY/3") is None
    assert parse_head(b"GET / HTTP/1.1\r\nno colon here") is None


def test_the_observed_queue_times_each_envelope_from_lease_to_ack_only() -> None:
    async def go() -> tuple[float, float, float]:
        latency = Latency(CollectorRegistry(auto_describe=False))
        async with MemoryQueue(max_bytes=1 << 20, on_event=lambda *a, **k: None) as memory:
            queue = ObservedQueue(memory, latency)
            read_ms = int(time.time() * 1000) - 2000  # read two seconds ago
            envelopes = [
                Envelope("plc-1", Header(1, "k1", memory.boot_id, seq, 1), b"x", read_ms)
                for seq in range(3)
            ]
            await queue.put(envelopes)
            first = await queue.lease("plc-1", 1)
            queue.ack("plc-1", first[0].lease_id)
            queue.ack("plc-1", first[0].lease_id)  # a second ack of the same lease: once only
            await queue.lease("plc-1", 2)
            queue.release("plc-1")  # the connection was lost: no PUBACK, no observation
            again = await queue.lease("plc-1", 2)
            for item in again:
                queue.ack("plc-1", item.lease_id)
            assert not queue.holds("plc-1") and queue.depth()[0].queued == 0
        puback = latency.puback.collect()[0].samples
        to_hub = latency.read_to_hub.collect()[0].samples
        count = next(s.value for s in puback if s.name.endswith("_count"))
        hub_count = next(s.value for s in to_hub if s.name.endswith("_count"))
        hub_sum = next(s.value for s in to_hub if s.name.endswith("_sum"))
        return count, hub_count, hub_sum

    count, hub_count, hub_sum = asyncio.run(go())
    assert count == hub_count == 3
    assert 6.0 <= hub_sum < 7.0  # three envelopes, each about two seconds after its read


def test_disconnects_are_summed_over_sessions_and_never_fall_when_a_session_ends() -> None:
    """A reload that removes a device ends its session: the sum by reason keeps its counts."""
    from gateway.ops.metrics import GatewayCollector
    from gateway.uplink.session import SessionStats

    def session(**disconnects: int) -> SimpleNamespace:
        return SimpleNamespace(stats=SessionStats(disconnects=dict(disconnects)))

    gw: Any = SimpleNamespace(sessions={"a": session(lost=2), "b": session(lost=1, timeout=1)})
    gw.limiters = {}
    collector = GatewayCollector(gw, {})

    def reasons() -> dict[str, float]:
        [family] = [f for f in collector._uplink(gw) if f.name == "fieldgate_uplink_disconnects"]
        return {s.labels["reason"]: s.value for s in family.samples}

    assert reasons() == {"lost": 3, "timeout": 1}
    gw.sessions["b"].stats.disconnects["lost"] += 1  # after this scrape, before its end
    del gw.sessions["b"]
    assert reasons() == {"lost": 4, "timeout": 1}
    gw.sessions["b"] = session(**{"refused-connack": 1})  # added again: a new session
    assert reasons() == {"lost": 4, "timeout": 1, "refused-connack": 1}
    assert reasons() == {"lost": 4, "timeout": 1, "refused-connack": 1}  # counted once
