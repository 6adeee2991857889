"""A private ``dbus-daemon`` for the simulated bluetoothd and the gateway under test."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from gateway.runtime import child_process_options

SOCKET_NAME = "system_bus_socket"

# -- the private bus -------------------------------------------------------------------------------

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>fieldgate-ble</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
  <limit name="max_completed_connections">{connections}</limit>
  <limit name="max_incomplete_connections">{connections}</limit>
  <limit name="max_connections_per_user">{connections}</limit>
  <limit name="max_match_rules_per_connection">{connections}</limit>
  <limit name="max_replies_per_connection">{connections}</limit>
  <limit name="max_pending_service_starts">10000</limit>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_message_size">1000000000</limit>
  <limit name="reply_timeout">60000</limit>
</busconfig>
"""


def bus_address(bus_dir: Path) -> str:
    return f"unix:path={bus_dir.resolve() / SOCKET_NAME}"


class PrivateBus:
    """A ``dbus-daemon`` of its own on a socket in ``bus_dir``, with limits raised for a fleet
    (the system bus allows 256 connections per user; every bleak client opens one)."""

    def __init__(self, bus_dir: Path, *, connections: int = 20_000) -> None:
        self.dir = bus_dir.resolve()
        self.address = bus_address(self.dir)
        self._connections = connections
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateBus:
        daemon = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
        if not Path(daemon).exists():
            raise OSError("dbus-daemon is not installed (Debian: apt-get install dbus)")
        self.dir.mkdir(parents=True, exist_ok=True)
        sock = self.dir / SOCKET_NAME
        if len(str(sock)) > 100:
            raise OSError(f"socket path too long for a unix socket: {sock}")
        sock.unlink(missing_ok=True)
        conf = self.dir / "bus.conf"
        conf.write_text(_BUS_CONFIG.format(socket=sock, connections=self._connections))
        self._proc = subprocess.Popen(
            [daemon, f"--config-file={conf}", "--nofork", "--nopidfile", "--nosyslog"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **child_process_options(),
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise OSError(f"dbus-daemon failed: {err.strip()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise OSError("dbus-daemon did not open its socket within 10 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        (self.dir / SOCKET_NAME).unlink(missing_ok=True)
