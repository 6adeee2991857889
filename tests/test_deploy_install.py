"""scripts/install, staged with ``--root`` into a temporary folder (the machine is not touched):
the layout, modes and owners of docs/install.md, a venv holding exactly the locked versions,
the unit as installed passing ``systemd-analyze verify`` with its real ExecStart, and a real
gateway run from that staged install as a non-root user on a read-only root (bubblewrap),
against the hub stand-in and a simulated Modbus device, its passphrase coming from a
credentials folder as systemd would make it."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import render_toml
from gateway.identity.keyring import Keyring

from conftest import Proc, opened_from, start_hub, start_simulator, wait_until

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
LOCK = REPO / "deploy" / "requirements.lock"
BWRAP = shutil.which("bwrap")
SETPRIV = shutil.which("setpriv")
ANALYZE = shutil.which("systemd-analyze")

# path -> (mode, owner:group) as docs/install.md lists them.
LAYOUT = {
    "/opt/fieldgate": (0o755, "root:root"),
    "/opt/fieldgate/requirements.lock": (0o644, "root:root"),
    "/etc/fieldgate": (0o750, "root:fieldgate"),
    "/etc/fieldgate/fieldgate.toml": (0o640, "root:fieldgate"),
    "/etc/fieldgate/pki": (0o750, "root:fieldgate"),
    "/etc/fieldgate/credentials": (0o700, "root:root"),
    "/etc/fieldgate/credentials/passphrase": (0o600, "root:root"),
    "/var/lib/fieldgate": (0o700, "fieldgate:fieldgate"),
    "/etc/systemd/system/fieldgate.service": (0o644, "root:root"),
    "/etc/dbus-1/system.d/fieldgate-ble.conf": (0o644, "root:root"),
}


# Debian's own Python, as on a real box (a Python under a private home would not be reachable
# by the service's user); otherwise the one running the tests.
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--python", PYTHON, *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real staged install (venv included, ~15 s) shared by this module's tests."""
    root = tmp_path_factory.mktemp("install") / "root"
    result = install(root)
    assert result.returncode == 0, result.stderr
    assert "Next steps" in result.stdout
    return root


def actions(root: Path) -> list[str]:
    return (root / "fieldgate-install.actions").read_text().splitlines()


def test_the_layout_has_its_modes_and_owners(staged: Path) -> None:
    recorded = actions(staged)
    for path, (mode, owner) in LAYOUT.items():
        made = staged / path.lstrip("/")
        assert made.exists(), path
        assert made.stat().st_mode & 0o7777 == mode, (path, oct(made.stat().st_mode))
        assert f"chown {owner} {path}" in recorded, (path, recorded)
    # With --root no user is made: it is written down as the command that would make it.
    assert recorded[0].startswith("useradd --system --user-group")
    assert recorded[0].endswith(" fieldgate")
    assert (staged / "etc/fieldgate/credentials/passphrase").read_text().strip()
    shipped = {
        "etc/systemd/system/fieldgate.service": "deploy/systemd/fieldgate.service",
        "etc/dbus-1/system.d/fieldgate-ble.conf": "deploy/dbus/fieldgate-ble.conf",
        "etc/fieldgate/fieldgate.toml": "deploy/fieldgate.example.toml",
    }
    for target, source in shipped.items():
        assert (staged / target).read_bytes() == (REPO / source).read_bytes(), target


def test_the_venv_holds_the_locked_versions_and_lives_at_opt(staged: Path) -> None:
    venv = staged / "opt/fieldgate/venv"
    frozen = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "freeze", "--exclude", "fieldgate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    locked = {line.lower() for line in LOCK.read_text().splitlines() if not line.startswith("#")}
    assert {line.lower() for line in frozen.stdout.splitlines()} == locked
    # A wheel, not an editable install: nothing points back at the checkout.
    direct = list((venv / "lib").glob("python3*/site-packages/fieldgate-*.dist-info"))
    assert direct and not (direct[0] / "direct_url.json").read_text().count(str(REPO))
    # DESTDIR: the scripts name the venv where it will live, not where it was staged.
    assert (venv / "bin/fieldgate").read_text().splitlines()[0] == (
        "#!/opt/fieldgate/venv/bin/python3"
    )


def test_a_second_run_keeps_the_config_and_the_passphrase(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root, "--no-venv").returncode == 0
    config = root / "etc/fieldgate/fieldgate.toml"
    config.write_text("# mine\n")
    passphrase = (root / "etc/fieldgate/credentials/passphrase").read_text()
    again = install(root, "--no-venv")
    assert again.returncode == 0, again.stderr
    assert config.read_text() == "# mine\n"
    assert (root / "etc/fieldgate/credentials/passphrase").read_text() == passphrase
    assert (root / "etc/fieldgate/fieldgate.toml.example").is_file()
    assert "kept /etc/fieldgate/fieldgate.toml" in again.stdout


def test_an_unknown_option_is_refused(tmp_path: Path) -> None:
    result = install(tmp_path / "root", "--prefix", "/usr")
    assert result.returncode == 2 and "unknown option --prefix" in result.stderr
    assert not (tmp_path / "root" / "opt").exists()


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_the_installed_unit_verifies_with_its_real_command(staged: Path, tmp_path: Path) -> None:
    """verify --root needs the host's units (sysinit.target...) in the root: a copy of the
    staged tree gets them, so the staged install itself stays as scripts/install left it."""
    assert ANALYZE is not None
    root = tmp_path / "root"
    shutil.copytree(staged, root, symlinks=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    result = subprocess.run(
        [ANALYZE, "verify", f"--root={root}", "fieldgate.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr, result


# -- a gateway from the staged install, as user nobody on a read-only root ---------------------

# nobody/nogroup stand in for the fieldgate user and group, which this machine does not have.
SERVICE_USER = "nobody"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder the service user can reach (pytest's own are 0700 to root)."""
    folder = Path(tempfile.mkdtemp(prefix="fieldgate-install-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _chown(path: Path, user: str | None, group: str | None) -> None:
    shutil.chown(path, user=user, group=group)


def _apply_owners(root: Path) -> None:
    """Carry out the staged chown lines with the stand-in user (what the install does as root)."""
    entry = pwd.getpwnam(SERVICE_USER)
    group = entry.pw_gid
    for line in actions(root):
        if not line.startswith("chown "):
            continue
        words = line.split()
        owner, path = words[-2], root / words[-1].lstrip("/")
        user_name, group_name = owner.split(":")
        uid = entry.pw_uid if user_name == "fieldgate" else 0
        gid = group if group_name == "fieldgate" else 0
        targets = [path, *path.rglob("*")] if "-R" in words else [path]
        for target in targets:
            os.lchown(target, uid, gid)


def _descendant(pid: int, needle: str, timeout: float = 20.0) -> int:
    """The process under ``pid`` whose command line holds ``needle``: bwrap forks the command
    (and, with a PID namespace, a reaper of its own that would not pass SIGTERM on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = [pid]
        while todo:
            current = todo.pop()
            try:
                cmdline = Path(f"/proc/{current}/cmdline").read_bytes().replace(b"\0", b" ")
                children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            except OSError:
                continue
            if current != pid and needle.encode() in cmdline:
                return current
            todo += [int(c) for c in children]
        time.sleep(0.1)
    raise AssertionError(f"no process running {needle!r} under {pid}")


def sandboxed(root: Path, state: Path, credentials: Path, *argv: str) -> list[str]:
    """bubblewrap: the host's root read-only, with the staged /opt/fieldgate and /etc/fieldgate
    read-only in it, only the state folder writable, a private /tmp, as user nobody (setpriv
    drops root first, so bwrap's user namespace cannot map root back in). The folders that
    get new mount points (/etc, /opt, /var/lib, /run) are rebuilt on a tmpfs that is made
    read-only again once they are mounted; /etc keeps every host entry."""
    assert BWRAP is not None and SETPRIV is not None
    entry = pwd.getpwnam(SERVICE_USER)
    etc = []
    for name in sorted(os.listdir("/etc")):
        if name != "fieldgate" and os.path.exists(f"/etc/{name}"):
            etc += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    run = "/run/credentials/fieldgate.service"
    return [
        SETPRIV, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
        BWRAP,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--tmpfs", "/etc", *etc,
        "--ro-bind", str(root / "etc/fieldgate"), "/etc/fieldgate",
        "--tmpfs", "/opt",
        "--ro-bind", str(root / "opt/fieldgate"), "/opt/fieldgate",
        "--tmpfs", "/var/lib",
        "--bind", str(state), "/var/lib/fieldgate",
        "--tmpfs", "/run",
        "--ro-bind", str(credentials), run,
        "--remount-ro", "/etc", "--remount-ro", "/opt", "--remount-ro", "/var/lib",
        "--remount-ro", "/run",
        "--setenv", "CREDENTIALS_DIRECTORY", run,
        "--unsetenv", "FIELDGATE_KEY_PASSPHRASE",
        "--chdir", "/var/lib/fieldgate",
        "--unshare-all", "--share-net", "--die-with-parent",
        *argv,
    ]  # fmt: skip


@pytest.mark.skipif(
    BWRAP is None or SETPRIV is None or os.geteuid() != 0,
    reason="needs bubblewrap and setpriv (apt install bubblewrap) and root, to own the staged "
    "files as the service user stand-in",
)
def test_a_gateway_runs_from_the_install_unprivileged_on_a_read_only_root(
    staged: Path,
    tmp_path: Path,
    shared: Path,
    pki_dir: Path,
    keyring: Keyring,
    procs: list[Proc],
) -> None:
    root = shared / "root"
    shutil.copytree(staged, root, symlinks=True)

    # The operator's steps: identities in /etc/fieldgate/pki, the config, the passphrase.
    pki = root / "etc/fieldgate/pki"
    shutil.copy(pki_dir / "root.pem", pki / "hub-roots.pem")
    shutil.copy(pki_dir / "keyring.json", pki / "keyring.json")
    (pki / "devices").mkdir()
    for name in ("plc-1.pem", "plc-1.key"):
        shutil.copy(pki_dir / "devices" / name, pki / "devices" / name)
    for name in ("gateway.pem", "gateway.key"):  # the gateway's own identity (its audit log)
        shutil.copy(pki_dir / name, pki / name)
    (root / "etc/fieldgate/credentials/passphrase").write_bytes(
        (pki_dir / "passphrase").read_bytes()
    )

    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    sim_config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.2", "--max-age", "0.5"
    )
    device = tomllib.loads(sim_config.read_text())["devices"][0]
    assert device["id"] == "plc-1"
    device["cert"] = "/etc/fieldgate/pki/devices/plc-1.pem"
    device["key"] = "/etc/fieldgate/pki/devices/plc-1.key"
    config = tomllib.loads((root / "etc/fieldgate/fieldgate.toml").read_text())
    config["hub"].update(hostname="localhost", address="127.0.0.1", port=hub_port)
    config["batching"] = {"max_age": 0.5}
    config["devices"] = [device]
    (root / "etc/fieldgate/fieldgate.toml").write_text(render_toml(config))
    for path in pki.rglob("*"):
        path.chmod(0o640 if path.is_file() else 0o750)
    _apply_owners(root)

    # What systemd makes of LoadCredential=: a private copy the service's user can read.
    credentials = shared / "credentials"
    credentials.mkdir()
    shutil.copy(root / "etc/fieldgate/credentials/passphrase", credentials / "passphrase")
    (credentials / "passphrase").chmod(0o400)
    credentials.chmod(0o500)
    _chown(credentials / "passphrase", SERVICE_USER, None)
    _chown(credentials, SERVICE_USER, None)
    state = shared / "state"
    state.mkdir(mode=0o700)
    _chown(state, SERVICE_USER, None)

    # The sandbox is what the test says: nobody, nothing writable but the state, no access to
    # the passphrase's source.
    probe = subprocess.run(
        sandboxed(root, state, credentials, "sh", "-c",
                  "id -un; touch /opt/fieldgate/x || echo opt-read-only; "
                  "touch /etc/fieldgate/x || echo etc-read-only; "
                  "cat /etc/fieldgate/credentials/passphrase || echo source-unreadable; "
                  "touch /var/lib/fieldgate/probe && echo state-writable"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.stdout.split() == [
        SERVICE_USER, "opt-read-only", "etc-read-only", "source-unreadable", "state-writable"
    ], probe  # fmt: skip
    (state / "probe").unlink()

    # An operator who left the PKI to root is told which field cannot be read, and by whom.
    for path in pki.rglob("*"):
        os.lchown(path, 0, 0)
    refused = subprocess.run(
        sandboxed(root, state, credentials, "/opt/fieldgate/venv/bin/fieldgate", "run",
                  "--config", "/etc/fieldgate/fieldgate.toml"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "hub.ca_file: /etc/fieldgate/pki/hub-roots.pem cannot be read by uid" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The step docs/install.md gives: the PKI to group fieldgate.
    for path in pki.rglob("*"):
        os.lchown(path, 0, pwd.getpwnam(SERVICE_USER).pw_gid)

    gateway = Proc(
        sandboxed(root, state, credentials, "/opt/fieldgate/venv/bin/fieldgate", "run",
                  "--config", "/etc/fieldgate/fieldgate.toml"),
        tmp_path / "gateway.log",
    )  # fmt: skip
    procs.append(gateway)

    def delivered() -> bool:
        opened, _, _ = opened_from(record, keyring)
        return sum(len(o.readings) for o in opened if o.device_id == "plc-1") >= 20

    wait_until(delivered, 40, "readings from the sandboxed gateway at the hub")
    os.kill(
        _descendant(gateway.pid, "python3 /opt/fieldgate/venv/bin/fieldgate run"), signal.SIGTERM
    )
    assert gateway.popen.wait(30) == 0, gateway.output()[-3000:]
    log = gateway.output()
    assert "0 dropped" in log and "readings:" in log, log[-2000:]
    _, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}
    # The gateway wrote its state, owned by the service user, and nothing else anywhere.
    made = sorted(p.name for p in state.iterdir())
    assert "store.db" in made and "fieldgate.lock" in made, made
    assert {p.stat().st_uid for p in state.rglob("*")} == {pwd.getpwnam(SERVICE_USER).pw_uid}
