"""``Gateway.stage``, the seam the module twin feeds: a document in, an Outcome out, with the
gateway in this process (its sessions and pollers visible) against the hub stand-in and
simulated Modbus devices."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway import config as config_mod
from gateway.app import Gateway, _Poller
from gateway.config import render_toml
from gateway.config.sources import document_hash
from gateway.events import read_events

from conftest import Proc, start_hub, start_simulator


async def _until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``predicate`` (sessions' stats: nothing to wait on) for ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _running(
    gateway: Gateway, body: Callable[[Gateway], Awaitable[None]], devices: list[str]
) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.create_task(gateway.run(stop))
        try:
            await _until(
                lambda: all(
                    d in gateway.sessions and gateway.sessions[d].stats.connected for d in devices
                ),
                20,
                "every session connected",
            )
            await body(gateway)
        finally:
            stop.set()
            await run

    asyncio.run(main())


def _rig(tmp: Path, pki_dir: Path, procs: list[Proc], devices: int) -> tuple[Path, dict[str, Any]]:
    hub_port, _ = start_hub(procs, tmp, pki_dir)
    config, _ = start_simulator(
        procs, tmp, pki_dir, hub_port, devices, "--period", "0.2", "--max-age", "0.4"
    )
    return config, tomllib.loads(config.read_text())


def test_documents_are_staged_one_at_a_time_and_keep_unaffected_sessions(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    config, full = _rig(tmp_path, pki_dir, procs, 3)
    start = dict(full, devices=full["devices"][:2])
    gateway = Gateway(config_mod.validate(start, "start"), config_file=config)

    async def body(gw: Gateway) -> None:
        first = gw.sessions["plc-1"]
        added = dict(full)  # plc-3 comes
        changed = json.loads(json.dumps(full))
        changed["devices"][1]["points"] = changed["devices"][1]["points"][:1]  # then plc-2 changes
        one, two = await asyncio.gather(gw.stage(added, "twin"), gw.stage(changed, "twin"))
        assert (one.status, two.status) == ("applied", "applied")
        assert one.plan["added"] == ["plc-3"] and two.plan["changed"] == ["plc-2"]
        assert two.hash == document_hash(changed) and gw.config_hash == two.hash
        assert gw.sessions["plc-1"] is first and first.stats.connects == 1
        assert sorted(gw.sessions) == ["plc-1", "plc-2", "plc-3"]
        assert [len(d.points) for d in gw.config.devices] == [
            len(full["devices"][0]["points"]),
            1,
            len(full["devices"][2]["points"]),
        ]
        await _until(lambda: gw.sessions["plc-3"].stats.readings_acked > 0, 20, "plc-3 delivering")
        assert set(gw.health) == {"plc-1", "plc-2", "plc-3"}
        assert gw.device_status("plc-3")["state"] == "up"

        refused = await gw.stage({"hub": {}, "devices": "none"}, "twin")
        assert refused.status == "refused" and refused.field is not None
        assert refused.error is not None and refused.error.startswith("twin: ")
        assert gw.config_hash == two.hash

        # A config too large for the twin: a file named by path and SHA-256.
        large = tmp_path / "large.toml"
        large.write_text(render_toml(changed))
        wrong = await gw.stage(large, "twin", sha256="0" * 64)
        assert wrong.status == "refused" and wrong.field == "sha256"
        digest = hashlib.sha256(large.read_bytes()).hexdigest()
        same = await gw.stage(large, "twin", sha256=digest.upper())
        assert same.status == "applied" and same.hash == digest
        assert same.plan == {"added": [], "removed": [], "changed": [], "unchanged": 3}

    _running(gateway, body, ["plc-1", "plc-2"])
    kinds = [(e["kind"], e["source"]) for e in read_events(tmp_path / "state") if "source" in e]
    assert kinds == [
        ("config-loaded", str(config)),
        ("config-loaded", "twin"),
        ("config-loaded", "twin"),
        ("config-refused", "twin"),
        ("config-refused", "twin"),
        ("config-loaded", "twin"),
    ]


class FailingStart(Gateway):
    """Fault injection: the named poller cannot start. Nothing real fails this late (what can
    fail is done before the running set is touched), so the test makes it."""

    fail: str = ""

    def _start_poller(self, poller: _Poller) -> None:
        if poller.name == self.fail:
            raise RuntimeError(f"{poller.name} cannot start")
        super()._start_poller(poller)


def test_a_failure_part_way_restores_the_last_good_config(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    config, full = _rig(tmp_path, pki_dir, procs, 3)
    start = dict(full, devices=full["devices"][:2])
    gateway = FailingStart(config_mod.validate(start, "start"), config_file=config)
    old_points = len(full["devices"][1]["points"])

    async def body(gw: Gateway) -> None:
        assert isinstance(gw, FailingStart)
        before = gw.config
        untouched = gw.sessions["plc-1"]
        doc = json.loads(json.dumps(full))
        doc["devices"][1]["points"] = doc["devices"][1]["points"][:1]
        gw.fail = "poll[plc-3]"
        outcome = await gw.stage(doc, "twin")
        assert outcome.status == "rolled-back", outcome
        assert outcome.error == "applying failed: poll[plc-3] cannot start"
        gw.fail = ""
        assert gw.config is before
        assert sorted(gw.sessions) == ["plc-1", "plc-2"]
        assert gw.sessions["plc-1"] is untouched
        assert sorted(gw._poller_tasks) == ["poll[plc-1]", "poll[plc-2]"]
        # plc-2 polls its old table again.
        assert len(gw.config.devices[1].points) == old_points
        acked = gw.sessions["plc-2"].stats.readings_acked
        await _until(
            lambda: gw.sessions["plc-2"].stats.readings_acked > acked + old_points,
            20,
            "plc-2 delivering again",
        )

    _running(gateway, body, ["plc-1", "plc-2"])
    rolled = [e for e in read_events(tmp_path / "state") if e["kind"] == "config-rolled-back"]
    assert len(rolled) == 1 and rolled[0]["plan"]["changed"] == ["plc-2"]
