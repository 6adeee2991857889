"""The bonds this gateway made, kept in ``state_dir/ble-bonds.json``.

BlueZ does not say whether a bond is authenticated: only the agent that made it knows. So the
book records, per identity address, how fieldgate's agent made each bond, and which identity
each app id was first admitted with (an app id stays bound to it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from gateway.core import codec

log = logging.getLogger("adapters.ble")

BONDS_FILE = "ble-bonds.json"


class BondBook:
    """How each bond was made, by identity address, and which identity each app id is bound to.

    Kept in ``ble-bonds.json`` (written atomically) because BlueZ does not say whether a bond
    is authenticated: only the agent that made it knows.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / BONDS_FILE
        self._data: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self._data = codec.loads(self.path.read_bytes())
            except codec.JSONDecodeError:
                broken = self.path.with_suffix(f".broken-{int(time.time())}")
                self.path.rename(broken)
                log.error("%s was not JSON; kept as %s, bonds start anew", self.path, broken)

    def level(self, identity: str) -> str | None:
        entry = self._data.get(identity)
        return None if entry is None else str(entry["level"])

    def identity_of(self, app_id: str) -> str | None:
        for identity, entry in self._data.items():
            if entry.get("app_id") == app_id:
                return identity
        return None

    def record(self, identity: str, level: str) -> None:
        """A bond this gateway's agent just made."""
        self._data[identity] = {"level": level, "app_id": None, "at": time.time()}
        self._save()

    def bind(self, identity: str, app_id: str) -> None:
        """An app id was admitted with this identity: from now on it is bound to it."""
        entry = self._data.setdefault(identity, {"level": "just-works", "at": time.time()})
        if entry.get("app_id") != app_id:
            entry["app_id"] = app_id
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # created anew below, 0600 (it names paired devices)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(codec.dumps(self._data, indent=True))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
