"""Staged config on a plain install, with real parts: the hub stand-in, Modbus simulators and
`fieldgate run` as a process, reloaded by SIGHUP and by `fieldgate reload`."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from gateway.config import render_toml
from gateway.events import read_events
from gateway.identity import pki as pki_mod
from gateway.identity.keyring import Keyring
from gateway.testbed.localhub.control import HubControl

from conftest import Proc, fieldgate, opened_from, start_hub, start_simulator, wait_until

PERIOD = 0.2


class Rig:
    """The hub, ``devices`` simulated Modbus devices, and a gateway started on the config
    without the devices in ``held_back`` (a reload adds them)."""

    def __init__(
        self,
        tmp: Path,
        pki_dir: Path,
        procs: list[Proc],
        devices: int,
        held_back: tuple[str, ...] = (),
    ) -> None:
        self.tmp, self.pki_dir, self.procs = tmp, pki_dir, procs
        self.hub_port, self.record = start_hub(procs, tmp, pki_dir)
        self.config, _ = start_simulator(
            procs, tmp, pki_dir, self.hub_port, devices, "--period", str(PERIOD), "--max-age", "0.4"
        )
        self.full = tomllib.loads(self.config.read_text())
        self.state = tmp / "state"
        doc = self.doc()
        doc["devices"] = [d for d in doc["devices"] if d["id"] not in held_back]
        self.write(doc)
        self.gateway = Proc(fieldgate("run", "--config", str(self.config)), tmp / "gateway.log")
        procs.append(self.gateway)
        running = [d["id"] for d in doc["devices"]]
        for device in running:
            self.gateway.wait_for(rf"{device}: connected")
        self.delivering(*running)

    def doc(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.full))

    def write(self, doc: dict[str, Any]) -> None:
        self.config.write_text(render_toml(doc))

    def hup_and_wait(self) -> dict[str, Any]:
        """SIGHUP the gateway; the status file it writes for this reload."""
        asked = time.time()
        os.kill(self.gateway.pid, signal.SIGHUP)
        status: dict[str, Any] = {}

        def written() -> bool:
            nonlocal status
            try:
                status = json.loads((self.state / "config-status.json").read_text())
            except (OSError, ValueError):
                return False
            return bool(status["at"] >= asked)

        wait_until(written, 60, "the reload's outcome")
        return status

    def reload(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            fieldgate("reload", "--config", str(self.config), *extra),
            capture_output=True,
            text=True,
            timeout=90,
        )

    def readings(self) -> dict[str, list[int]]:
        """Per device, the read times (ms) of its scans that reached the hub, sorted."""
        opened, errors, _ = opened_from(self.record, self.keyring)
        assert errors == []
        times: dict[str, set[int]] = defaultdict(set)
        for o in opened:
            for r in o.readings:
                times[o.device_id].add(r.ts_ms)
        return {d: sorted(t) for d, t in times.items()}

    def points(self) -> dict[str, set[str]]:
        opened, _, _ = opened_from(self.record, self.keyring)
        out: dict[str, set[str]] = defaultdict(set)
        for o in opened:
            out[o.device_id] |= {r.point for r in o.readings}
        return out

    @property
    def keyring(self) -> Keyring:
        p = pki_mod.Pki(self.pki_dir)
        from gateway.identity.keyring import load

        return load(p.keyring, p.passphrase())

    def delivering(self, *devices: str, after: float = 0.0, timeout: float = 30) -> None:
        """Every device in ``devices`` has readings read after ``after`` (epoch s) at the hub."""

        def arrived() -> bool:
            seen = self.readings()
            return all(seen.get(d) and seen[d][-1] / 1000 > after for d in devices)

        wait_until(arrived, timeout, f"readings of {devices} at the hub")

    def status_of(self, device: str) -> dict[str, Any]:
        """The gateway's ``status`` direct method on the device, through the hub."""

        async def ask() -> dict[str, Any]:
            async with HubControl(pki_mod.Pki(self.pki_dir), "127.0.0.1", self.hub_port) as hub:
                code, body = await hub.invoke(device, "status", None, timeout=10)
                assert code == 200, (code, body)
                assert isinstance(body, dict)
                return body

        return asyncio.run(ask())

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in read_events(self.state) if e["kind"] == kind]


def _worst_gap_ms(times: list[int], since_ms: int) -> int:
    later = [t for t in times if t >= since_ms]
    return max((b - a for a, b in itertools.pairwise(later)), default=0)


def test_sighup_adds_a_device_and_the_others_keep_their_sessions_and_their_rate(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs, 3, held_back=("plc-3",))
    before = rig.status_of("plc-1")["uplink"]["connects"]
    assert before == 1
    started = rig.events("config-loaded")
    assert [e["reason"] for e in started] == ["started"]
    assert started[0]["hash"] == hashlib.sha256(rig.config.read_bytes()).hexdigest()

    rig.write(rig.doc())  # plc-3 back in the file
    asked = time.time()
    status = rig.hup_and_wait()
    assert status["status"] == "applied", status
    assert status["plan"]["added"] == ["plc-3"] and status["plan"]["unchanged"] == 2
    assert status["hash"] == hashlib.sha256(rig.config.read_bytes()).hexdigest()
    rig.delivering("plc-1", "plc-2", "plc-3", after=asked + 1.5)

    # The unaffected devices were not reconnected, and polled on at their rate throughout.
    for device in ("plc-1", "plc-2"):
        assert rig.status_of(device)["uplink"]["connects"] == 1
        gap = _worst_gap_ms(rig.readings()[device], int((asked - 2) * 1000))
        assert gap < 3 * PERIOD * 1000, (device, gap)
    assert rig.gateway.popen.poll() is None  # SIGHUP did not stop it
    loaded = rig.events("config-loaded")
    assert loaded[-1]["source"] == "SIGHUP" and loaded[-1]["plan"]["added"] == ["plc-3"]
    assert rig.gateway.stop() == 0
    _, _, tracker = opened_from(rig.record, rig.keyring)
    assert tracker.gaps() == {}


def test_fieldgate_reload_restarts_a_changed_device_and_drains_a_removed_one(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs, 3)
    doc = rig.doc()
    kept = [p["name"] for p in doc["devices"][1]["points"][:1]]
    doc["devices"][1]["points"] = doc["devices"][1]["points"][:1]  # plc-2 changes
    doc["devices"] = [d for d in doc["devices"] if d["id"] != "plc-3"]  # plc-3 goes
    rig.write(doc)
    asked = time.time()
    done = rig.reload()
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.startswith("applied "), done.stdout
    assert "0 added, 1 removed, 1 changed, 1 unchanged" in done.stdout
    # plc-2 restarted with its new table: only the kept point arrives from now on.
    rig.delivering("plc-1", "plc-2", after=asked + 1.5)
    recent: set[str] = set()
    opened, _, _ = opened_from(rig.record, rig.keyring)
    for o in opened:
        if o.device_id == "plc-2":
            recent |= {r.point for r in o.readings if r.ts_ms / 1000 > asked + 1.5}
    assert recent == set(kept)
    assert rig.status_of("plc-1")["uplink"]["connects"] == 1
    # plc-3 stopped: nothing new is read, and everything it had read reached the hub.
    last = rig.readings()["plc-3"][-1]
    assert last / 1000 < asked + 1.0
    store = json.loads(
        subprocess.run(
            fieldgate("store", "status", "--path", str(rig.state / "store.db"), "--json"),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert store["devices"].get("plc-3", {}).get("envelopes", 0) == 0
    _, _, tracker = opened_from(rig.record, rig.keyring)
    assert tracker.gaps() == {}
    promised = store["devices"]["plc-3"]["next_seq"]
    got = {d: s.count() for (d, _), s in tracker.streams.items()}
    assert got["plc-3"] == promised
    assert rig.gateway.stop() == 0
    # The stop's summary counts what the ended sessions delivered too.
    assert re.search(r"readings: (\d+) read, \1 delivered, 0 dropped", rig.gateway.output())


def test_a_bad_file_is_refused_with_its_field_and_changes_nothing(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs, 2)
    good = rig.config.read_text()
    doc = rig.doc()
    doc["devices"][0]["points"][0]["type"] = "float99"
    rig.write(doc)
    # `fieldgate reload` refuses it here already, naming the field; the gateway is not asked.
    done = rig.reload()
    assert done.returncode == 2
    assert "devices[0].points[0].type" in done.stderr and "float99" in done.stderr
    assert not rig.events("config-refused")
    # SIGHUP on the same file: the gateway refuses it, says which field, and goes on.
    status = rig.hup_and_wait()
    assert status["status"] == "refused" and status["field"] == "devices[0].points[0].type"
    assert "float99" in status["error"]
    refused = rig.events("config-refused")
    assert len(refused) == 1 and refused[0]["hash"] == status["hash"]
    # A change that needs a restart is refused whole: the added device does not start either.
    doc = rig.doc()
    doc["hub"]["port"] = 1
    doc["devices"] = doc["devices"][:1]
    rig.write(doc)
    done = rig.reload()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "needs a restart: field hub.port" in done.stdout
    asked = time.time()
    rig.delivering("plc-1", "plc-2", after=asked + 1)
    for device in ("plc-1", "plc-2"):
        assert rig.status_of(device)["uplink"]["connects"] == 1
    assert rig.gateway.popen.poll() is None
    rig.config.write_text(good)
    done = rig.reload()
    assert done.returncode == 0 and "0 added, 0 removed, 0 changed, 2 unchanged" in done.stdout
    assert rig.gateway.stop() == 0


def test_a_reload_while_the_hub_is_down_loses_nothing(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs, 3, held_back=("plc-3",))
    hub = procs[0]
    assert hub.stop() == 0
    doc = rig.doc()
    doc["devices"] = [d for d in doc["devices"] if d["id"] != "plc-2"]  # plc-2 goes, plc-3 comes
    rig.write(doc)
    done = rig.reload()
    assert done.returncode == 0, done.stdout + done.stderr
    time.sleep(2)  # readings pile up in the store while the hub is away
    start_hub(procs, tmp_path, pki_dir, port=rig.hub_port)
    rig.delivering("plc-1", "plc-3", after=time.time() + 0.5, timeout=60)
    assert rig.gateway.stop() == 0
    # Every envelope sealed is at the hub or still in the store (plc-2's, kept for a later
    # start that runs it again): no gap, nothing dropped.
    store = json.loads(
        subprocess.run(
            fieldgate("store", "status", "--path", str(rig.state / "store.db"), "--json"),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    _, _, tracker = opened_from(rig.record, rig.keyring)
    assert tracker.gaps() == {}
    got = {d: s.count() for (d, _), s in tracker.streams.items()}
    for device, row in store["devices"].items():
        assert "dropped" not in row, (device, row)
        assert got.get(device, 0) + row.get("readings", 0) == row["next_seq"], (device, row)
    # The devices still configured were delivered whole; plc-2's rest waits in the store.
    assert got["plc-1"] == store["devices"]["plc-1"]["next_seq"]
    assert got["plc-3"] == store["devices"]["plc-3"]["next_seq"]
    assert store["devices"]["plc-2"]["envelopes"] > 0
    assert "devices that a reload removed are undelivered (kept in the store" in (
        rig.gateway.output()
    )
    assert "readings:" in rig.gateway.output()


def test_fieldgate_reload_without_a_running_gateway_says_so(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1)
    done = subprocess.run(
        fieldgate("reload", "--config", str(config)), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "no gateway is running on" in done.stderr


def test_a_new_device_whose_key_does_not_decrypt_is_rolled_back(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs, 2, held_back=("plc-2",))
    p = pki_mod.Pki(pki_dir)
    key = serialization.load_pem_private_key(p.device_key("plc-2").read_bytes(), p.passphrase())
    other = tmp_path / "plc-2-other.key"
    other.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"not the passphrase"),
        )
    )
    other.chmod(0o600)
    doc = rig.doc()
    doc["devices"][1]["key"] = str(other)
    rig.write(doc)
    done = rig.reload()
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("rolled-back "), done.stdout
    assert "plc-2" in done.stdout and "wrong passphrase" in done.stdout
    rolled = rig.events("config-rolled-back")
    assert len(rolled) == 1 and "plc-2" in rolled[0]["reason"]
    asked = time.time()
    rig.delivering("plc-1", after=asked + 1)
    assert rig.status_of("plc-1")["uplink"]["connects"] == 1
    assert "plc-2" not in rig.readings()
    assert rig.gateway.stop() == 0


def test_the_gateway_to_signal_is_the_lock_holder_not_a_stale_note(tmp_path: Path) -> None:
    from gateway.statelock import LOCK_NAME, holder, lock_state, release_all

    lock_file = tmp_path / LOCK_NAME
    assert holder(lock_file) is None  # no gateway ever ran here
    locks = lock_state(tmp_path)
    try:
        assert holder(lock_file) == os.getpid()
    finally:
        release_all(locks)
    # The note stays behind; nobody holds the lock: nobody to signal.
    assert lock_file.read_text().startswith(f"pid {os.getpid()} ")
    assert holder(lock_file) is None
