"""Frozen values that cross rooms.

A device read produces a :class:`Scan`: the values of several points read at one instant. Scans
are what adapters hand to the gateway; the per-reading view (:class:`Reading`) exists only where a
consumer opens an envelope. Keeping a scan as one object with a shared, precomputed names tuple is
what keeps the hot path per-read rather than per-point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GOOD = "good"
BAD = "bad"
# A scan of points that could not be read this period (a refused read): every value is None.
UNAVAILABLE = "unavailable"

ENVELOPE_VERSION = 1
CODEC = "json+zstd"
CONTENT_TYPE = "application/vnd.fieldgate.envelope"

# Message property names. They are short because they ride in every topic.
P_VERSION = "fg-v"
P_KEY_ID = "fg-kid"
P_BOOT_ID = "fg-boot"
P_SEQ = "fg-seq"
P_COUNT = "fg-n"
P_CODEC = "fg-codec"
P_CONTENT_TYPE = "$.ct"


@dataclass(frozen=True, slots=True)
class Scan:
    """Values of ``names`` read from one device at ``ts_ms`` (Unix milliseconds)."""

    device_id: str
    ts_ms: int
    names: tuple[str, ...]
    values: list[Any]
    quality: str = GOOD


@dataclass(frozen=True, slots=True)
class Reading:
    """One typed value of one point at one time, as a consumer sees it."""

    device_id: str
    boot_id: str
    seq: int
    point: str
    value: Any
    ts_ms: int
    quality: str


@dataclass(frozen=True, slots=True)
class Header:
    """The envelope header: travels in the clear, bound into the AEAD."""

    version: int
    key_id: str
    boot_id: str
    first_seq: int
    count: int
    codec: str = CODEC

    def properties(self) -> dict[str, str]:
        return {
            P_VERSION: str(self.version),
            P_KEY_ID: self.key_id,
            P_BOOT_ID: self.boot_id,
            P_SEQ: str(self.first_seq),
            P_COUNT: str(self.count),
            P_CODEC: self.codec,
            P_CONTENT_TYPE: CONTENT_TYPE,
        }

    @classmethod
    def from_properties(cls, props: dict[str, str]) -> Header:
        """Parse message properties; raises ValueError naming a missing or bad property."""
        try:
            return cls(
                version=int(props[P_VERSION]),
                key_id=props[P_KEY_ID],
                boot_id=props[P_BOOT_ID],
                first_seq=int(props[P_SEQ]),
                count=int(props[P_COUNT]),
                codec=props[P_CODEC],
            )
        except KeyError as err:
            raise ValueError(f"envelope property {err.args[0]} is missing") from err
        except ValueError as err:
            raise ValueError(f"envelope property is malformed: {err}") from err


@dataclass(frozen=True, slots=True)
class Envelope:
    """A sealed batch of one device: the only form readings take after the sealer."""

    device_id: str
    header: Header
    body: bytes
    # When the oldest reading inside was read; local bookkeeping, never sent.
    oldest_ts_ms: int = 0

    @property
    def size(self) -> int:
        """Bytes IoT Hub meters: the body plus the properties riding in the topic."""
        from gateway.core.iothub import encode_properties

        return len(self.body) + len(encode_properties(self.header.properties()))
