"""The durable audit log (gateway/audit/log.py) and its stream queue, on a real SQLite file:
chained and committed, heads signed on count, on time and at close, a chain that goes on across
restarts and crashes, its own quota (pruning what the hub has, audit-lost when even that is not
enough), and the stream's at-least-once order."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import files
from gateway.audit.log import AuditLog, AuditSettings
from gateway.audit.stream import AuditStream
from gateway.core import audit
from gateway.identity import pki as pki_mod
from gateway.identity.auditkeys import Signer, Verifier, load_signer, load_verifier

CHAIN = "gw-log"


@pytest.fixture(scope="module")
def keys(pki_dir: Path) -> tuple[Signer, Verifier]:
    pki = pki_mod.Pki(pki_dir)
    if not pki.device_cert(CHAIN).exists():
        pki_mod.issue(pki_dir, [CHAIN])
    signer = load_signer(pki.device_key(CHAIN), pki.passphrase())
    return signer, load_verifier(pki.device_cert(CHAIN), certificate=True)


def verdict_of(path: Path, verifier: Verifier) -> audit.Verdict:
    read = files.read(path)
    after = (read.anchor.seq, read.anchor.hash) if read.anchor is not None else None
    return audit.verify(read.records, read.heads, verifier, CHAIN, after=after)


def test_records_are_committed_chained_and_signed_by_count_and_at_close(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    signer, verifier = keys
    path = tmp_path / "audit.db"
    log = AuditLog(path, CHAIN, signer, AuditSettings(head_every=10))
    for n in range(25):
        log.append("device-admitted", f"plc-{n}", {"n": n})
    # Without an event loop every append commits before it returns: readable at once.
    read = files.read(path)
    assert [r.seq for r in read.records] == list(range(25))
    assert [h.seq for h in read.heads] == [9, 19]
    assert verdict_of(path, verifier).reason == "unsigned"  # 20..24 not covered yet
    log.close()
    verdict = verdict_of(path, verifier)
    assert verdict.ok and verdict.records == 25 and verdict.proven_seq == 24


def test_the_chain_goes_on_after_a_restart_and_after_a_crash(
    tmp_path: Path, keys: tuple[Signer, Verifier], pki_dir: Path
) -> None:
    signer, verifier = keys
    path = tmp_path / "audit.db"
    log = AuditLog(path, CHAIN, signer)
    log.append("gateway-started", None, {"run": 1})
    log.close()
    # A process that appends and dies without closing: its tail has no head.
    pki = pki_mod.Pki(pki_dir)
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from gateway.audit.log import AuditLog
        from gateway.identity.auditkeys import load_signer
        signer = load_signer(Path({str(pki.device_key(CHAIN))!r}), {pki.passphrase()!r})
        log = AuditLog(Path({str(path)!r}), {CHAIN!r}, signer)
        for n in range(5):
            log.append("command-accepted", "plc-1", {{"n": n}})
        os._exit(9)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert verdict_of(path, verifier).reason == "unsigned"
    # The next open signs the tail a crash left, then goes on with the same chain.
    log = AuditLog(path, CHAIN, signer)
    log.append("gateway-started", None, {"run": 3})
    log.close()
    verdict = verdict_of(path, verifier)
    assert verdict.ok and verdict.records == 7, verdict.message


def test_a_log_of_another_chain_is_not_continued_under_this_gateways_id(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    signer, _ = keys
    path = tmp_path / "audit.db"
    other = AuditLog(path, "gw-other", None)
    other.append("gateway-started", None, {})
    other.close()
    log = AuditLog(path, CHAIN, signer)
    log.append("gateway-started", None, {})
    log.close()
    # The other chain's file is kept aside whole: nothing of it is sent under this chain.
    read = files.read(path)
    assert {r.chain_id for r in read.records} == {CHAIN}
    assert [(r.seq, r.kind) for r in read.records] == [
        (0, "audit-chain-started"),
        (1, "gateway-started"),
    ]
    kept = Path(read.records[0].details["kept"])
    assert read.records[0].details["previous_chain"] == "gw-other"
    assert {r.chain_id for r in files.read(kept).records} == {"gw-other"}


def test_a_damaged_log_is_kept_aside_and_the_new_chain_starts_with_a_tamper_record(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    signer, verifier = keys
    path = tmp_path / "audit.db"
    log = AuditLog(path, CHAIN, signer)
    for n in range(50):
        log.append("device-admitted", "plc-1", {"n": n, "pad": "x" * 100})
    log.close()
    data = bytearray(path.read_bytes())
    data[4096:8192] = b"\x00" * 4096  # a page of the file overwritten
    path.write_bytes(bytes(data))
    log = AuditLog(path, CHAIN, signer)
    log.close()
    read = files.read(path)
    assert [r.kind for r in read.records] == ["tamper-audit-reset"]
    assert Path(read.records[0].details["kept"]).exists()
    assert verdict_of(path, verifier).ok


def test_the_quota_prunes_what_the_hub_acknowledged_and_the_rest_still_verifies(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    signer, verifier = keys
    path = tmp_path / "audit.db"
    settings = AuditSettings(max_bytes=64 * 1024, head_every=20)
    log = AuditLog(path, CHAIN, signer, settings)
    for n in range(200):
        log.append("device-admitted", "plc-1", {"n": n, "pad": "x" * 200})
        if n % 50 == 49:
            log.acked(log.committed_pos, 0)  # the hub took everything so far
            log._acked_bytes = log._db.bytes_through(log.acked_pos)
    log.close()
    read = files.read(path)
    assert read.anchor is not None and read.records[0].seq == read.anchor.seq + 1
    assert os.path.getsize(path) < 4 * settings.max_bytes
    assert sum(len(files.line(r)) for r in read.records) <= settings.max_bytes
    verdict = verdict_of(path, verifier)
    assert verdict.ok and verdict.lost == 0, verdict.message
    assert verdict.last_seq == 199


def test_a_full_quota_loses_events_into_one_audit_lost_record_and_the_chain_goes_on(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    signer, verifier = keys
    path = tmp_path / "audit.db"
    log = AuditLog(path, CHAIN, signer, AuditSettings(max_bytes=64 * 1024, head_every=10))
    for n in range(400):  # nothing acknowledged: nothing may be pruned
        log.append("device-admitted", "plc-1", {"n": n, "pad": "x" * 200})
    assert log.lost > 0
    lost = log.lost
    # The hub takes everything: room again, and the next event is preceded by audit-lost.
    log.acked(log.committed_pos, log._db.bytes_through(log.committed_pos))
    log.append("gateway-stopped", None, {})
    log.close()
    read = files.read(path)
    kinds = [r.kind for r in read.records]
    assert kinds[-2:] == [audit.LOST_KIND, "gateway-stopped"]
    assert read.records[-2].details == {"count": lost}
    verdict = verdict_of(path, verifier)
    assert verdict.ok and verdict.lost == lost, verdict.message


def test_without_a_stream_the_oldest_records_are_pruned_to_keep_the_newest(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    signer, verifier = keys
    path = tmp_path / "audit.db"
    log = AuditLog(path, CHAIN, signer, AuditSettings(max_bytes=64 * 1024, prune_unsent=True))
    for n in range(400):
        log.append("device-admitted", "plc-1", {"n": n, "pad": "x" * 200})
    log.close()
    read = files.read(path)
    assert read.records[-1].details["n"] == 399 and read.anchor is not None
    assert verdict_of(path, verifier).ok


def test_the_stream_sends_committed_items_in_order_and_again_after_a_release(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    signer, verifier = keys
    path = tmp_path / "audit.db"

    async def go() -> None:
        log = AuditLog(path, CHAIN, signer, AuditSettings(head_every=5))
        writer = asyncio.create_task(log.run())
        await asyncio.sleep(0)
        stream = AuditStream(log, message_bytes=1024)
        for n in range(12):
            log.append("command-accepted", "plc-1", {"n": n})
        first = await asyncio.wait_for(stream.lease(CHAIN, 2), 5)
        assert len(first) == 2 and first[0].envelope.header.properties()["fg-stream"] == "audit"
        stream.ack(CHAIN, first[1].lease_id)  # out of order: nothing is acked yet
        assert log.acked_pos == -1
        stream.ack(CHAIN, first[0].lease_id)
        assert log.acked_pos == first[1].lease_id
        second = await asyncio.wait_for(stream.lease(CHAIN, 2), 5)
        stream.release(CHAIN)  # the connection dropped before the PUBACKs
        again = await asyncio.wait_for(stream.lease(CHAIN, 2), 5)
        assert [m.envelope.body for m in again] == [m.envelope.body for m in second]
        bodies = [m.envelope.body for m in first + again]
        while stream.holds(CHAIN):
            for m in again:
                stream.ack(CHAIN, m.lease_id)
            if not stream.holds(CHAIN):
                break
            again = await asyncio.wait_for(stream.lease(CHAIN, 8), 5)
            bodies += [m.envelope.body for m in again]
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        log.close()
        received = files.AuditFile()
        files.parse_lines(b"".join(bodies), "stream", received)
        verdict = audit.verify(received.records, received.heads, verifier, CHAIN)
        assert verdict.records == 12 and verdict.reason in ("ok", "unsigned"), verdict.message
        # The acknowledged position is kept with the log: a restart sends from there.
        reopened = AuditLog(path, CHAIN, signer)
        assert reopened.acked_pos == log.acked_pos
        reopened.close()

    asyncio.run(go())


def test_group_commit_on_the_loop_commits_within_milliseconds_and_counts_when_committed(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        log = AuditLog(tmp_path / "audit.db", CHAIN, None)
        writer = asyncio.create_task(log.run())
        await asyncio.sleep(0)
        for n in range(500):
            log.append("tamper-input", None, {"n": n})
        assert "tamper-input" not in log.counts  # not committed yet: not counted
        assert log.committed is not None
        while log.committed_pos < log.appended_pos:
            log.committed.clear()
            await asyncio.wait_for(log.committed.wait(), 5)
        assert log.counts["tamper-input"] == 500
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        log.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"tamper": [{"point": "t"}]}, "devices[0]: tamper[0].point: 't' is uint16"),
        ({"tamper": [{"point": "nope"}]}, "tamper[0].point: the device has no Modbus point"),
    ],
)
def test_a_tamper_input_that_is_not_a_bool_point_of_the_device_is_refused_by_name(
    extra: dict[str, object], expected: str
) -> None:
    from gateway.config import validate
    from gateway.core.errors import ConfigError

    doc = {
        "hub": {"hostname": "localhost", "ca_file": "x"},
        "sealing": {"keyring": "x", "key_id": "k1"},
        "gateway": {"cert": "gateway.pem"},
        "devices": [
            {
                "id": "plc-1",
                "cert": "x",
                "key": "x",
                "modbus": {"host": "127.0.0.1", "port": 5020},
                "identity": "none",
                "points": [{"name": "t", "address": 0}],
                **extra,
            }
        ],
    }
    with pytest.raises(ConfigError) as err:
        validate(doc, "gw.toml", check_files=False)
    text = str(err.value)
    assert text.startswith("gw.toml") and expected in text
    assert "gateway: key: the gateway's identity needs both cert and key" in text


def test_a_records_line_is_the_canonical_json_of_its_fields() -> None:
    """The gateway builds each line from its parts (fast); it must be the canonical form."""
    from gateway.core.audit import canonical_json

    last = None
    for n, details in enumerate(
        [{}, {"reason": "é ☃ \\u2028", "n": -(2**62)}, {"x": [1.5, None, True, {"b": 1e-300}]}]
    ):
        last = audit.append(last, 1796000000.0 + n / 3, "k", "plc-1" if n else None, details, "gw")
        assert last.line() == canonical_json({"record": last.to_json()})


def test_a_consumer_takes_the_chain_of_the_identity_that_sent_it_device_or_module(
    keys: tuple[Signer, Verifier],
) -> None:
    """A module's output names its sender {device}.{module}; a chain of another name from
    that identity is foreign, whatever it claims."""
    from gateway.consumer import AuditConsumer

    signer, verifier = keys
    record = audit.append(None, 1796000000.0, "gateway-started", None, {}, "edge-1.fieldgate")
    body = (files.line(record) + "\n" + files.line(audit.sign_head(record, signer)) + "\n").encode()
    module_topic = "devices/edge-1/modules/fieldgate/messages/events/fg-stream=audit&%24.on=audit"
    consumer = AuditConsumer(lambda _: verifier)
    assert consumer.add(module_topic, body) is None
    assert consumer.verifiers["edge-1.fieldgate"].verdict().ok
    device_topic = "devices/edge-1/messages/events/fg-stream=audit"
    failed = AuditConsumer(lambda _: verifier).add(device_topic, body)
    assert failed is not None and failed.reason == "foreign"


def test_a_modules_chain_name_is_a_valid_chain_id_for_any_iot_hub_ids() -> None:
    from gateway.core.iothub import module_sender, parse_sender_topic

    assert module_sender("edge-1", "fieldgate") == "edge-1.fieldgate"
    for device, module in (("plant@site(3)", "fg$1"), ("-x", "y"), ("d" * 128, "m" * 128)):
        name = module_sender(device, module)
        audit.append(None, 1.0, "gateway-started", None, {}, name)  # a valid chain id
        topic = f"devices/{device}/modules/{module}/messages/events/fg-stream=audit"
        assert parse_sender_topic(topic)[0] == name


# -- found in review: each failed before its fix ------------------------------------------------


def test_what_the_stream_acknowledges_is_what_the_quota_prunes(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    """The stream once counted each line's newline into the acknowledged bytes: the quota then
    saw room that was not there, and the log outgrew it once the hub stopped acknowledging."""
    from gateway.store import auditdb

    signer, _ = keys
    path = tmp_path / "audit.db"
    quota = 64 * 1024
    log = AuditLog(path, CHAIN, signer, AuditSettings(max_bytes=quota, head_every=100_000))
    stream = AuditStream(log)

    async def cycle(n: int) -> None:
        for i in range(n):
            log.append("device-admitted", "plc", {"i": i})
        while log.acked_pos < log.committed_pos:
            for item in await stream.lease(CHAIN, 100):
                stream.ack(CHAIN, item.lease_id)

    for _ in range(20):  # the hub online: the quota turned over many times
        asyncio.run(cycle(500))
    items, _ = auditdb.read_items(path)
    acked = sum(len(line) for pos, line in items if pos <= log.acked_pos)
    assert log._acked_bytes == acked
    for i in range(2000):  # the hub away: nothing more is acknowledged
        log.append("device-quarantined", "plc", {"i": i, "pad": "x" * 100})
    log.close()
    items, _ = auditdb.read_items(path)
    assert sum(len(line) for _, line in items) <= quota


def test_a_commit_in_flight_when_the_run_ends_settles_before_the_close_signs(
    tmp_path: Path, keys: tuple[Signer, Verifier]
) -> None:
    """A commit on the I/O thread that hits a full disk as the run is cancelled: its records
    go back to the pending list before close() signs, so no head signs records that were never
    written, and the next start does not fork the chain."""
    import threading
    import time

    import apsw

    signer, verifier = keys
    path = tmp_path / "audit.db"
    log = AuditLog(path, CHAIN, signer, AuditSettings(head_every=100_000))
    db = log._db
    real_commit = db.commit
    entered = threading.Event()
    state = {"fail": True}

    def commit(items, meta, prune_through=None):  # type: ignore[no-untyped-def]
        if items and state["fail"]:
            state["fail"] = False
            entered.set()
            time.sleep(0.2)
            raise apsw.FullError("database or disk is full")
        return real_commit(items, meta, prune_through)

    db.commit = commit  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(log.run())
        await asyncio.sleep(0.05)
        for i in range(3):
            log.append("device-quarantined", "plc", {"i": i})
        # The I/O thread is inside the commit (a threading.Event: wait for it off the loop).
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log.close()

    asyncio.run(main())
    again = AuditLog(path, CHAIN, signer)
    for i in range(3):
        again.append("device-admitted", "plc", {"run": 2, "i": i})
    again.close()
    verdict = verdict_of(path, verifier)
    assert verdict.ok, verdict.message
    kinds = [r.kind for r in files.read(path).records]
    assert kinds.count("device-quarantined") == 3  # written by the close, after the disk took them


def test_a_tamper_input_a_reload_adds_is_watched_from_then_on(tmp_path: Path) -> None:
    from gateway.audit.room import AuditRoom
    from gateway.config import validate
    from gateway.core.readings import Scan
    from gateway.events import SecurityEvents, read_events

    def cfg(tamper: bool) -> Any:
        device: dict[str, Any] = {
            "id": "plc-1",
            "cert": __file__,
            "key": __file__,
            "modbus": {"host": "127.0.0.1", "port": 5020},
            "identity": "none",
            "points": [{"name": "door", "address": 0, "type": "bool", "table": "discrete"}],
        }
        if tamper:
            device["tamper"] = [{"point": "door", "normal": False}]
        doc = {
            "hub": {"hostname": "localhost", "ca_file": __file__},
            "sealing": {"keyring": __file__, "key_id": "k1"},
            "gateway": {"state_dir": str(tmp_path)},
            "devices": [device],
        }
        return validate(doc, "test", check_files=False)

    events = SecurityEvents(tmp_path)
    room = AuditRoom(cfg(False), events)
    seen: list[Scan] = []
    sink = room.sink(seen.append)  # the reload's new poller is built before the apply
    room.reconfigured(cfg(True))
    sink(Scan("plc-1", 0, ("door",), [True]))  # the enclosure opens
    events.close()
    assert [e["state"] for e in read_events(tmp_path) if e["kind"] == "tamper-input"] == ["tripped"]
    assert len(seen) == 1
