"""The key passphrase as a systemd credential: ``[secrets] passphrase_credential = NAME`` reads
``$CREDENTIALS_DIRECTORY/NAME``, the private copy systemd makes of ``LoadCredential=NAME:PATH``.
A missing variable, file or value is refused naming the field; passphrase_env and
passphrase_file keep working."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_config import good

from gateway.config import load, render_toml
from gateway.core.errors import ConfigError

from conftest import fieldgate


def _config(pki_dir: Path, tmp: Path, **secrets: object) -> Path:
    doc = good(pki_dir, tmp)
    doc["secrets"] = secrets
    path = tmp / "gateway.toml"
    path.write_text(render_toml(doc))
    return path


def _credentials(tmp: Path, value: bytes) -> Path:
    """What systemd makes for the unit: a read-only folder, the file readable by the service."""
    folder = tmp / "credentials"
    folder.mkdir()
    (folder / "passphrase").write_bytes(value)
    (folder / "passphrase").chmod(0o400)
    folder.chmod(0o500)
    return folder


def test_the_credential_is_the_passphrase(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = (pki_dir / "passphrase").read_bytes()
    folder = _credentials(tmp_path, real + b"\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(folder))
    monkeypatch.setenv("FIELDGATE_KEY_PASSPHRASE", "not this one")
    cfg = load(_config(pki_dir, tmp_path, passphrase_credential="passphrase"))
    # The credential wins over the environment, and the trailing newline is not part of it.
    assert cfg.secrets.passphrase() == real.strip()


def test_the_gateway_reads_the_credential_and_refuses_a_wrong_one(
    pki_dir: Path, tmp_path: Path
) -> None:
    """The real command opens the keyring with what the credential holds: a wrong one is a
    wrong passphrase (tests/test_deploy_image.py runs a gateway on the right one)."""
    config = _config(pki_dir, tmp_path, passphrase_credential="passphrase")
    folder = _credentials(tmp_path, b"not the passphrase\n")
    env = {k: v for k, v in os.environ.items() if k != "FIELDGATE_KEY_PASSPHRASE"}
    env["CREDENTIALS_DIRECTORY"] = str(folder)
    result = subprocess.run(
        fieldgate("run", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "sealing.keyring" in result.stderr and "wrong passphrase" in result.stderr


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (
            "no-variable",
            "secrets.passphrase_credential: credential 'passphrase' asked for, but "
            "CREDENTIALS_DIRECTORY is not set (run under systemd with "
            "LoadCredential=passphrase:/etc/fieldgate/credentials/passphrase",
        ),
        ("no-file", "secrets.passphrase_credential: credential 'passphrase' not found: no "),
        ("empty", "secrets.passphrase_credential: credential 'passphrase' is empty: "),
    ],
)
def test_a_missing_credential_is_refused_naming_the_field(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: str, expected: str
) -> None:
    cfg = load(_config(pki_dir, tmp_path, passphrase_credential="passphrase"))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("FIELDGATE_KEY_PASSPHRASE", "a fallback that must not be taken")
    if setup == "no-file":
        (tmp_path / "creds").mkdir()
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    elif setup == "empty":
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(_credentials(tmp_path, b"\n")))
    with pytest.raises(ConfigError) as caught:
        cfg.secrets.passphrase()
    assert expected in caught.value.problems[0], caught.value.problems


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        ({"passphrase_credential": "../passphrase"}, "is not a credential name"),
        ({"passphrase_credential": ".."}, "is not a credential name"),
        ({"passphrase_credential": ""}, "is not a credential name"),
        (
            {"passphrase_credential": "passphrase", "passphrase_file": "PASSFILE"},
            "give secrets.passphrase_file or secrets.passphrase_credential, not both",
        ),
    ],
)
def test_a_bad_credential_setting_is_refused_at_load(
    pki_dir: Path, tmp_path: Path, secrets: dict[str, str], expected: str
) -> None:
    secrets = {k: str(pki_dir / "passphrase") if v == "PASSFILE" else v for k, v in secrets.items()}
    with pytest.raises(ConfigError) as caught:
        load(_config(pki_dir, tmp_path, **secrets))
    assert any(expected in line and "secrets" in line for line in caught.value.problems), (
        caught.value.problems
    )


def test_passphrase_env_and_file_still_work(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = (pki_dir / "passphrase").read_bytes().strip()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert (
        load(
            _config(pki_dir, tmp_path, passphrase_file=str(pki_dir / "passphrase"))
        ).secrets.passphrase()
        == real
    )
    monkeypatch.setenv("MY_PASS", real.decode())
    assert load(_config(pki_dir, tmp_path, passphrase_env="MY_PASS")).secrets.passphrase() == real
    monkeypatch.delenv("MY_PASS")
    with pytest.raises(ConfigError) as caught:
        load(_config(pki_dir, tmp_path, passphrase_env="MY_PASS")).secrets.passphrase()
    assert (
        "secrets.passphrase_env: environment variable MY_PASS is not set"
        in caught.value.problems[0]
    )
