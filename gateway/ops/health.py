"""``/healthz`` and ``/readyz``: what a supervisor or a probe asks.

Alive (``/healthz``): the answer itself is the proof, since the listener runs on the gateway's
event loop; a stuck loop answers nothing, and the probe times out.

Ready (``/readyz``): decided here, purely, from what the gateway knows: not stopping, the store
takes writes, and every enabled device's hub session is connected. A gateway that refuses to
start never opens the listener, so a probe sees it as not ready (connection refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.core import codec

# Devices named in a not-ready answer, at most: the count says how many there are.
NAMED = 10


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: list[str] = field(default_factory=list)

    def body(self) -> bytes:
        return codec.dumps({"ready": self.ready, "reasons": self.reasons}) + b"\n"


def readiness(
    *, stopping: bool, store_problem: str | None, connected: Mapping[str, bool]
) -> Readiness:
    """``connected``: each enabled device's hub session, connected or not."""
    reasons = []
    if stopping:
        reasons.append("stopping")
    if store_problem is not None:
        reasons.append(f"store: {store_problem}")
    down = sorted(d for d, up in connected.items() if not up)
    if down:
        named = ", ".join(down[:NAMED]) + (", ..." if len(down) > NAMED else "")
        reasons.append(f"uplink: {len(down)} of {len(connected)} sessions not connected ({named})")
    if not connected and not stopping:
        reasons.append("uplink: no sessions started yet")
    return Readiness(not reasons, reasons)
