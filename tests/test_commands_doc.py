"""docs/commands.md: its policy block is a valid device control table, and each console example
gives the status and body the page shows, run as `fieldgate hub` against a real gateway."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

from gateway.config import render_toml
from gateway.events import read_events

from conftest import Proc, fieldgate, start_hub, start_simulator, wait_until

DOC = Path(__file__).parent.parent / "docs" / "commands.md"


def examples() -> tuple[dict[str, object], list[tuple[list[str], list[str]]]]:
    text = DOC.read_text().split("## Examples", 1)[1]
    policy = tomllib.loads(re.findall(r"```toml\n(.*?)```", text, re.S)[0])["devices"]["control"]
    runs = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        command, *output = block.strip().splitlines()
        assert command.startswith("$ fieldgate ")
        runs.append((shlex.split(command[2:])[1:], output))
    return policy, runs


def test_the_command_examples_do_what_the_page_says(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    policy, runs = examples()
    assert len(runs) >= 6
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.3")
    doc = tomllib.loads(config.read_text())
    doc["devices"][0]["control"] = policy
    config.write_text(render_toml(doc))
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    where = ["--pki", str(pki_dir), "--port", str(hub_port)]

    def hub(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            fieldgate("hub", *argv[:1], *where, *argv[1:]),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def up() -> bool:
        done = hub("invoke", "plc-1", "status")
        return done.returncode == 0 and json.loads(done.stdout.split("\n", 1)[1])["state"] == "up"

    wait_until(up, 30, "plc-1 to be up")
    for argv, output in runs:
        assert argv[0] == "hub"
        done = hub(*argv[1:])
        got = done.stdout.strip()
        if output[0].isdigit():
            status, _, body = got.partition("\n")
            assert status == output[0], (argv, got, done.stderr)
            assert done.returncode == (0 if status.startswith("2") else 1)
            assert json.loads(body) == json.loads("\n".join(output[1:])), argv
        else:
            assert json.loads(got) == json.loads("\n".join(output)), (argv, done.stderr)
    # The C2D example's write arrives, asynchronously.
    wait_until(
        lambda: any(e.get("channel") == "c2d" for e in read_events(tmp_path / "state")),
        15,
        "the C2D example's security event",
    )
    assert gateway.stop() == 0
