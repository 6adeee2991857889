"""systemd notifications (sd_notify(3)) to a real AF_UNIX datagram socket standing in for
systemd's: READY=1 once the gateway runs, WATCHDOG=1 every WATCHDOG_USEC/2, STOPPING=1 at the
stop."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from gateway.ops.notify import Notifier, watchdog_interval

from conftest import Proc, fieldgate, start_hub, start_simulator


class Listener:
    """systemd's side: a datagram socket whose messages are kept with their arrival time."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sock.close()

    def times(self, message: str) -> list[float]:
        return [t for t, m in self.messages if m == message]


def test_the_gateway_tells_systemd_ready_watchdog_and_stopping_in_order(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.2")
    path = tmp_path / "notify.sock"
    listener = Listener(str(path))
    try:
        # WatchdogSec=0.2s: pings every 0.1 s.
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gw.log", env=env)
        procs.append(gateway)
        gateway.wait_for("connected to localhost")
        time.sleep(1.0)
        ready = listener.times("READY=1")
        assert len(ready) == 1, listener.messages
        assert listener.times("STOPPING=1") == []
        stop_at = time.monotonic()
        assert gateway.stop() == 0, gateway.output()[-2000:]
        time.sleep(0.3)
    finally:
        listener.close()
    assert {m for _, m in listener.messages} == {"READY=1", "WATCHDOG=1", "STOPPING=1"}
    # READY first, STOPPING once after the SIGTERM, and the pings from the start to the end.
    assert listener.messages[0][1] == "READY=1"
    [stopping] = listener.times("STOPPING=1")
    assert ready[0] < stop_at < stopping
    pings = listener.times("WATCHDOG=1")
    before = [t for t in pings if t < stop_at]
    assert len(before) >= 8, pings
    gaps = [b - a for a, b in itertools.pairwise(before)]
    assert 0.05 < statistics.median(gaps) < 0.2, gaps


def test_an_abstract_socket_name_and_who_the_watchdog_is_for() -> None:
    name = f"fieldgate-test-{secrets.token_hex(6)}"
    listener = Listener(b"\0" + name.encode())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.enabled and notifier.watchdog is None
        notifier.send("READY=1")
        notifier.close()
        deadline = time.monotonic() + 5
        while not listener.messages and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        listener.close()
    assert [m for _, m in listener.messages] == ["READY=1"]
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None
    assert not Notifier({}).enabled


def test_a_gone_systemd_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    with caplog.at_level(logging.WARNING, logger="fieldgate.ops"):
        for _ in range(3):
            notifier.send("WATCHDOG=1")
    notifier.close()
    [record] = caplog.records
    assert "not sent to $NOTIFY_SOCKET" in record.getMessage()
