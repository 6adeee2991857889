"""The container image itself, run with podman: non-root, read-only root, no capabilities, a
real gateway in it delivering to the hub stand-in, stopped by SIGTERM with nothing dropped.

Opt-in: building the image takes minutes, so this runs only against an image built before,
named by FIELDGATE_IMAGE (``deploy/container/build`` prints it), e.g.

    FIELDGATE_IMAGE=fieldgate:0.1.0 python -m pytest -q tests/test_deploy_image.py

FIELDGATE_PODMAN_ARGS adds podman's global options and FIELDGATE_PODMAN_RUN_ARGS options of
``podman run`` (on this project's build machine: ``--runtime runc`` and
``--ulimit nofile=1024:4096 --ulimit nproc=1024:4096``: crun refuses cgroups v1 hybrid, and
podman's default limits need CAP_SYS_RESOURCE; see docs/install.md).
CI runs the same entrypoint under bubblewrap instead (tests/test_deploy_install.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import render_toml
from gateway.identity.keyring import Keyring

from conftest import Proc, opened_from, start_hub, start_simulator, wait_until

IMAGE = os.environ.get("FIELDGATE_IMAGE", "")
PODMAN = shutil.which("podman")
UID = 10001  # the image's user fieldgate

pytestmark = pytest.mark.skipif(
    not IMAGE or PODMAN is None,
    reason="opt-in: set FIELDGATE_IMAGE to an image built by deploy/container/build (podman)",
)


def podman(*args: str) -> list[str]:
    """podman's global options from FIELDGATE_PODMAN_ARGS, ``run``'s from
    FIELDGATE_PODMAN_RUN_ARGS."""
    assert PODMAN is not None
    glob = shlex.split(os.environ.get("FIELDGATE_PODMAN_ARGS", ""))
    run = shlex.split(os.environ.get("FIELDGATE_PODMAN_RUN_ARGS", ""))
    verb, *more = args
    return [PODMAN, *glob, verb, *(run if verb == "run" else []), *more]


HARDENED = ("--read-only", "--user", "fieldgate", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges")  # fmt: skip


def test_the_image_answers_help_as_fieldgate_on_a_read_only_root() -> None:
    result = subprocess.run(
        podman("run", "--rm", *HARDENED, IMAGE, "--help"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage: fieldgate" in result.stdout, result
    probe = subprocess.run(
        podman("run", "--rm", *HARDENED, "--entrypoint", "sh", IMAGE, "-c",
               "id -u; touch /opt/fieldgate/x || echo read-only; "
               "touch /var/lib/fieldgate/x && echo state-writable"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.stdout.split() == [str(UID), "read-only", "state-writable"], probe


def test_a_bad_config_is_refused_naming_the_field(shared: Path) -> None:
    (shared / "fieldgate.toml").write_text('[hub]\nhostname = ""\n')
    (shared / "fieldgate.toml").chmod(0o644)
    result = subprocess.run(
        podman("run", "--rm", *HARDENED, "-v", f"{shared}:/etc/fieldgate:ro", IMAGE),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result
    assert "hub.hostname" in result.stderr and "sealing" in result.stderr, result.stderr


@pytest.fixture
def shared() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="fieldgate-image-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_gateway_in_the_image_delivers_and_stops_cleanly(
    tmp_path: Path, shared: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    sim_config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.2", "--max-age", "0.5"
    )
    etc = shared / "etc"
    (etc / "pki/devices").mkdir(parents=True)
    shutil.copy(pki_dir / "root.pem", etc / "pki/hub-roots.pem")
    shutil.copy(pki_dir / "keyring.json", etc / "pki/keyring.json")
    for name in ("plc-1.pem", "plc-1.key"):
        shutil.copy(pki_dir / "devices" / name, etc / "pki/devices" / name)
    secrets = shared / "secrets"
    secrets.mkdir()
    shutil.copy(pki_dir / "passphrase", secrets / "passphrase")
    device = tomllib.loads(sim_config.read_text())["devices"][0]
    device.update(
        cert="/etc/fieldgate/pki/devices/plc-1.pem", key="/etc/fieldgate/pki/devices/plc-1.key"
    )
    config = {
        "hub": {
            "hostname": "localhost",
            "address": "127.0.0.1",
            "port": hub_port,
            "ca_file": "/etc/fieldgate/pki/hub-roots.pem",
        },
        "sealing": {"keyring": "/etc/fieldgate/pki/keyring.json", "key_id": "k1"},
        "batching": {"max_age": 0.5},
        # In a container: a file (a podman/docker secret), not a systemd credential.
        "secrets": {"passphrase_file": "/run/secrets/fieldgate/passphrase"},
        "gateway": {"state_dir": "/var/lib/fieldgate"},
        "devices": [device],
    }
    (etc / "fieldgate.toml").write_text(render_toml(config))
    for path in [etc, *etc.rglob("*")]:
        os.chown(path, 0, UID)
        path.chmod(0o750 if path.is_dir() else 0o640)
    for path in [secrets, secrets / "passphrase"]:
        os.chown(path, UID, UID)
    (secrets / "passphrase").chmod(0o600)
    secrets.chmod(0o500)

    name = f"fieldgate-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-state"
    gateway = Proc(
        podman("run", "--rm", "--name", name, *HARDENED, "--network", "host",
               "-v", f"{etc}:/etc/fieldgate:ro", "-v", f"{secrets}:/run/secrets/fieldgate:ro",
               "-v", f"{volume}:/var/lib/fieldgate", IMAGE),
        tmp_path / "gateway.log",
    )  # fmt: skip
    procs.append(gateway)
    try:

        def delivered() -> bool:
            opened, _, _ = opened_from(record, keyring)
            return sum(len(o.readings) for o in opened) >= 20

        wait_until(delivered, 60, "readings from the gateway in the image at the hub")
        # podman stop: SIGTERM (the image's STOPSIGNAL) to the gateway, PID 1 in the container.
        subprocess.run(podman("stop", "--time", "30", name), capture_output=True, timeout=60)
        assert gateway.popen.wait(60) == 0, gateway.output()[-3000:]
        assert "0 dropped" in gateway.output(), gateway.output()[-2000:]
        _, errors, tracker = opened_from(record, keyring)
        assert errors == [] and tracker.gaps() == {}
        # The state went to the volume, as the image's user.
        listing = subprocess.run(
            podman("run", "--rm", *HARDENED, "-v", f"{volume}:/var/lib/fieldgate",
                   "--entrypoint", "sh", IMAGE, "-c", "stat -c '%u %a %n' /var/lib/fieldgate/*"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert f"{UID} 600 /var/lib/fieldgate/store.db" in listing.stdout, listing
    finally:
        subprocess.run(podman("rm", "--force", name), capture_output=True, timeout=60)
        subprocess.run(podman("volume", "rm", "--force", volume), capture_output=True, timeout=60)
