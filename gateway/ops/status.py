"""``fieldgate status``: the running gateway describes itself over ``state_dir/status.sock``.

The gateway listens on a unix socket in its state folder (0600, like the folder's other files;
removed at stop). A client connects, the gateway writes one JSON document and closes: devices
(state, since, last error, reads, identity, store depth, uplink), links, sessions, store, audit
(when the gateway has a lag callable), boot id. The state folder's lock already guarantees one
gateway per folder, so a socket file left by a killed gateway is simply replaced at start; a
client that finds no one listening says no gateway runs for that config (exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.core import codec
from gateway.core.errors import FieldgateError
from gateway.store.paths import worker_indices, worker_state_dir

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.config import Config

SOCKET_NAME = "status.sock"
READ_LIMIT = 64 * 1024 * 1024  # a thousand devices are about 1 MB of JSON


class NoGateway(FieldgateError):
    """No gateway answers on the status socket of a config's state folder (exit 1)."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def document(gw: Gateway, *, stopping: bool, ready: dict[str, Any]) -> dict[str, Any]:
    """What ``status`` answers, read from the gateway's state in one pass."""
    depths = {d.device_id: d for d in (gw.queue.depth() if gw.queue is not None else [])}
    now_ms = time.time() * 1000
    devices = []
    for device_id, health in gw.health.items():
        depth = depths.get(device_id)
        session = gw.sessions.get(device_id)
        devices.append(
            {
                "device": device_id,
                "state": health.state,
                "since": round(health.since, 3),
                "last_read": round(health.last_ok, 3) if health.last_ok is not None else None,
                "last_error": health.last_error,
                "reads_ok": health.reads_ok,
                "reads_failed": health.reads_failed,
                "malformed": health.malformed,
                "identity": gw.identity_state(device_id),
                "store": {
                    "queued": depth.queued if depth else 0,
                    "leased": depth.leased if depth else 0,
                    "bytes": depth.bytes if depth else 0,
                    "readings": depth.readings if depth else 0,
                    "oldest_age_s": (
                        round((now_ms - depth.oldest_ts_ms) / 1000, 3)
                        if depth and depth.oldest_ts_ms and (depth.queued or depth.leased)
                        else None
                    ),
                },
                "uplink": {
                    "connected": session.stats.connected if session else False,
                    "connects": session.stats.connects if session else 0,
                    "readings_acked": session.stats.readings_acked if session else 0,
                    "last_error": session.stats.last_error if session else None,
                    "disconnects": dict(session.stats.disconnects) if session else {},
                },
            }
        )
    links = []
    for bus in gw.buses:
        schedule = bus.schedule
        links.append(
            {
                "link": bus.name,
                "devices": list(bus.units),
                "backed_off": [
                    d for d in bus.units if schedule is not None and schedule.backed_off(d)
                ],
                "connect_attempt": bus.attempt,
            }
        )
    connected = sum(1 for s in gw.sessions.values() if s.stats.connected)
    queue = gw.queue
    doc: dict[str, Any] = {
        "boot_id": gw.boot_id,
        "pid": os.getpid(),
        "config_hash": getattr(gw, "config_hash", None),
        "stopping": stopping,
        "ready": ready,
        "devices": devices,
        "links": links,
        "sessions": {"total": len(gw.sessions), "connected": connected},
        "store": {
            "kind": gw.config.store.kind,
            "envelopes": sum(d.queued + d.leased for d in depths.values()),
            "bytes": sum(d.bytes for d in depths.values()),
            "max_bytes": gw.config.store.max_bytes,
            "policy": gw.config.store.policy,
            "disk_full": bool(getattr(queue, "disk_full", False)),
            "dropped_readings": gw.counters.dropped_readings,
        },
        "audit": None,
    }
    room = getattr(gw, "audit", None)
    if room is not None:
        # The chain, the stream and the tamper signals (gateway/audit/room.py).
        doc["audit"] = room.status()
    if gw.audit_lag is not None:
        pending, age = gw.audit_lag()
        doc["audit"] = {**(doc["audit"] or {}), "pending": pending, "oldest_age_s": age}
    return doc


async def serve(path: Path, answer: Any) -> asyncio.Server:
    """Listen on ``path`` (0600); ``answer()`` gives the bytes each client gets."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a gateway that was killed: the state lock is ours now

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(answer())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(one, path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def ask(path: Path, *, timeout: float = 10.0) -> dict[str, Any]:
    """The running gateway's document (blocking: the CLI's side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except PermissionError as err:
            raise NoGateway(f"{path}: {err.strerror} (run as the gateway's user)") from None
        except OSError as err:  # no such file, nobody listening, a path too long
            why = err.strerror or str(err)
            raise NoGateway(
                f"no gateway runs for this config: nothing answers on {path} ({why})"
            ) from None
        chunks = []
        total = 0
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > READ_LIMIT:
                raise NoGateway(f"{path}: answer larger than {READ_LIMIT} bytes")
    data = b"".join(chunks)
    try:
        doc = codec.loads(data)
    except codec.JSONDecodeError:
        raise NoGateway(f"{path}: the answer is not JSON (another program's socket?)") from None
    if not isinstance(doc, dict):
        raise NoGateway(f"{path}: the answer is not a status document")
    return doc


def ask_gateway(cfg: Config) -> list[tuple[int | None, dict[str, Any]]]:
    """The documents of the gateway that runs ``cfg``: [(None, doc)] for a single process; for
    ``--workers``, one (index, doc) per worker that answers on its own state folder's socket.
    Raises :class:`NoGateway` (naming the main socket) when none answers."""
    main = socket_path(cfg.gateway.state_dir)
    try:
        return [(None, ask(main))]
    except NoGateway as err:
        refused = err
    found: list[tuple[int | None, dict[str, Any]]] = []
    for index in sorted(worker_indices(cfg)):
        path = socket_path(worker_state_dir(cfg, index))
        if path.exists():
            with contextlib.suppress(NoGateway):
                found.append((index, ask(path)))
    if not found:
        raise refused
    return found


def table(doc: dict[str, Any]) -> str:
    """The document for a terminal: a summary, then one row per device and per link."""
    store = doc["store"]
    sessions = doc["sessions"]
    ready = doc.get("ready") or {}
    lines = [
        f"gateway boot {doc['boot_id']} (pid {doc['pid']})"
        + (", stopping" if doc.get("stopping") else "")
        + (f", config {doc['config_hash']}" if doc.get("config_hash") else ""),
        f"ready: {'yes' if ready.get('ready') else 'no'}"
        + ("" if ready.get("ready") else f" ({'; '.join(ready.get('reasons', []))})"),
        f"sessions: {sessions['connected']} of {sessions['total']} connected",
        f"store ({store['kind']}): {store['envelopes']} envelopes, {store['bytes']} of "
        f"{store['max_bytes']} bytes, policy {store['policy']}"
        + (", DISK FULL" if store["disk_full"] else "")
        + (f", {store['dropped_readings']} readings dropped" if store["dropped_readings"] else ""),
    ]
    audit = doc.get("audit")
    if audit is not None:
        age = audit.get("oldest_age_s")
        parts = [f"chain {audit.get('chain', '?')} at seq {audit.get('last_seq')}"]
        if "pending" in audit:
            parts.append(
                f"{audit['pending']} items to send"
                + (f", oldest {age:.1f} s" if age is not None else "")
            )
        elif not audit.get("streaming", False):
            parts.append("not streamed")
        if audit.get("lost"):
            parts.append(f"{audit['lost']} lost (quota)")
        tamper = audit.get("tamper") or {}
        if tamper.get("inputs_tripped"):
            parts.append("TAMPER INPUTS: " + ", ".join(tamper["inputs_tripped"]))
        if tamper.get("signals"):
            parts.append("tamper signals: " + ", ".join(sorted(tamper["signals"])))
        lines.append("audit: " + "; ".join(parts))
    rows: list[tuple[str, ...]] = [
        ("DEVICE", "STATE", "SINCE", "IDENTITY", "READS OK/FAIL", "STORED", "UPLINK", "LAST ERROR")
    ]
    now = time.time()
    for d in doc["devices"]:
        identity = d["identity"]
        ident = identity["state"] + ("" if identity.get("verified", True) else " (unverified)")
        uplink = "connected" if d["uplink"]["connected"] else "down"
        error = d["last_error"] or d["uplink"].get("last_error") or identity.get("reason") or ""
        rows.append(
            (
                d["device"],
                d["state"],
                _ago(now - d["since"]),
                ident,
                f"{d['reads_ok']}/{d['reads_failed']}",
                str(d["store"]["queued"] + d["store"]["leased"]),
                uplink,
                error[:60],
            )
        )
    lines += ["", *_columns(rows)]
    if doc["links"]:
        rows = [("LINK", "DEVICES", "BACKED OFF", "CONNECT ATTEMPT")]
        for link in doc["links"]:
            rows.append(
                (
                    link["link"],
                    str(len(link["devices"])),
                    ", ".join(link["backed_off"]) or "-",
                    str(link["connect_attempt"]),
                )
            )
        lines += ["", *_columns(rows)]
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
