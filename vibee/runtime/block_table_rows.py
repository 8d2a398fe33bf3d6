"""Host mirror of the block manager's block tables, for the engine's per-step gather."""

from __future__ import annotations

import numpy as np


class BlockTableRows:
    """The block tables of the engine's sequences as rows of one int32 array, kept up to date by
    appending what a table gained since the last step: a step's tables are one gather, not a
    conversion of every table. Entries past a row's table are 0.

    A table only grows while its sequence holds blocks (the engine never forks or copies on
    write); a different list object means the blocks were freed and taken afresh (a preemption),
    and the row is rewritten."""

    def __init__(self, tables: dict[int, list[int]]):
        self._tables = tables  # the block manager's: seq_id -> block ids
        self.array = np.zeros((16, 16), dtype=np.int32)
        self._lens: list[int] = []  # entries filled per row
        self._rows: dict[int, tuple[int, list[int]]] = {}  # seq_id -> (row, the list it mirrors)
        self._free: list[int] = []

    def row(self, seq_id: int) -> int:
        """seq_id's row, brought up to date with its table."""
        table = self._tables[seq_id]
        row, mirrored = self._rows.get(seq_id, (-1, None))
        if mirrored is not table:
            if row < 0:
                row = self._free.pop() if self._free else self._new_row()
            else:
                self.array[row] = 0
                self._lens[row] = 0
            self._rows[seq_id] = (row, table)
        start, end = self._lens[row], len(table)
        if end > start:
            if end > self.array.shape[1]:
                self._resize(self.array.shape[0], max(end, 2 * self.array.shape[1]))
            self.array[row, start:end] = table[start:end]
            self._lens[row] = end
        return row

    def gather(self, rows: list[int]) -> np.ndarray:
        """The tables of these rows, [len(rows), longest of them] (at least one column)."""
        width = max(map(self._lens.__getitem__, rows), default=1) or 1
        return self.array[rows, :width]

    def release(self, seq_id: int) -> None:
        row, _ = self._rows.pop(seq_id, (-1, None))
        if row >= 0:
            self.array[row] = 0
            self._lens[row] = 0
            self._free.append(row)

    def _new_row(self) -> int:
        row = len(self._lens)
        if row == self.array.shape[0]:
            self._resize(2 * row, self.array.shape[1])
        self._lens.append(0)
        return row

    def _resize(self, rows: int, cols: int) -> None:
        grown = np.zeros((rows, cols), dtype=np.int32)
        grown[: self.array.shape[0], : self.array.shape[1]] = self.array
        self.array = grown
