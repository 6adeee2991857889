"""The test tools' terminal: the one module that imports ``rich``.

The demo and the load test build their views from :func:`table`, :func:`styled` and
:func:`stack` and show them through a :class:`Console` (printed once, or live while a run goes
on); they never touch rich's types themselves, so a rich upgrade is read here only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from rich.console import Console as _RichConsole
from rich.console import Group, RenderableType
from rich.live import Live as _RichLive
from rich.table import Table
from rich.text import Text

# Something a console can show: a table, a styled line, a stack of them, or plain text.
Renderable = RenderableType


@dataclass(frozen=True)
class Column:
    header: str
    justify: Literal["left", "right"] = "left"
    no_wrap: bool = False
    overflow: Literal["fold", "ellipsis"] = "ellipsis"
    ratio: int | None = None


def styled(text: str, style: str = "") -> Renderable:
    """A line (or a cell) of text in a rich style such as ``"bold red"``."""
    return Text(text, style=style)


def stack(*parts: Renderable) -> Renderable:
    """Renderables one below the other."""
    return Group(*parts)


def table(
    title: str,
    columns: Sequence[Column | str],
    rows: Iterable[Sequence[Renderable]],
    *,
    expand: bool = False,
) -> Renderable:
    """A titled table; a column given as a plain string is a left-justified header."""
    out = Table(title=title, expand=expand)
    for column in columns:
        if isinstance(column, str):
            column = Column(column)
        out.add_column(
            column.header,
            justify=column.justify,
            no_wrap=column.no_wrap,
            overflow=column.overflow,
            ratio=column.ratio,
        )
    for row in rows:
        out.add_row(*row)
    return out


class Live:
    """A view redrawn in place while a run goes on (on a terminal; elsewhere the last one is
    printed once, at the end)."""

    def __init__(self, live: _RichLive) -> None:
        self._live = live

    def update(self, view: Renderable) -> None:
        self._live.update(view)


class Console:
    """Where the test tools write: text (with rich markup), tables, live views."""

    def __init__(self) -> None:
        self._console = _RichConsole()

    def print(self, *parts: Renderable, style: str | None = None, soft_wrap: bool = False) -> None:
        self._console.print(*parts, style=style, soft_wrap=soft_wrap)

    @contextmanager
    def live(self, first: Renderable = "") -> Iterator[Live]:
        """A live view, twice a second, left on the screen when it ends."""
        with _RichLive(first, console=self._console, refresh_per_second=2, transient=False) as live:
            yield Live(live)
