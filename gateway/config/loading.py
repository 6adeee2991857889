"""Reading a config: TOML, validated by pydantic with ``extra="forbid"``.

A bad file raises :class:`ConfigError` naming the file, each bad field's path
(``devices[3].points[2].type``) and the reason; nothing starts from a config that was refused.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapters.modbus.config import TRANSPORTS as LINK_TYPES
from gateway.config.models import Config
from gateway.core.errors import ConfigError


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    # A tagged union (a [[links]] entry) puts its tag in the path: links[0].rtu.parity.
    if len(loc) > 2 and loc[0] == "links" and loc[2] in LINK_TYPES:
        loc = loc[:2] + loc[3:]
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _reason(error: Any) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{given!r} is not one of {expected}"
    if kind == "union_tag_not_found":  # a [[links]] entry without its type
        return f"type required: one of {', '.join(map(repr, LINK_TYPES))}"
    if kind == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag")
        return f"type {tag!r} is not one of {', '.join(map(repr, LINK_TYPES))}"
    if kind == "extra_forbidden":
        return "unknown field (check its spelling)"
    if kind == "missing":
        return "field required"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind.endswith(("_type", "_parsing")) or kind in ("greater_than", "less_than_equal"):
        return f"{message} (got {given!r})"
    return message


def validate(
    data: dict[str, Any], path: str, *, base: Path | None = None, check_files: bool = True
) -> Config:
    try:
        config = Config.model_validate(data, context={"base": base, "check_files": check_files})
    except ValidationError as err:
        problems = []
        for error in err.errors():
            where = _loc(error["loc"])
            reason = _reason(error)
            problems.append(f"{where}: {reason}" if where else reason)
        raise ConfigError(path, problems) from err
    if check_files:
        from gateway.preflight import problems as preflight

        found = preflight(config)
        if found:
            raise ConfigError(path, found)
    return config


def load(path: str | Path, *, check_files: bool = True) -> Config:
    """Read and validate a config file, or raise :class:`ConfigError` naming what is wrong."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ConfigError(str(file), [f"cannot read: {err.strerror}"]) from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(str(file), [f"not valid TOML: {err}"]) from err
    return validate(data, str(file), base=file.resolve().parent, check_files=check_files)


def render_toml(doc: dict[str, Any]) -> str:
    """Write the subset of TOML a gateway config uses: scalars, arrays of scalars, tables,
    arrays of tables."""
    out: list[str] = []
    _emit_table(doc, [], out)
    return "\n".join(out).strip() + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit_table(doc: dict[str, Any], path: list[str], out: list[str]) -> None:
    for key, value in doc.items():
        if value is None or isinstance(value, dict) or _is_table_array(value):
            continue
        if isinstance(value, list):
            out.append(f"{key} = [{', '.join(_scalar(v) for v in value)}]")
        else:
            out.append(f"{key} = {_scalar(value)}")
    for key, value in doc.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            continue
        if isinstance(value, dict):
            out.append("")
            out.append(f"[{'.'.join([*path, key])}]")
            _emit_table(value, [*path, key], out)
        elif isinstance(value, list):
            for item in value:
                out.append("")
                out.append(f"[[{'.'.join([*path, key])}]]")
                _emit_table(item, [*path, key], out)
