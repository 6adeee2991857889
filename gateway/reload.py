"""``fieldgate reload --config FILE``: validate the file here, then have the gateway running on
its state folder apply it, and print how that ended.

The running gateway is the process that holds the state folder's lock (its pid is in the lock
file, :mod:`gateway.statelock`); it reloads the config file it was started with on SIGHUP and
writes the outcome to ``state_dir/config-status.json`` (:mod:`gateway.config.sources`). Exit 0:
applied; 1: refused by the gateway, rolled back, no outcome in time, or no gateway running; 2:
the file is refused here already (the gateway is not signalled).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway.config import sources
from gateway.core.errors import EXIT_FAILED, EXIT_REFUSED, ConfigError
from gateway.statelock import LOCK_NAME, holder

POLL = 0.1  # the status file is another process's: nothing to wait on but the file


def reload(config: Path, *, timeout: float = 60.0, as_json: bool = False) -> int:
    try:
        candidate = sources.from_file(config)
    except ConfigError as err:
        print(f"fieldgate reload: refused here, the gateway was not asked: {err}", file=sys.stderr)
        return EXIT_REFUSED
    state_dir = candidate.config.gateway.state_dir
    pid = holder(state_dir / LOCK_NAME)
    if pid is None:
        print(
            f"fieldgate reload: no gateway is running on {state_dir} (nothing holds "
            f"{state_dir / LOCK_NAME}); start one with `fieldgate run --config {config}`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    asked = time.time()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as err:
        print(f"fieldgate reload: cannot signal pid {pid}: {err.strerror}", file=sys.stderr)
        return EXIT_FAILED
    status = _wait(state_dir, asked, timeout)
    if status is None:
        print(
            f"fieldgate reload: pid {pid} gave no outcome within {timeout:.0f} s "
            f"(see {state_dir / sources.STATUS_FILE} and its log)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(describe(status))
    return 0 if status.get("status") == "applied" else EXIT_FAILED


def _wait(state_dir: Path, asked: float, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sources.read_status(state_dir)
        if status is not None and float(status.get("at") or 0) >= asked:
            return status
        time.sleep(POLL)
    return None


def describe(status: dict[str, Any]) -> str:
    """One line: ``applied abc123def456 (SIGHUP): 1 added, 0 removed, 0 changed, 3 unchanged``."""
    what = str(status.get("status"))
    digest = str(status.get("hash") or "-")[:12]
    line = f"{what} {digest} ({status.get('source')})"
    plan = status.get("plan") or {}
    if plan:
        line += (
            f": {len(plan.get('added', []))} added, {len(plan.get('removed', []))} removed, "
            f"{len(plan.get('changed', []))} changed, {plan.get('unchanged', 0)} unchanged"
        )
    if status.get("error"):
        where = f" [field {status['field']}]" if status.get("field") else ""
        line += f"\n  {status['error']}{where}"
    return line
