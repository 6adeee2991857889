"""scripts/check's import rules refuse what the conventions forbid."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def layers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("layers", ROOT / "scripts" / "layers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def found(tmp: Path, rel: str, source: str) -> list[str]:
    path = tmp / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    result: list[str] = layers().problems(rel, path)
    return result


def test_the_tree_keeps_the_rules() -> None:
    checker = layers()
    problems = [
        line
        for package in ("gateway", "adapters")
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in checker.problems(path.relative_to(ROOT).as_posix(), path)
    ]
    assert problems == []


def test_a_product_module_importing_a_test_tool_is_refused(tmp_path: Path) -> None:
    assert found(tmp_path, "gateway/app2.py", "from gateway.testbed import harness\n")
    assert found(tmp_path, "gateway/app2.py", "def f():\n    import adapters.modbus.sim.run\n")
    assert found(tmp_path, "gateway/testbed/x.py", "from adapters.modbus.sim import run\n") == []


def test_a_library_outside_its_owner_and_a_layer_upside_down_are_refused(tmp_path: Path) -> None:
    assert found(tmp_path, "gateway/app2.py", "import apsw\n")
    assert found(tmp_path, "gateway/store/sqlite.py", "import apsw\n") == []
    assert found(tmp_path, "adapters/modbus/link2.py", "from pymodbus.client import X\n")
    assert found(tmp_path, "gateway/testbed/demo2.py", "import rich\n")
    assert found(tmp_path, "gateway/core/x.py", "from gateway.store import Store\n")
    assert found(tmp_path, "adapters/ble/x.py", "from gateway.config import Config\n")
    assert found(tmp_path, "adapters/ble/x.py", "from gateway.core.errors import X\n") == []


def test_relative_and_sideways_imports_are_held_to_the_same_rules(tmp_path: Path) -> None:
    # A relative import is resolved against its package before the rules apply.
    assert found(tmp_path, "gateway/core/x.py", "from ..store import Store\n")
    assert found(tmp_path, "adapters/modbus/x.py", "from ...gateway.config import Config\n")
    assert found(tmp_path, "gateway/app2.py", "from .testbed import harness\n")
    assert found(tmp_path, "adapters/modbus/x.py", "from .config import Point\n") == []
    assert found(tmp_path, "adapters/modbus/x.py", "from . import transport\n") == []
    # One adapter never builds on another; both build on adapters.base.
    assert found(tmp_path, "adapters/ble/x.py", "from adapters.modbus.config import Point\n")
    assert found(tmp_path, "adapters/ble/x.py", "from ..modbus import link\n")
    assert found(tmp_path, "adapters/ble/x.py", "from adapters.base import DeviceHealth\n") == []
    assert found(tmp_path, "adapters/ble/sim/x.py", "from ..gatt import decode\n") == []
