"""The audit room as the gateway runs it: start records and tamper checks, the watchers, the
stream's session under the gateway's identity, and the stop's last record and head.

The gateway (``gateway/app.py``) makes one :class:`AuditRoom` per run and calls it at four
points: :meth:`started` once the store is open, :meth:`tasks` beside the uplink sessions,
:meth:`sink` around a device's readings (its tamper inputs), and :meth:`stopping` before the
sessions drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.audit import tamper
from gateway.audit.stream import AuditStream, Pump, Send
from gateway.audit.tamper import Baseline, ClockWatch, TamperFiles, TamperInputs
from gateway.core.readings import Scan

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.events import SecurityEvents
    from gateway.uplink.session import DeviceSession
    from gateway.uplink.throttle import RateLimiter

log = logging.getLogger("fieldgate.audit")

CLOCK_INTERVAL = 1.0  # seconds between clock checks
STOP_COMMIT_WAIT = 2.0  # seconds the stop waits for its last records to commit


class AuditRoom:
    def __init__(
        self,
        config: Config,
        events: SecurityEvents,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.events = events
        self.log = events.audit
        audit = config.audit
        self.clock = ClockWatch(audit.clock_jump, wall, mono)
        self.inputs = TamperInputs.of(
            (d.id, [(t.point, t.normal) for t in d.tamper]) for d in config.devices if d.enabled
        )
        self.files = TamperFiles.of((f.name, f.path, f.normal) for f in audit.tamper_files)
        self.signals: dict[str, dict[str, Any]] = {}  # kind -> the last one's details, and when
        self.stream: AuditStream | None = None
        self.session: DeviceSession | None = None
        self.pump: Pump | None = None

    @property
    def streaming(self) -> bool:
        return self.config.audit.stream and self.config.gateway.cert is not None

    # -- start ------------------------------------------------------------------------------

    def started(
        self, boot_id: str, store_boot: str | None, config_hash: str = "", config_source: str = ""
    ) -> None:
        """Compare this run with the last one's baselines; record the start. ``config_hash``:
        the config's SHA-256 as loaded (its file's bytes, or the twin document's); by default
        the digest of its values."""
        cfg = self.config
        manifest = tamper.code_manifest(tamper.code_roots())
        now = Baseline(
            config=config_hash or tamper.config_digest(cfg),
            code=tamper.manifest_digest(manifest),
            manifest=manifest,
            store_boot=store_boot if cfg.store.kind != "memory" else None,
            now=time.time(),
        )
        last = self.log.last
        signals = tamper.start_signals(
            self.log.meta,
            now,
            last.ts if last is not None else None,
            config_from_cloud=config_source.startswith("twin"),
        )
        from gateway import __version__

        self.events.record(
            "gateway-started",
            None,
            "the gateway started",
            boot_id=boot_id,
            config_digest=now.config,
            code_digest=now.code,
            version=__version__,
            pid=os.getpid(),
            devices=sum(1 for d in cfg.devices if d.enabled),
            signed=self.log.signed,
            stream=self.streaming,
        )
        # What changed since the last run, right after the start's own record.
        for kind, reason, details in signals:
            if kind.startswith("tamper-"):
                self.signal(kind, None, reason, **details)
            else:
                self.events.record(kind, None, reason, **details)
        certs = self._certificates(cfg)
        for name, old, new in tamper.certificate_changes(self.log.meta, certs):
            self.events.record(
                "certificate-changed",
                None if name == cfg.gateway.id else name,
                "the identity's certificate was replaced since the last run (issued or renewed)",
                identity=name,
                old=old,
                new=new,
            )
        for key, value in tamper.baseline_meta(now).items():
            self.log.set_meta(key, value)
        self.log.set_meta(tamper.META_CERTS, json.dumps(certs, sort_keys=True))
        if not self.log.signed:
            log.warning(
                "audit: no gateway identity ([gateway] cert and key; `fieldgate pki init` makes "
                "one): the audit log is chained but its heads are not signed, and it is not sent"
            )

    def reconfigured(self, config: Config, config_hash: str = "") -> None:
        """A staged config was applied: its digest is the baseline the next start compares
        with (a reload is recorded as such, not as tamper), and its tamper inputs are
        watched from now on (an input that stays keeps its state)."""
        self.config = config
        old = self.inputs.inputs
        self.inputs = TamperInputs.of(
            (d.id, [(t.point, t.normal) for t in d.tamper]) for d in config.devices if d.enabled
        )
        for device, points in self.inputs.inputs.items():
            for point, state in points.items():
                before = old.get(device, {}).get(point)
                if before is not None and before.normal == state.normal:
                    state.tripped = before.tripped
        files = {f.name: f for f in self.files.files}
        self.files = TamperFiles.of((f.name, f.path, f.normal) for f in config.audit.tamper_files)
        for f in self.files.files:
            kept = files.get(f.name)
            if kept is not None and (kept.path, kept.normal) == (f.path, f.normal):
                f.state = kept.state
        self.clock.threshold = config.audit.clock_jump
        self.log.set_meta(tamper.META_CONFIG, config_hash or tamper.config_digest(config))
        # Certificates a reload brought are this run's: not "replaced" at the next start.
        self.log.set_meta(tamper.META_CERTS, json.dumps(self._certificates(config), sort_keys=True))

    @staticmethod
    def _certificates(cfg: Config) -> dict[str, str]:
        return tamper.certificate_digests(
            {d.id: d.cert for d in cfg.devices}
            | ({cfg.gateway.id: cfg.gateway.cert} if cfg.gateway.cert is not None else {})
        )

    def signal(self, kind: str, device: str | None, reason: str, **details: Any) -> None:
        self.signals[kind] = {"at": time.time(), "device": device, "reason": reason, **details}
        self.events.record(kind, device, reason, **details)

    # -- the running gateway ----------------------------------------------------------------

    def make_sender(
        self,
        context: ssl.SSLContext | None,
        connects: RateLimiter,
        sends: RateLimiter,
        output: Send | None = None,
    ) -> Coroutine[Any, Any, None] | None:
        """What sends the stream, to run beside the device sessions: the gateway identity's
        own session to the hub, or ``output`` (an IoT Edge module's output); None when the
        log is not streamed."""
        if not self.streaming:
            return None
        self.stream = AuditStream(self.log)
        if output is not None:
            self.pump = Pump(self.stream, output)
            return self.pump.run()
        if context is None:
            return None
        from gateway.uplink.session import DeviceSession

        self.session = DeviceSession(
            self.config.gateway.id,
            self.config.hub,
            context,
            self.stream,
            connects,
            sends,
            on_event=self.events.record,
        )
        return self.session.run()

    @property
    def connected(self) -> bool:
        if self.session is not None:
            return self.session.stats.connected
        return self.pump is not None and self.pump.connected

    def tasks(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        out: list[tuple[str, Coroutine[Any, Any, None]]] = [
            ("audit-log", self.log.run()),
            ("audit-watch", self.watch()),
        ]
        return out

    async def watch(self) -> None:
        """The clock and the tamper files, until cancelled."""
        interval = min(CLOCK_INTERVAL, self.config.audit.tamper_interval)
        self.clock.check()
        next_files = 0.0
        while True:
            jump = self.clock.check()
            if jump is not None:
                self.signal(
                    "tamper-clock-jump",
                    None,
                    f"the wall clock moved {jump:+.3f} s against the monotonic clock",
                    jump=round(jump, 3),
                    threshold=self.config.audit.clock_jump,
                )
            mono = time.monotonic()
            if self.files.files and mono >= next_files:
                next_files = mono + self.config.audit.tamper_interval
                for name, state, value in self.files.check():
                    self.signal(
                        "tamper-input",
                        None,
                        f"tamper file {name} is {state}",
                        input=name,
                        state=state,
                        value=value,
                    )
            await asyncio.sleep(interval)

    def sink(self, sink: Callable[[Scan], None]) -> Callable[[Scan], None]:
        """``sink``, also watching the tamper inputs of the scans' device: for a device whose
        config has some (the inputs are looked up at each scan, so a reload that brings them
        is watched as soon as :meth:`reconfigured` installs them)."""

        def watched(scan: Scan) -> None:
            for device, point, value, tripped in self.inputs.check(scan):
                self.signal(
                    "tamper-input",
                    device,
                    f"tamper input {point} is {'tripped' if tripped else 'normal again'}",
                    input=point,
                    state="tripped" if tripped else "normal",
                    value=value,
                )
            sink(scan)

        return watched

    # -- stop -------------------------------------------------------------------------------

    async def stopping(self, why: str) -> None:
        """The stop's record and a head over it, committed before the stream's last lease, so
        that the session's drain sends them."""
        self.events.record("gateway-stopped", None, why)
        self.log.sign_head()
        committed = self.log.committed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_COMMIT_WAIT):
                while self.log.committed_pos < self.log.appended_pos:
                    committed.clear()
                    await committed.wait()
        if self.stream is not None:
            # Durable in the log either way: a sender that is down does not hold the stop.
            connected = self.connected
            self.stream.close(keep_unsent=not connected)
            if self.session is not None:
                self.session.finish()
            if not connected and self.log.committed_pos > self.log.acked_pos:
                log.info(
                    "audit: %d items not sent (the hub is not connected): kept in %s for the "
                    "next start",
                    self.log.committed_pos - self.log.acked_pos,
                    self.log.path,
                )

    def device_tamper(self, device_id: str) -> dict[str, str]:
        """The device's tamper inputs and their state (its ``status`` method shows them)."""
        return {
            point: "tripped" if state.tripped else "normal"
            for point, state in self.inputs.inputs.get(device_id, {}).items()
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.log.status(),
            "streaming": self.streaming,
            "messages_acked": self.stream.messages_acked if self.stream is not None else 0,
            "connected": self.connected,
            "tamper": {
                "signals": self.signals,
                "inputs_tripped": self.inputs.tripped() + self.files.tripped(),
            },
        }
