"""Batches fill IoT Hub's 4 KB unit without passing it; envelopes refuse every tampering."""

from __future__ import annotations

import base64
import math
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from gateway.consumer import Opened, SequenceTracker, open_message
from gateway.core.batcher import Batch, Batcher
from gateway.core.envelope import Sealer, open_envelope
from gateway.core.errors import EnvelopeError, KeyringError
from gateway.core.iothub import telemetry_topic
from gateway.core.pipeline import PipelineStep
from gateway.core.readings import Envelope, Header, Scan
from gateway.identity.keyring import Keyring, write_new
from gateway.identity.keyring import load as load_keyring

from conftest import fieldgate

KEY = os.urandom(32)
RING = Keyring({"k1": KEY})
NAMES = tuple(f"temperature_{i}" for i in range(60))


def scan(device: str, t: int) -> Scan:
    values = [round(20 + 5 * math.sin(t / 7 + i), 4) for i in range(60)]
    return Scan(device, 1_700_000_000_000 + t * 100, NAMES, values)


def step(max_bytes: int = 4000, max_age: float = 3600, boot: str = "boot1") -> PipelineStep:
    """The gateway's own pipeline step (gate -> batcher -> sealer), every device admitted."""
    return PipelineStep(
        Batcher(max_bytes, max_age), Sealer(KEY, "k1", boot, max_bytes), lambda _device: True
    )


def sealed_stream(max_bytes: int, scans: int) -> list[Envelope]:
    pipeline = step(max_bytes)
    envelopes = []
    for t in range(scans):
        out = pipeline.add(scan("dev", t), float(t), float(t))
        assert out is not None
        envelopes += out.envelopes
    return envelopes


@pytest.mark.parametrize("max_bytes", [4000, 16000])
def test_batches_fill_the_meter_unit_without_passing_it(max_bytes: int) -> None:
    envelopes = sealed_stream(max_bytes, 6000)
    sizes = [e.size for e in envelopes]
    assert max(sizes) <= max_bytes
    # After the first few batches teach the batcher the ratio, units are well filled.
    steady = sizes[5:]
    assert sum(steady) / len(steady) >= 0.85 * max_bytes


def test_sequence_numbers_are_contiguous_across_envelopes() -> None:
    envelopes = sealed_stream(4000, 500)
    expected = 0
    for e in envelopes:
        assert e.header.first_seq == expected
        expected += e.header.count


def test_batch_closes_at_its_age_deadline() -> None:
    batcher = Batcher(4000, max_age=1.0)
    _, opened = batcher.add(scan("d", 0), now=10.0)
    assert opened and batcher.deadline("d") == 11.0
    _, opened = batcher.add(scan("d", 1), now=10.5)
    assert not opened
    batch = batcher.take("d")
    assert batch is not None and batch.count == 120
    assert batcher.take("d") is None


def test_the_step_arms_a_deadline_when_a_batch_opens_and_seals_it_at_expiry() -> None:
    pipeline = step(max_age=1.0)
    first = pipeline.add(scan("d", 0), 10.0, 10.2)
    assert first is not None and first.envelopes == [] and first.arm == 11.0
    second = pipeline.add(scan("d", 1), 10.5, 10.6)
    assert second is not None and second.envelopes == [] and second.arm is None
    expired = pipeline.expire("d", 11.0)
    assert [e.header.count for e in expired.envelopes] == [120]
    assert expired.arm is None
    assert pipeline.expire("d", 12.0).envelopes == []
    assert pipeline.readings == 120


def test_a_device_the_gate_has_not_admitted_takes_nothing_in() -> None:
    pipeline = PipelineStep(
        Batcher(4000, 1.0), Sealer(KEY, "k1", "b", 4000), lambda device: device == "in"
    )
    assert pipeline.add(scan("out", 0), 0.0, 0.0) is None
    assert pipeline.add(scan("in", 0), 0.0, 0.0) is not None
    assert pipeline.readings == 60
    assert [e.device_id for e in pipeline.flush()] == ["in"]


def _one() -> tuple[Header, bytes]:
    batcher = Batcher(4000, 1.0)
    sealer = Sealer(KEY, "k1", "b0", 4000, next_seq={"dev-a": 500})
    batcher.add(scan("dev-a", 1), 0.0)
    batch = batcher.take("dev-a")
    assert batch is not None
    [env] = sealer.seal(batch).envelopes
    return env.header, env.body


def test_envelope_opens_to_the_readings_that_went_in() -> None:
    header, body = _one()
    readings = open_envelope("dev-a", header, body, RING)
    assert [r.seq for r in readings] == list(range(500, 560))
    assert readings[3].point == "temperature_3"
    assert readings[3].value == scan("dev-a", 1).values[3]
    assert {r.quality for r in readings} == {"good"}


@pytest.mark.parametrize("position", [0, 5, 12, 30, -17, -1])
def test_a_flipped_body_byte_is_refused(position: int) -> None:
    header, body = _one()
    broken = bytearray(body)
    broken[position] ^= 0x01
    with pytest.raises(EnvelopeError, match="authentication failed"):
        open_envelope("dev-a", header, bytes(broken), RING)


@pytest.mark.parametrize(
    "change",
    [
        {"first_seq": 501},
        {"count": 59},
        {"boot_id": "b1"},
        {"key_id": "k2"},
    ],
)
def test_a_changed_header_is_refused(change: dict[str, object]) -> None:
    header, body = _one()
    fields = {f: getattr(header, f) for f in Header.__slots__}
    fields.update(change)
    ring = Keyring({"k1": KEY, "k2": KEY})
    with pytest.raises(EnvelopeError, match="authentication failed"):
        open_envelope("dev-a", Header(**fields), body, ring)  # type: ignore[arg-type]


def test_an_envelope_moved_to_another_device_is_refused() -> None:
    header, body = _one()
    with pytest.raises(EnvelopeError, match="authentication failed"):
        open_message(telemetry_topic("dev-b", header), body, RING)
    assert len(open_message(telemetry_topic("dev-a", header), body, RING).readings) == 60


def test_unknown_key_and_garbage_are_refused_cleanly() -> None:
    header, body = _one()
    with pytest.raises(EnvelopeError, match="not in the keyring"):
        open_envelope("dev-a", header, body, Keyring({}))
    with pytest.raises(EnvelopeError, match="too short"):
        open_envelope("dev-a", header, b"xx", RING)
    with pytest.raises(EnvelopeError, match="missing"):
        open_message("devices/dev-a/messages/events/fg-v=1", body, RING)


def test_tracker_counts_duplicates_and_gaps() -> None:
    pipeline = step(boot="b")
    opened = []
    for t in range(3):
        pipeline.add(scan("d", t), 0.0, 0.0)
        [env] = pipeline.expire("d", 0.0).envelopes
        opened.append(open_message(telemetry_topic("d", env.header), env.body, RING))
    tracker = SequenceTracker()
    assert len(tracker.add(opened[0])) == 60
    assert len(tracker.add(opened[2])) == 60
    assert tracker.gaps() == {("d", "b"): [(60, 120)]}
    assert tracker.add(opened[0]) == []  # redelivered after a reconnect
    assert len(tracker.add(opened[1])) == 60
    assert tracker.gaps() == {} and tracker.duplicates == 60
    assert tracker.unique_readings() == 180


def test_reused_sequence_numbers_with_other_content_are_a_conflict_not_duplicates() -> None:
    def sealed(first_value: int, next_seq: dict[str, int]) -> list[Opened]:
        batcher = Batcher(4000, 3600)
        sealer = Sealer(KEY, "k1", "b", 4000, next_seq)
        out = []
        for t in range(first_value, first_value + 2):
            batcher.add(scan("d", t), 0.0)
            batch = batcher.take("d")
            assert batch is not None
            [env] = sealer.seal(batch).envelopes
            out.append(open_message(telemetry_topic("d", env.header), env.body, RING))
        return out

    first = sealed(0, {})
    # A rewound counter: the same (device, boot, seq) again, on other readings.
    again = sealed(100, {})
    tracker = SequenceTracker()
    for o in first:
        assert len(tracker.add(o)) == 60
    assert tracker.add(first[0]) == []  # a byte-identical resend is a duplicate
    assert tracker.duplicates == 60 and tracker.conflicts == []
    fresh = tracker.add(again[0])
    assert fresh == again[0].readings  # returned, to be flagged: not dropped as duplicates
    assert tracker.duplicates == 60
    assert [(c.device_id, c.boot_id, c.first_seq, c.count) for c in tracker.conflicts] == [
        ("d", "b", 0, 60)
    ]
    # An overlap at other boundaries is a conflict as well.
    shifted = sealed(200, {"d": 30})
    assert tracker.add(shifted[0]) == shifted[0].readings
    assert len(tracker.conflicts) == 2 and tracker.conflicting_readings == 120
    assert tracker.duplicates == 60
    # The conflicting envelope resent (at-least-once, byte for byte) is a duplicate of itself,
    # not a second conflict.
    assert tracker.add(again[0]) == []
    assert len(tracker.conflicts) == 2 and tracker.duplicates == 120


def test_no_reading_is_lost_or_reordered_when_a_batch_overshoots() -> None:
    pipeline = step(boot="b")
    sealed: list[Envelope] = []
    for t in range(3000):
        out = pipeline.add(scan("d", t), float(t), float(t))
        assert out is not None
        sealed += out.envelopes
    sealed += pipeline.flush()
    opened = [open_message(telemetry_topic("d", e.header), e.body, RING) for e in sealed]
    readings = [r for o in opened for r in o.readings]
    assert len(readings) == 3000 * 60
    assert [r.seq for r in readings] == list(range(3000 * 60))
    times = [r.ts_ms for r in readings]
    assert times == sorted(times)


def test_final_flush_splits_an_oversized_batch_instead_of_returning_scans() -> None:
    sealer = Sealer(KEY, "k1", "b", 4000)
    rng = random.Random(3)
    scans = [Scan("d", t, NAMES, [rng.uniform(-1e6, 1e6) for _ in NAMES]) for t in range(200)]
    batch = Batch("d", scans, 200 * 60, estimated_raw=1000)  # an estimate far too low
    sealed = sealer.seal(batch, final=True)
    envelopes = sealed.envelopes
    assert sealed.leftover == [] and len(envelopes) > 3
    assert all(e.size <= 4000 for e in envelopes)
    assert sum(e.header.count for e in envelopes) == 200 * 60
    assert next(e.header.first_seq for e in envelopes) == 0


def test_the_worked_example_in_the_docs_opens() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "envelope.md").read_text()
    topic = re.search(r"^(devices/boiler-7/messages/events/\S+)$", doc, re.M)
    body = re.search(r"^Body \(base64.*\n```\n(\S+)\n```", doc, re.M)
    assert topic and body
    opened = open_message(topic[1], base64.b64decode(body[1]), Keyring({"k1": bytes(range(32))}))
    values = [(r.seq, r.point, r.value, r.ts_ms) for r in opened.readings]
    assert values == [
        (1200, "temp_supply", 71.25, 1795900000000),
        (1201, "temp_return", 54.5, 1795900000000),
        (1202, "pump_on", True, 1795900000000),
        (1203, "temp_supply", 71.5, 1795900001000),
        (1204, "temp_return", 54.25, 1795900001000),
        (1205, "pump_on", True, 1795900001000),
    ]


def test_the_documented_consumer_example_runs_with_a_str_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "envelope.md").read_text()
    example = re.search(r"^Library.*\n```python\n(.*?)\n```", doc, re.M | re.S)
    assert example
    write_new(tmp_path / "keyring.json", "correct horse €".encode(), "k1")
    key = load_keyring(tmp_path / "keyring.json", b"correct horse \xe2\x82\xac").get("k1")
    batcher = Batcher(4000, max_age=3600)
    batcher.add(scan("boiler-7", 0), 0.0)
    batch = batcher.take("boiler-7")
    assert batch is not None
    (envelope,) = Sealer(key, "k1", "boot1", 4000).seal(batch, final=True).envelopes
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FIELDGATE_KEY_PASSPHRASE", "correct horse €")
    names = {
        "topic": telemetry_topic("boiler-7", envelope.header),
        "body": envelope.body,
    }
    exec(compile(example[1], "docs/envelope.md", "exec"), names)
    assert len(names["new_readings"]) == 60
    assert names["tracker"].gaps() == {}


def test_a_wrong_passphrase_or_type_says_so(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    write_new(path, b"right", "k1")
    with pytest.raises(KeyringError, match="wrong passphrase"):
        load_keyring(path, "wrong")
    with pytest.raises(KeyringError, match="must be str or bytes, not int"):
        load_keyring(path, 1234)  # type: ignore[arg-type]


def test_open_summary_prints_one_line_per_device_and_the_total(tmp_path: Path) -> None:
    ring = tmp_path / "keyring.json"
    write_new(ring, b"pw", "k1")
    key = load_keyring(ring, b"pw").get("k1")
    lines = []
    for device, envelopes in (("plc-1", 3), ("plc-2", 4)):
        batcher = Batcher(4000, max_age=3600)
        sealer = Sealer(key, "k1", "boot1", 4000)
        sealed = []
        for t in range(envelopes):
            batcher.add(scan(device, t), float(t))
            batch = batcher.take(device)
            assert batch is not None
            sealed += sealer.seal(batch, final=True).envelopes
        if device == "plc-2":
            sealed = [sealed[0], sealed[0], *sealed[2:]]  # one twice, one missing
        for e in sealed:
            topic = telemetry_topic(device, e.header)
            body = base64.b64encode(e.body).decode()
            lines.append(f'{{"t": 1.0, "topic": "{topic}", "body": "{body}"}}')
    record = tmp_path / "hub.jsonl"
    record.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        fieldgate("open", str(record), "--keyring", str(ring), "--summary"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FIELDGATE_KEY_PASSPHRASE": "pw"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "plc-1  180 readings, 0 duplicates, 0 gaps (0 readings missing), 1 boot",
        "plc-2  180 readings, 60 duplicates, 1 gaps (60 readings missing), 1 boot",
        "total  360 readings, 60 duplicates, 1 gaps (60 readings missing), 2 boots on 2 devices",
    ]
    assert " 0 refused" in done.stderr and "360 readings" in done.stderr
