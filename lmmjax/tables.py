"""Result tables that print whole.

pandas cuts a wide frame at the terminal's width (``display.max_columns = 0`` in a terminal):
a coefficient table then shows ``estimate ... upper`` and hides t and p.  :class:`Table` is a
DataFrame whose printout (``repr``, ``print``, a notebook's HTML) is always the whole table,
followed by its notes (``.attrs["notes"]``).  Anything derived from it (a column, ``.loc``,
arithmetic) is a plain pandas object."""
from __future__ import annotations

import pandas as pd

__all__ = ["Table"]


class Table(pd.DataFrame):
    """A DataFrame that prints in full width, with its notes underneath."""

    @property
    def _constructor(self):
        return pd.DataFrame

    @property
    def notes(self) -> list[str]:
        return list(self.attrs.get("notes", []))

    def __repr__(self) -> str:
        with pd.option_context("display.max_rows", None, "display.max_columns", None):
            text = self.to_string(line_width=None)
        return text + "".join(f"\nNote: {n}" for n in self.notes)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        notes = "".join(f"<p>Note: {n}</p>" for n in self.notes)
        with pd.option_context("display.max_rows", None, "display.max_columns", None):
            return self.to_html() + notes
