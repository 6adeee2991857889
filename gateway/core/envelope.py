"""Envelope v1: seal a batch, and open it again (the consumer side uses this same module).

Body: ``nonce (12 bytes) || AES-256-GCM(zstd(json(batch)))``. The header travels in the clear as
message properties and, together with the device id, is the AEAD's associated data: a flipped
byte anywhere, or an envelope moved to another device, boot or sequence number, fails to open.
See docs/envelope.md for the format and a worked example.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zstandard

from gateway.core import codec
from gateway.core.aead import NONCE_BYTES as NONCE_BYTES  # the store's sanity check reads them
from gateway.core.aead import TAG_BYTES as TAG_BYTES
from gateway.core.aead import Aead, AeadError, Keyring
from gateway.core.batcher import Batch
from gateway.core.errors import EnvelopeError, KeyringError
from gateway.core.readings import (
    BAD,
    CODEC,
    ENVELOPE_VERSION,
    GOOD,
    Envelope,
    Header,
    Reading,
    Scan,
)

# A decompressed batch larger than this is refused rather than allocated (a zstd bomb).
MAX_PLAIN_BYTES = 16 * 1024 * 1024
# IoT Hub refuses device-to-cloud messages over 256 KB.
HUB_MESSAGE_CAP = 256 * 1024


def associated_data(device_id: str, header: Header) -> bytes:
    """The canonical encoding of the header plus the device id."""
    fields = (
        ("codec", header.codec),
        ("count", str(header.count)),
        ("device", device_id),
        ("first_seq", str(header.first_seq)),
        ("boot", header.boot_id),
        ("key_id", header.key_id),
        ("version", str(header.version)),
    )
    return b"fieldgate-envelope\n" + "\n".join(f"{k}={v}" for k, v in fields).encode()


def encode_scans(scans: Iterable[Scan]) -> bytes:
    """The plaintext batch: point-name tables once, then one row per scan."""
    tables: dict[tuple[str, ...], int] = {}
    rows = []
    for scan in scans:
        index = tables.get(scan.names)
        if index is None:
            index = tables[scan.names] = len(tables)
        rows.append((scan.ts_ms, index, scan.values, scan.quality))
    return codec.dumps({"p": list(tables), "s": rows})


@dataclass(slots=True)
class Sealed:
    """What sealing one batch gave: the envelopes, the scans that did not fit (to start the
    next batch, ahead of newer scans), and, per envelope sealed on the way, (the batcher's raw
    estimate for its share of the batch, its metered size) for the batcher to learn from."""

    envelopes: list[Envelope] = field(default_factory=list)
    leftover: list[Scan] = field(default_factory=list)
    observed: list[tuple[int, int]] = field(default_factory=list)


class Sealer:
    """Turns batches into envelopes of at most ``max_bytes`` for one gateway boot; owns the
    per-device sequence numbers. It knows nothing of the batcher: what it learnt about sizes
    goes back in :attr:`Sealed.observed`."""

    def __init__(
        self,
        key: bytes,
        key_id: str,
        boot_id: str,
        max_bytes: int,
        next_seq: dict[str, int] | None = None,
    ) -> None:
        self._aead = Aead(key)
        self._key_id = key_id
        self.boot_id = boot_id
        self.max_bytes = max_bytes
        self._zstd = zstandard.ZstdCompressor(level=1)
        self.next_seq: dict[str, int] = dict(next_seq or {})

    def seal(self, batch: Batch, *, final: bool = False) -> Sealed:
        """Seal a batch into envelopes of at most ``max_bytes``.

        When the batch came out too big (the batcher's estimate was low), the scans that did
        not fit are returned to start the next batch, so units stay full; with ``final`` (a
        shutdown flush) they are sealed into further envelopes instead.
        """
        scans = batch.scans
        out = Sealed()
        estimated = batch.estimated_raw
        limit = self.max_bytes
        while scans:
            envelope = self._seal_one(batch.device_id, scans)
            share = estimated * len(scans) // max(1, len(batch.scans))
            out.observed.append((share, envelope.size))
            if envelope.size > limit and len(scans) > 1:
                # Keep the share that fits, judged by size, and try again with it.
                keep = max(1, min(len(scans) - 1, len(scans) * limit * 95 // (envelope.size * 100)))
                envelope, used = self._seal_fitting(batch.device_id, scans[:keep])
                out.envelopes.append(envelope)
                rest = scans[used:]
                if not final:
                    out.leftover = list(rest)
                    return out
                scans = rest
                continue
            if envelope.size > HUB_MESSAGE_CAP:
                raise EnvelopeError(
                    f"{batch.device_id}: one scan seals to {envelope.size} bytes, over "
                    "IoT Hub's 256 KB message cap"
                )
            self._commit(envelope)
            out.envelopes.append(envelope)
            break
        return out

    def _seal_fitting(self, device_id: str, scans: list[Scan]) -> tuple[Envelope, int]:
        """Seal the longest head of ``scans`` that fits (at least one scan); returns the
        envelope and how many scans it holds."""
        while True:
            envelope = self._seal_one(device_id, scans)
            if envelope.size <= self.max_bytes or len(scans) == 1:
                self._commit(envelope)
                return envelope, len(scans)
            scans = scans[: max(1, len(scans) * 9 // 10)]

    def _commit(self, envelope: Envelope) -> None:
        self.next_seq[envelope.device_id] = envelope.header.first_seq + envelope.header.count

    def _seal_one(self, device_id: str, scans: list[Scan]) -> Envelope:
        count = sum(len(s.values) for s in scans)
        first = self.next_seq.get(device_id, 0)
        header = Header(ENVELOPE_VERSION, self._key_id, self.boot_id, first, count, CODEC)
        plain = self._zstd.compress(encode_scans(scans))
        body = self._aead.seal(plain, associated_data(device_id, header))
        return Envelope(device_id, header, body, scans[0].ts_ms)


def open_envelope(device_id: str, header: Header, body: bytes, keyring: Keyring) -> list[Reading]:
    """Authenticate, decrypt and decode one envelope, or raise :class:`EnvelopeError`."""
    if header.version != ENVELOPE_VERSION:
        raise EnvelopeError(f"unsupported envelope version {header.version}")
    if header.codec != CODEC:
        raise EnvelopeError(f"unsupported codec {header.codec!r}")
    if len(body) < NONCE_BYTES + TAG_BYTES:
        raise EnvelopeError("body too short to be an envelope")
    try:
        key = keyring.get(header.key_id)
    except KeyringError as err:
        raise EnvelopeError(str(err)) from err
    try:
        plain = Aead(key).open(body, associated_data(device_id, header))
    except AeadError as err:
        raise EnvelopeError(
            f"{device_id} seq {header.first_seq}: authentication failed (tampered, moved to "
            "another device or sequence, or sealed under another key)"
        ) from err
    try:
        size = zstandard.frame_content_size(plain)
        if size < 0 or size > MAX_PLAIN_BYTES:
            raise EnvelopeError(f"decompressed size {size} is not allowed")
        doc = codec.loads(zstandard.ZstdDecompressor().decompress(plain))
        readings = list(_readings(device_id, header, doc))
    except (
        zstandard.ZstdError,
        codec.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
        IndexError,
    ) as err:
        raise EnvelopeError(f"{device_id} seq {header.first_seq}: malformed batch: {err}") from err
    if len(readings) != header.count:
        raise EnvelopeError(
            f"{device_id}: header says {header.count} readings, body has {len(readings)}"
        )
    return readings


def _readings(device_id: str, header: Header, doc: dict[str, Any]) -> Iterator[Reading]:
    tables = doc["p"]
    seq = header.first_seq
    boot = header.boot_id
    for ts_ms, index, values, quality in doc["s"]:
        names = tables[index]
        if len(names) != len(values):
            raise ValueError("a scan's values do not match its point names")
        for name, value in zip(names, values, strict=True):
            # A None value in a good scan is bad; a scan sent as unavailable stays unavailable.
            told = BAD if value is None and quality == GOOD else quality
            yield Reading(device_id, boot, seq, name, value, ts_ms, told)
            seq += 1
