"""Read plans learnt from devices' refusals, kept in ``state_dir/modbus-plans.json``.

One JSON object keyed by :func:`adapters.modbus.plan.map_key` (device id and a hash of its
point map), so a changed map starts afresh. Written whole, atomically (a temporary file in the
same directory, fsynced, renamed over the old one), mode 0600. A file that cannot be read is
ignored: the link starts from the configured plan, and learns again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILENAME = "modbus-plans.json"


class PlanStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILENAME
        self._doc: dict[str, Any] | None = None  # read once: every link of a fleet asks

    def _load_all(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = self._read()
        return self._doc

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("%s: ignored, cannot be read: %s", self.path, err)
            return {}
        return doc if isinstance(doc, dict) else {}

    def load(self, key: str) -> object:
        return self._load_all().get(key)

    def save(self, key: str, entry: object) -> None:
        """Keep ``entry``. Written at once (a split is rare: a device's map is learnt in its
        first periods, then kept)."""
        doc = self._load_all()
        doc[key] = entry
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("%s: cannot keep the learnt read plan: %s", self.path, err)
            tmp.unlink(missing_ok=True)
