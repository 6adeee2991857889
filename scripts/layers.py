"""The house rules on imports, checked (``bash scripts/check`` runs this).

1. The product never imports the test tools: no module of ``gateway/`` or ``adapters/`` imports
   ``gateway.testbed`` or a simulator (``adapters.*.sim``), except the test tools themselves.
2. Layers, bottom up: ``gateway/core`` imports nothing of the project above it; the adapters
   build on ``gateway.core`` (and ``adapters.base``) only, never on each other; the rest of
   ``gateway/`` builds on both.
3. One module (or package) owns each third-party library: the tables below. Test tools
   (``gateway/testbed``, ``adapters/*/sim``) may import the product's libraries (a simulator
   serves pymodbus or D-Bus), but the libraries only they use have one owner among them.

Every import counts, at the top of a module or inside a function, relative ones resolved
against the module's package. Exit 1 with one line per broken rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# library (top-level import name, or a dotted prefix) -> the product paths that may import it.
# A path ending in "/" is a package: any module below it.
OWNERS: dict[str, tuple[str, ...]] = {
    "pymodbus": ("adapters/modbus/transport.py",),
    "bleak": ("adapters/ble/bluez.py",),
    "dbus_fast": ("adapters/ble/bluez.py",),
    "apsw": ("gateway/store/sqlite.py",),
    "zstandard": ("gateway/core/envelope.py",),
    "orjson": ("gateway/core/codec.py",),
    "uvloop": ("gateway/runtime.py",),
    "pydantic": ("gateway/config/", "adapters/modbus/config.py", "adapters/ble/config.py"),
    # AES-GCM has one home; certificates, keys and key derivation live in identity/.
    "cryptography.hazmat.primitives.ciphers.aead": ("gateway/core/aead.py",),
    "cryptography.exceptions": ("gateway/core/aead.py", "gateway/identity/"),
    "cryptography": ("gateway/identity/",),
    "azure": ("gateway/edge/",),
    "prometheus_client": ("gateway/ops/",),
}
# Libraries only test tools use, with one owner among them (every module is held to these).
TOOL_OWNERS: dict[str, tuple[str, ...]] = {
    "rich": ("gateway/testbed/console.py",),
    "matplotlib": ("gateway/testbed/loadtest/report.py",),
}


def is_tool(rel: str) -> bool:
    parts = rel.split("/")
    return rel.startswith("gateway/testbed/") or (
        parts[0] == "adapters" and len(parts) > 2 and parts[2] == "sim"
    )


def imports(path: Path, rel: str = "") -> list[tuple[int, str]]:
    """(line, absolute module name) of every import; ``rel`` (the path under the root)
    resolves relative imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = rel.split("/")[:-1]  # a module's package; an __init__.py's own package
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            if not module:
                continue
            found.append((node.lineno, module))
            if module.split(".")[0] in ("gateway", "adapters"):
                # `from adapters.ble import sim` names a module too
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def owner_of(name: str, table: dict[str, tuple[str, ...]]) -> str | None:
    """The most specific key of ``table`` that ``name`` falls under."""
    best = None
    for lib in table:
        if (name == lib or name.startswith(lib + ".")) and (best is None or len(lib) > len(best)):
            best = lib
    return best


def allowed(rel: str, paths: tuple[str, ...]) -> bool:
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in paths)


def problems(rel: str, path: Path) -> list[str]:
    out: list[str] = []
    tool = is_tool(rel)
    lines_seen: set[int] = set()
    for line, name in imports(path, rel):
        if line in lines_seen and name.split(".")[0] not in ("gateway", "adapters"):
            continue
        lines_seen.add(line)
        where = f"{rel}:{line}"
        parts = name.split(".")
        if not tool and (
            parts[:2] == ["gateway", "testbed"] or parts[0::2][:2] == ["adapters", "sim"]
        ):
            out.append(f"{where}: the product imports a test tool ({name})")
        project = parts[0] in ("gateway", "adapters")
        if rel.startswith("gateway/core/") and project and parts[:2] != ["gateway", "core"]:
            out.append(f"{where}: gateway/core imports {name}, a layer above it")
        if (
            rel.startswith("adapters/")
            and not tool
            and parts[0] == "gateway"
            and parts[:2] != ["gateway", "core"]
        ):
            out.append(f"{where}: an adapter imports {name}; adapters build on gateway.core only")
        own = rel.split("/")[:2]
        if (
            own[0] == "adapters"
            and len(own) == 2
            and not own[1].endswith(".py")
            and parts[0] == "adapters"
            and len(parts) > 1
            and parts[1] not in (own[1], "base")
        ):
            other = f"adapters/{own[1]} imports {name}"
            out.append(f"{where}: {other}; adapters never import each other")
        lib = owner_of(name, OWNERS)
        if lib is not None and not tool and not allowed(rel, OWNERS[lib]):
            out.append(f"{where}: imports {name}, which only {', '.join(OWNERS[lib])} may import")
        lib = owner_of(name, TOOL_OWNERS)
        if lib is not None and not allowed(rel, TOOL_OWNERS[lib]):
            owners = ", ".join(TOOL_OWNERS[lib])
            out.append(f"{where}: imports {name}, which only {owners} may import")
    return out


def main() -> int:
    found: list[str] = []
    for package in ("gateway", "adapters"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found += problems(path.relative_to(ROOT).as_posix(), path)
    shown: set[str] = set()
    for line in found:
        where = line.split(": ", 1)[0] + line.split(": ", 1)[1].split(" (")[0][:30]
        if where not in shown:
            shown.add(where)
            print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
