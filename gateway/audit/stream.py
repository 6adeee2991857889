"""The audit stream: the committed log, sent to IoT Hub under the gateway's own identity.

:class:`AuditStream` is an :class:`~gateway.store.queue.EnvelopeQueue` of one device, the
gateway, so the same :class:`~gateway.uplink.session.DeviceSession` (TLS, CONNACK, backoff,
PUBACK windows, the hub's throttles) carries it. Each message is a run of consecutive items of
the log (records and heads), as the JSON lines of the audit file, up to ``message_bytes``:

- properties: ``fg-stream=audit`` (route it apart from telemetry), ``fg-chain`` (the chain id),
  ``fg-pos`` (the first item's position in the log) and ``fg-n`` (how many items), and
  ``$.ct=application/x-ndjson``;
- in order, at least once: an item leaves the log's unsent tail only at the PUBACK of its
  message, and the position the hub has acknowledged is committed with the log, so a restart
  sends again from there (the verifier skips an identical resend as a duplicate).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from gateway.audit.files import P_STREAM, STREAM_AUDIT
from gateway.audit.log import AuditLog
from gateway.core.readings import P_CONTENT_TYPE, P_COUNT, Envelope, Header
from gateway.store.queue import DeviceDepth, Leased

log = logging.getLogger("fieldgate.audit")

P_CHAIN = "fg-chain"
P_POS = "fg-pos"
CONTENT_TYPE = "application/x-ndjson"
MESSAGE_BYTES = 32 * 1024  # well under IoT Hub's 256 KB; a message is metered per 4 KB
READ_ITEMS = 1024  # items read from the log per lease, at most


@dataclass(frozen=True, slots=True)
class AuditHeader(Header):
    """The properties of an audit message (a :class:`Header` so that the session's topic and
    size code serve both streams)."""

    chain: str = ""

    def properties(self) -> dict[str, str]:
        return {
            P_STREAM: STREAM_AUDIT,
            P_CHAIN: self.chain,
            P_POS: str(self.first_seq),
            P_COUNT: str(self.count),
            P_CONTENT_TYPE: CONTENT_TYPE,
        }


class AuditStream:
    """The gateway's one-device queue over the audit log's committed, unacknowledged items."""

    def __init__(self, audit_log: AuditLog, *, message_bytes: int = MESSAGE_BYTES) -> None:
        self._log = audit_log
        self.device_id = audit_log.chain_id
        self._message_bytes = message_bytes
        self._sent = audit_log.acked_pos  # the last item handed to the session
        # Leased messages in order: (last pos, bytes), and which were acked out of order.
        self._leased: deque[tuple[int, int]] = deque()
        self._acked: set[int] = set()
        self._closed = False
        self._keep_unsent = False
        self.messages_acked = 0

    async def put(self, envelopes: Sequence[Envelope]) -> None:
        raise TypeError("the audit stream is fed by the audit log, not by put()")

    async def lease(self, device_id: str, limit: int) -> list[Leased]:
        log_ = self._log
        if self._closed and self._keep_unsent:
            return []
        while self._sent >= log_.committed_pos:
            if self._closed:
                return []
            event = log_.committed
            event.clear()
            if self._sent < log_.committed_pos:
                break
            await event.wait()
        items = await log_.read(self._sent, min(READ_ITEMS, 64 * max(1, limit)))
        items = [item for item in items if item[0] <= log_.committed_pos]
        out: list[Leased] = []
        run: list[tuple[int, str]] = []
        size = 0
        for pos, line in items:
            if run and (size + len(line) + 1 > self._message_bytes):
                out.append(self._message(run))
                run, size = [], 0
                if len(out) >= limit:
                    break
            run.append((pos, line))
            size += len(line) + 1
        else:
            if run:
                out.append(self._message(run))
        return out

    def _message(self, run: list[tuple[int, str]]) -> Leased:
        first, last = run[0][0], run[-1][0]
        body = "".join(line + "\n" for _, line in run).encode("utf-8")
        header = AuditHeader(
            version=1,
            key_id="",
            boot_id="",
            first_seq=first,
            count=len(run),
            codec="ndjson",
            chain=self.device_id,
        )
        self._sent = last
        # What the log counts for its quota: the lines, without the newlines of the body.
        self._leased.append((last, sum(len(line) for _, line in run)))
        return Leased(last, Envelope(self.device_id, header, body))

    def ack(self, device_id: str, lease_id: int) -> None:
        self._acked.add(lease_id)
        acked_to, size = -1, 0
        while self._leased and self._leased[0][0] in self._acked:
            last, n = self._leased.popleft()
            self._acked.discard(last)
            acked_to, size = last, size + n
            self.messages_acked += 1
        if acked_to >= 0:
            self._log.acked(acked_to, size)

    def release(self, device_id: str) -> None:
        self._leased.clear()
        self._acked.clear()
        self._sent = self._log.acked_pos

    def close(self, *, keep_unsent: bool = False) -> None:
        """No more items will come. ``keep_unsent``: the session is not connected, so what is
        unsent waits in the log for the next start instead of holding the stop."""
        self._closed = True
        self._keep_unsent = keep_unsent
        self._log.committed.set()

    def depth(self) -> list[DeviceDepth]:
        unsent = self._log.committed_pos - self._log.acked_pos
        return [DeviceDepth(self.device_id, max(0, unsent), len(self._leased), 0, None)]

    def pending(self, device_id: str) -> int:
        """Committed items not yet handed to the session."""
        if self._closed and self._keep_unsent:
            return 0
        return max(0, self._log.committed_pos - self._sent)

    def holds(self, device_id: str) -> bool:
        if self._closed and self._keep_unsent:
            return False
        return self._log.committed_pos > self._log.acked_pos


Send = Callable[[bytes, dict[str, str]], Awaitable[None]]


@dataclass
class Pump:
    """The stream through another sender than a device session: an IoT Edge module's output
    (``gateway.edge``), one message at a time, in order; an item is acknowledged when ``send``
    returns (the module client's PUBACK). A failed send puts everything back and is retried
    with backoff; the log keeps every item meanwhile."""

    stream: AuditStream
    send: Send
    connected: bool = False
    last_error: str | None = None

    async def run(self) -> None:
        from gateway.core.backoff import backoff_delay

        attempt = 0
        device = self.stream.device_id
        while True:
            items = await self.stream.lease(device, 1)
            if not items:
                return
            try:
                for item in items:
                    await self.send(item.envelope.body, item.envelope.header.properties())
                    self.stream.ack(device, item.lease_id)
            except Exception as err:  # the sender's own errors: the module client's
                self.connected = False
                if self.last_error is None:
                    log.warning("audit stream: sending failed (%s); retrying", err)
                self.last_error = str(err)
                self.stream.release(device)
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, 0.5, 30.0))
                continue
            if self.last_error is not None:
                log.info("audit stream: sending again")
            self.connected, self.last_error, attempt = True, None, 0
