"""deploy/ tells one story: the unit, the image, the install script, the sample config and the
lock agree on the layout (docs/install.md), and the lock pins what pyproject asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gateway.config import load

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
LOCK = DEPLOY / "requirements.lock"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
UNIT = DEPLOY / "systemd" / "fieldgate.service"
INSTALL = REPO / "scripts" / "install"
SAMPLE = DEPLOY / "fieldgate.example.toml"

VENV_COMMAND = "/opt/fieldgate/venv/bin/fieldgate"
CONFIG = "/etc/fieldgate/fieldgate.toml"
STATE = "/var/lib/fieldgate"


EDGE_LOCK = DEPLOY / "requirements-edge.lock"


def locked(lock: Path = LOCK) -> dict[str, Version]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert name and version and " " not in line, f"not a pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_every_dependency_within_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked()
    env = default_environment()
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in {LOCK.name}: run deploy/relock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name} {pins[name]}, outside {requirement.specifier}: "
            "run deploy/relock"
        )
    assert "fieldgate" not in pins


def test_the_images_lock_adds_the_edge_extra_to_the_plain_install() -> None:
    """The image is also the IoT Edge module's: module mode needs azure-iot-device."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    plain, edge = locked(), locked(EDGE_LOCK)
    for text in project["optional-dependencies"]["edge"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in edge and requirement.specifier.contains(edge[name], prereleases=True), (
            f"{EDGE_LOCK.name} lacks {requirement}: run deploy/relock"
        )
    shared = plain.keys() & edge.keys()
    assert {n: plain[n] for n in shared} == {n: edge[n] for n in shared}, "run deploy/relock"


def test_the_unit_the_image_and_the_install_share_one_layout() -> None:
    unit = UNIT.read_text()
    image = CONTAINERFILE.read_text()
    install = INSTALL.read_text()
    assert f"ExecStart={VENV_COMMAND} run --config {CONFIG}" in unit
    assert f'ENTRYPOINT ["{VENV_COMMAND}"]' in image
    assert f'CMD ["run", "--config", "{CONFIG}"]' in image
    assert "/opt/fieldgate/venv" in install and "requirements.lock" in install
    assert f'VOLUME ["{STATE}"]' in image
    assert "StateDirectory=fieldgate" in unit  # = /var/lib/fieldgate
    assert f"folder 0700 fieldgate:fieldgate {STATE}" in install


def final_stage(text: str) -> str:
    return text.rsplit("\nFROM ", 1)[1]


def test_the_image_is_non_root_pinned_and_health_checked() -> None:
    text = CONTAINERFILE.read_text()
    stage = final_stage(text)
    user = re.findall(r"^USER (\S+)$", stage, re.MULTILINE)
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]), user
    assert "-r deploy/requirements-edge.lock" in text  # the dependencies as locked
    assert "--no-deps ." in text  # and fieldgate itself adds none
    health = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.MULTILINE | re.DOTALL)
    assert health and "http://127.0.0.1:9464/healthz" in health.group(1)
    assert not re.search(r"^ADD ", text, re.MULTILINE)
    assert ":latest" not in text


def test_the_sample_config_is_valid_and_uses_the_layout() -> None:
    cfg = load(SAMPLE, check_files=False)
    assert str(cfg.gateway.state_dir) == STATE
    name = cfg.secrets.passphrase_credential
    assert name is not None
    assert f"LoadCredential={name}:/etc/fieldgate/credentials/{name}" in UNIT.read_text()
    assert str(cfg.sealing.keyring).startswith("/etc/fieldgate/pki/")
    assert str(cfg.hub.ca_file).startswith("/etc/fieldgate/pki/")
