"""The BLE D-Bus policy (deploy/dbus/fieldgate-ble.conf), loaded by a real dbus-daemon: it is
well-formed in the busconfig shape, the daemon accepts it (it refuses unknown elements and
attributes, so a typo would stop the system bus from loading it), and, with root to run clients
as other users, it lets its user call org.bluez while another user stays refused."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Proc

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "deploy" / "dbus" / "fieldgate-ble.conf"
DAEMON = shutil.which("dbus-daemon")
SEND = shutil.which("dbus-send")
SETPRIV = shutil.which("setpriv")

# What Debian's /usr/share/dbus-1/system.conf says by default, and BlueZ's bluetooth.conf for
# root: the policy under test is only the include.
SYSTEM_BUS = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  <policy user="root">
    <allow own="org.bluez"/>
    <allow send_destination="org.bluez"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""

OWNER = """
import asyncio, sys
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    await bus.request_name("org.bluez")
    print("owns org.bluez", flush=True)
    await bus.wait_for_disconnect()
asyncio.run(main())
"""

needs_daemon = pytest.mark.skipif(DAEMON is None, reason="dbus-daemon is not installed")


def test_the_policy_is_a_busconfig() -> None:
    """The DTD that dbus ships predates send_destination, so the shape is checked here:
    the doctype, a busconfig root, policies for a user, allow/deny rules inside."""
    text = POLICY.read_text()
    assert (
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"' in text
    )
    root = ET.fromstring(text.encode())
    assert root.tag == "busconfig"
    policies = root.findall("policy")
    assert [p.attrib for p in policies] == [{"user": "fieldgate"}]
    rules = list(policies[0])
    assert rules and all(rule.tag in ("allow", "deny") for rule in rules)
    # Nothing wider than bluetoothd: every rule names org.bluez.
    assert all("org.bluez" in rule.attrib.values() for rule in rules), [r.attrib for r in rules]


def _bus(folder: Path, policy: Path) -> tuple[Path, str]:
    socket = folder / "bus"
    config = folder / "system.conf"
    config.write_text(SYSTEM_BUS.format(socket=socket, policy=policy))
    return config, f"unix:path={socket}"


@needs_daemon
def test_dbus_daemon_loads_it(tmp_path: Path) -> None:
    assert DAEMON is not None
    config, _ = _bus(tmp_path, POLICY)
    result = subprocess.run(
        [DAEMON, f"--config-file={config}", "--print-address", "--fork", "--print-pid"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[-1])
    os.kill(pid, 15)
    # A user that does not exist here is only warned about.
    assert not [
        line
        for line in result.stderr.splitlines()
        if "Unknown username" not in line
        and "fd limit" not in line  # no CAP_SYS_RESOURCE in some sandboxes
    ], result.stderr


@needs_daemon
def test_dbus_daemon_refuses_a_misspelt_rule(tmp_path: Path) -> None:
    """The check above has teeth: the daemon refuses the whole bus for one bad attribute."""
    assert DAEMON is not None
    bad = tmp_path / "bad.conf"
    bad.write_text(POLICY.read_text().replace("send_destination", "send_destinaton"))
    config, _ = _bus(tmp_path, bad)
    result = subprocess.run(
        [DAEMON, f"--config-file={config}", "--print-address", "--fork"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "send_destinaton" in result.stderr, result


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder other users can reach (pytest's own are 0700 to root)."""
    folder = Path(tempfile.mkdtemp(prefix="fieldgate-dbus-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _ping(address: str, user: str) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None and SEND is not None
    entry = pwd.getpwnam(user)
    return subprocess.run(
        [
            SETPRIV,
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            SEND,
            f"--bus={address}",
            "--print-reply",
            "--dest=org.bluez",
            "/org/bluez",
            "org.freedesktop.DBus.Peer.Ping",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_daemon
@pytest.mark.skipif(
    os.geteuid() != 0 or SEND is None or SETPRIV is None,
    reason="runs clients as other users: needs root, dbus-send and setpriv",
)
def test_its_user_reaches_org_bluez_and_no_one_else(shared_folder: Path, procs: list[Proc]) -> None:
    """The policy as shipped, for user nobody standing in for fieldgate (this machine has no
    fieldgate user); user daemon gets the bus's default: method calls denied."""
    assert DAEMON is not None
    policy = shared_folder / "fieldgate-ble.conf"
    policy.write_text(POLICY.read_text().replace('user="fieldgate"', 'user="nobody"'))
    config, address = _bus(shared_folder, policy)
    daemon = Proc(
        [DAEMON, f"--config-file={config}", "--nofork", "--print-address"],
        shared_folder / "daemon.log",
    )
    procs.append(daemon)
    daemon.wait_for("unix:path=")
    (shared_folder / "bus").chmod(0o777)
    owner = Proc([sys.executable, "-c", OWNER, address], shared_folder / "owner.log")
    procs.append(owner)
    owner.wait_for("owns org.bluez")

    allowed = _ping(address, "nobody")
    assert allowed.returncode == 0 and "method return" in allowed.stdout, allowed
    refused = _ping(address, "daemon")
    assert refused.returncode != 0 and "AccessDenied" in refused.stderr, refused
