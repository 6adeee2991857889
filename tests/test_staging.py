"""The staging plan, pure: plain config documents in, a plan out, no files and no loop."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from gateway.config import Config
from gateway.config.loading import validate
from gateway.config.sources import document_hash, refusal
from gateway.config.staging import Files, plan, tasks
from gateway.core.auth import AuthGate, Evidence, Registration
from gateway.core.batcher import Batcher
from gateway.core.envelope import Sealer
from gateway.core.errors import ConfigError
from gateway.core.pipeline import PipelineStep
from gateway.core.readings import Scan

BASE: dict[str, Any] = {
    "hub": {"hostname": "h", "ca_file": "ca.pem"},
    "sealing": {"keyring": "k.json", "key_id": "k1"},
    "links": [{"name": "bus-1", "type": "rtu", "port": "/dev/ttyUSB0", "baud": 9600}],
}


def _tcp(name: str, port: int, points: int = 1) -> dict[str, Any]:
    return {
        "id": name,
        "cert": f"{name}.pem",
        "key": f"{name}.key",
        "modbus": {"host": "127.0.0.1", "port": port, "unit": 1},
        "identity": "none",
        "points": [{"name": f"p{i}", "address": i} for i in range(points)],
    }


def _on_bus(name: str, unit: int) -> dict[str, Any]:
    return {
        "id": name,
        "cert": f"{name}.pem",
        "key": f"{name}.key",
        "modbus": {"link": "bus-1", "unit": unit},
        "identity": "none",
        "points": [{"name": "p", "address": 0}],
    }


def _doc() -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["devices"] = [_tcp("a", 1502), _tcp("b", 1503), _on_bus("s1", 1), _on_bus("s2", 2)]
    return doc


def _cfg(doc: dict[str, Any]) -> Config:
    return validate(doc, "gw.toml", check_files=False)


def test_the_same_config_is_an_empty_plan() -> None:
    p = plan(_cfg(_doc()), _cfg(_doc()))
    assert p.empty and p.live
    assert p.unchanged == ("a", "b", "s1", "s2")
    assert p.tasks_unchanged == ("link[bus-1]", "poll[a]", "poll[b]")


def test_an_added_device_with_its_own_host_starts_alone() -> None:
    new = _doc()
    new["devices"].append(_tcp("c", 1504))
    p = plan(_cfg(_doc()), _cfg(new))
    assert p.added == ("c",) and p.removed == () and p.changed == ()
    assert p.unchanged == ("a", "b", "s1", "s2")
    assert p.tasks_added == ("poll[c]",)
    # Nobody else's poller restarts.
    assert p.tasks_restarted == ()
    assert p.summary() == {"added": ["c"], "removed": [], "changed": [], "unchanged": 4}


def test_a_device_joining_a_shared_link_restarts_that_link_only() -> None:
    new = _doc()
    new["devices"].append(_on_bus("s3", 3))
    p = plan(_cfg(_doc()), _cfg(new))
    assert p.added == ("s3",)
    assert p.tasks_restarted == ("link[bus-1]",)
    assert p.tasks_unchanged == ("poll[a]", "poll[b]")
    # s1 and s2 poll again on the restarted bus, but as devices they are unchanged: their
    # sessions stay.
    assert set(p.unchanged) == {"a", "b", "s1", "s2"}


def test_a_removed_device_stops_and_a_link_left_empty_stops() -> None:
    new = _doc()
    new["devices"] = [_tcp("a", 1502)]
    p = plan(_cfg(_doc()), _cfg(new))
    assert p.removed == ("b", "s1", "s2")
    assert p.tasks_removed == ("link[bus-1]", "poll[b]")
    assert p.unchanged == ("a",)


def test_a_changed_point_table_changes_the_device() -> None:
    new = _doc()
    new["devices"][1] = _tcp("b", 1503, points=3)
    p = plan(_cfg(_doc()), _cfg(new))
    assert p.changed == ("b",)
    assert p.tasks_restarted == ("poll[b]",)
    assert p.unchanged == ("a", "s1", "s2")


def test_a_changed_shared_link_changes_every_device_on_it() -> None:
    new = _doc()
    new["links"][0]["baud"] = 19200
    p = plan(_cfg(_doc()), _cfg(new))
    assert p.changed == ("s1", "s2")
    assert p.tasks_restarted == ("link[bus-1]",)
    assert p.unchanged == ("a", "b")


def test_a_renewed_certificate_at_the_same_path_changes_the_device() -> None:
    old_files = Files({}, {"a": "1", "b": "1", "s1": "1", "s2": "1"})
    new_files = Files({}, {"a": "1", "b": "2", "s1": "1", "s2": "1"})
    p = plan(_cfg(_doc()), _cfg(_doc()), old_files, new_files)
    assert p.changed == ("b",) and p.tasks_restarted == ("poll[b]",)


def test_disabling_a_device_removes_it_and_enabling_adds_it() -> None:
    off = _doc()
    off["devices"][0]["enabled"] = False
    p = plan(_cfg(_doc()), _cfg(off))
    assert p.removed == ("a",) and p.tasks_removed == ("poll[a]",)
    back = plan(_cfg(off), _cfg(_doc()))
    assert back.added == ("a",) and back.tasks_added == ("poll[a]",)


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("hub", "port", 9999, "hub.port"),
        ("hub", "hostname", "other", "hub.hostname"),
        ("sealing", "key_id", "k2", "sealing.key_id"),
        ("store", "kind", "memory", "store.kind"),
        ("gateway", "state_dir", "/elsewhere", "gateway.state_dir"),
        ("secrets", "passphrase_env", "OTHER", "secrets.passphrase_env"),
        ("batching", "max_bytes", 8000, "batching.max_bytes"),
        ("control", "read_only", True, "control.read_only"),
    ],
)
def test_a_section_shared_by_every_device_needs_a_restart(
    section: str, key: str, value: object, field: str
) -> None:
    new = _doc()
    new.setdefault(section, {})[key] = value
    new["devices"].append(_tcp("c", 1504))  # refused whole: not even the added device
    p = plan(_cfg(_doc()), _cfg(new))
    assert not p.live
    assert p.restart == (field,)
    assert p.refusal() == f"needs a restart: field {field}"
    assert p.summary()["restart"] == [field]


def test_a_new_ca_file_behind_the_same_path_needs_a_restart() -> None:
    p = plan(
        _cfg(_doc()),
        _cfg(_doc()),
        Files({"hub.ca_file": "1", "sealing.keyring": "1"}),
        Files({"hub.ca_file": "2", "sealing.keyring": "1"}),
    )
    assert p.restart == ("hub.ca_file (the file's contents)",)


def test_several_restart_fields_are_counted_in_the_refusal() -> None:
    new = _doc()
    new["hub"]["port"] = 1
    new["sealing"]["key_id"] = "k9"
    p = plan(_cfg(_doc()), _cfg(new))
    assert p.restart == ("hub.port", "sealing.key_id")
    assert p.refusal() == "needs a restart: field hub.port (and 1 more)"


def test_task_names_are_the_gateways() -> None:
    assert {name: ids for name, (_, ids) in tasks(_cfg(_doc())).items()} == {
        "poll[a]": ("a",),
        "poll[b]": ("b",),
        "link[bus-1]": ("s1", "s2"),
    }


def test_a_documents_hash_does_not_depend_on_key_order_or_spacing() -> None:
    a = {"hub": {"hostname": "h", "port": 1}, "devices": []}
    b = {"devices": [], "hub": {"port": 1, "hostname": "h"}}
    assert document_hash(a) == document_hash(b)
    assert document_hash(a) != document_hash({**a, "hub": {"hostname": "h", "port": 2}})


def test_a_refusal_names_its_field() -> None:
    bad = _doc()
    bad["devices"][0]["points"][0]["type"] = "float99"
    with pytest.raises(ConfigError) as err:
        _cfg(bad)
    where, why = refusal(err.value)
    assert where == "devices[0].points[0].type"
    assert "float99" in why


# -- what the rooms learn at a reload: pure pieces, no loop ----------------------------------


def test_flushing_one_device_seals_its_batch_whole_and_leaves_the_others_open() -> None:
    step = PipelineStep(
        Batcher(4000, 3600), Sealer(os.urandom(32), "k1", "boot", 4000), lambda _d: True
    )
    for t in range(3):
        for device in ("a", "b"):
            step.add(Scan(device, 1_700_000_000_000 + t, ("v",), [float(t)]), float(t), float(t))
    sealed = step.flush_device("a")
    assert [(e.device_id, e.header.count) for e in sealed] == [("a", 3)]
    assert step.flush_device("a") == []
    assert [(e.device_id, e.header.count) for e in step.flush()] == [("b", 3)]


def test_a_forgotten_device_is_unknown_to_the_gate_and_a_registered_one_starts_afresh() -> None:
    events: list[tuple[str, str | None, str]] = []
    gate = AuthGate(
        [Registration("a", "tcp", "127.0.0.1:1502")],
        lambda kind, device, reason, **_: events.append((kind, device, reason)),
    )
    seen = Evidence("a", "tcp", "127.0.0.1:1502")
    assert gate.admit(seen) is None and gate.admitted("a")
    gate.forget("a")
    assert not gate.admitted("a")
    assert gate.admit(seen) == "not in the registry"
    assert "a" in gate.quarantined
    # Added again (at another endpoint): the quarantine of the removed one is forgotten.
    gate.register(Registration("a", "tcp", "127.0.0.1:1600"))
    assert "a" not in gate.quarantined and not gate.admitted("a")
    assert gate.admit(Evidence("a", "tcp", "127.0.0.1:1600")) is None
    assert [k for k, _, _ in events] == ["device-admitted", "device-quarantined", "device-admitted"]
