"""Listings that stay readable at any width, shared by ``edge-agent`` and ``fleet``.

Ids and other values a reader copies are never broken (``Col(whole=True)``); long free text folds; when the
terminal is too narrow for every column, the least useful ones (highest ``drop``) are left out and a note says
which; when even the essential ones do not fit, each row becomes a small block of ``name: value`` lines. On a
terminal the table has a header rule; into a pipe or a file it is plain aligned text: no box drawing, no colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.cells import cell_len
from rich.text import Text


@dataclass(frozen=True)
class Col:
    """One listing column.

    ``whole``: never wrapped or cut (ids, versions, states). ``drop``: 0 is always shown; when the width is short,
    columns are left out highest ``drop`` first. ``min_width``: the narrowest a folding column gets before columns
    are dropped.
    """

    name: str
    whole: bool = False
    drop: int = 0
    min_width: int = 8
    justify: Literal["left", "right"] = "left"


Cell = str | Text


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _longest(values: Sequence[str]) -> int:
    return max((cell_len(line) for v in values for line in (v.splitlines() or [""])), default=0)


def plan(columns: Sequence[Col], rows: Sequence[Sequence[Cell]], width: int, gap: int) -> list[int] | None:
    """Indices of the columns to show at ``width`` (``gap`` cells between columns), or None: too narrow for the
    essential ones, use the block layout."""
    needs = []
    for i, col in enumerate(columns):
        longest = _longest([col.name, *(_plain(r[i]) for r in rows)])
        needs.append(longest if col.whole else min(longest, max(col.min_width, 1)))
    kept = list(range(len(columns)))

    def total() -> int:
        return sum(needs[i] for i in kept) + gap * (len(kept) - 1)

    while total() > width:
        droppable = [i for i in kept if columns[i].drop > 0]
        if not droppable:
            return None
        kept.remove(max(droppable, key=lambda i: (columns[i].drop, i)))
    return kept


class Listing:
    """A rich renderable: ``rows`` under ``columns``, fitted to the width it is printed at (see the module doc)."""

    def __init__(
        self, title: str | None, columns: Sequence[Col | str], rows: Sequence[Sequence[Cell]], *, markup: bool = False
    ) -> None:
        self.title = title
        self.columns = [c if isinstance(c, Col) else Col(c) for c in columns]
        self.rows = [list(r) for r in rows]
        self.markup = markup

    def _cell(self, value: Cell) -> Text:
        if isinstance(value, Text):
            return value
        return Text.from_markup(value) if self.markup else Text(str(value))

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.segment import Segment

        terminal = bool(console.is_terminal)
        for renderable in self._parts(terminal, options.max_width):
            if terminal:
                yield renderable
                continue
            # off a terminal: plain lines, without the padding rich adds to the right
            for line in console.render_lines(renderable, options, pad=False):
                segments = list(line)
                while segments and not segments[-1].text.strip():
                    segments.pop()
                if segments:
                    last = segments[-1]
                    segments[-1] = Segment(last.text.rstrip(), last.style, last.control)
                yield from segments
                yield Segment.line()

    def _parts(self, terminal: bool, width: int) -> list[Any]:
        from rich import box
        from rich.padding import Padding
        from rich.table import Table

        cols, rows = self.columns, self.rows
        kept = plan(cols, rows, width, 3 if terminal else 2)
        if kept is None:  # the narrow layout: the first value, then indented ``name: value`` lines
            parts: list[Any] = [Text(self.title)] if self.title else []
            for row in rows:
                grid = Table.grid(padding=(0, 1))
                grid.add_column(no_wrap=True)
                grid.add_column(overflow="fold")
                for col, value in zip(cols[1:], row[1:], strict=True):
                    grid.add_row(f"{col.name}:", self._cell(value))
                parts += [self._cell(row[0]), Padding(grid, (0, 0, 0, 2))]
            return parts
        table = Table(
            title=self.title,
            title_justify="left",
            box=box.SIMPLE_HEAD if terminal else None,
            show_edge=False,
            pad_edge=False,
            expand=False,
            header_style="bold" if terminal else "",
            title_style="italic" if terminal else "",
        )
        for i in kept:
            col = cols[i]
            longest = _longest([col.name, *(_plain(r[i]) for r in rows)])
            table.add_column(
                col.name,
                justify=col.justify,
                no_wrap=col.whole,
                overflow="fold",
                min_width=longest if col.whole else None,
            )
        for row in rows:
            table.add_row(*(self._cell(row[i]) for i in kept))
        parts = [table]
        dropped = [cols[i].name for i in range(len(cols)) if i not in kept]
        if dropped:
            parts.append(Text(f"(hidden at {width} columns: {', '.join(dropped)}; see --json or a wider terminal)"))
        return parts


def print_table(
    console: Any,
    title: str | None,
    columns: Sequence[Col | str],
    rows: Sequence[Sequence[Cell]],
    *,
    markup: bool = False,
) -> None:
    """Print a ``Listing`` on ``console`` (a rich Console)."""
    console.print(Listing(title, columns, rows, markup=markup))
