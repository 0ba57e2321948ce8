"""
Rows read straight from the pages of an SQLite file, for ``salvage``: what ``sqlite3``'s
``.recover`` does, for the one table the job database has.

When a page that leads to others (a b-tree's interior page, the root) is damaged, SQLite reaches
none of the rows below it, although the pages holding them are intact. ``table_rows`` reads every
page as a table leaf page (the file format: https://www.sqlite.org/fileformat2.html), with the
write-ahead log's committed frames laid over the file and the free pages left out, and gives each
cell's record that has the number of columns asked for. Standard library only; no SQLite.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

TABLE_LEAF = 13
WAL_MAGIC = (0x377F0682, 0x377F0683)
Value = int | float | str | bytes | None


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    """An SQLite varint at ``offset``: its value and the offset after it."""
    value = 0
    for i in range(9):
        byte = data[offset + i]
        if i == 8:
            return (value << 8) | byte, offset + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, offset + i + 1
    raise ValueError("varint")  # not reached


def _record(payload: bytes) -> list[Value]:
    """The values of a record (header of serial types, then the values)."""
    size, offset = _varint(payload, 0)
    types = []
    while offset < size:
        kind, offset = _varint(payload, offset)
        types.append(kind)
    values: list[Value] = []
    position = size
    widths = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}
    for kind in types:
        if kind in (0, 8, 9):
            values.append(None if kind == 0 else kind - 8)
        elif kind in widths:
            width = widths[kind]
            values.append(int.from_bytes(payload[position : position + width], "big", signed=True))
            position += width
        elif kind == 7:
            values.append(struct.unpack(">d", payload[position : position + 8])[0])
            position += 8
        elif kind >= 12:
            length = (kind - 12) // 2
            chunk = payload[position : position + length]
            values.append(chunk.decode("utf-8") if kind % 2 else bytes(chunk))
            position += length
        else:
            raise ValueError(f"serial type {kind}")
        if position > len(payload):
            raise ValueError("a record longer than its payload")
    return values


class _File:
    """The pages of a database file, with the committed frames of its WAL laid over them."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.data = f.read()
        size = int.from_bytes(self.data[16:18], "big") if len(self.data) >= 100 else 0
        self.page_size = 65536 if size == 1 else size if size >= 512 else 4096
        reserved = self.data[20] if len(self.data) >= 100 else 0
        self.usable = self.page_size - reserved
        self.wal: dict[int, bytes] = {}
        with contextlib.suppress(OSError):
            self._lay_wal(path + "-wal")

    def _lay_wal(self, path: str) -> None:
        with open(path, "rb") as f:
            wal = f.read()
        if len(wal) < 32 or int.from_bytes(wal[0:4], "big") not in WAL_MAGIC:
            return
        page_size = int.from_bytes(wal[8:12], "big")
        salts = wal[16:24]
        pending: dict[int, bytes] = {}
        offset = 32
        while offset + 24 + page_size <= len(wal):
            header = wal[offset : offset + 24]
            if header[8:16] != salts:
                break
            page = int.from_bytes(header[0:4], "big")
            pending[page] = wal[offset + 24 : offset + 24 + page_size]
            if int.from_bytes(header[4:8], "big"):  # a commit frame
                self.wal.update(pending)
                pending = {}
            offset += 24 + page_size

    @property
    def count(self) -> int:
        return max(len(self.data) // self.page_size, max(self.wal, default=0))

    def page(self, number: int) -> bytes:
        if number in self.wal:
            return self.wal[number]
        start = (number - 1) * self.page_size
        return self.data[start : start + self.page_size]

    def free_pages(self) -> set[int]:
        """The pages on the free list (as far as it can be read)."""
        free: set[int] = set()
        first = self.page(1)
        trunk = int.from_bytes(first[32:36], "big") if len(first) >= 40 else 0
        while 0 < trunk <= self.count and trunk not in free:
            free.add(trunk)
            page = self.page(trunk)
            leaves = int.from_bytes(page[4:8], "big")
            for i in range(min(leaves, (self.usable - 8) // 4)):
                free.add(int.from_bytes(page[8 + 4 * i : 12 + 4 * i], "big"))
            trunk = int.from_bytes(page[0:4], "big")
        return free

    def payload(self, page: bytes, offset: int) -> bytes:
        """The whole payload of the table leaf cell at ``offset``, overflow pages followed."""
        length, offset = _varint(page, offset)
        _, offset = _varint(page, offset)  # the rowid
        most = self.usable - 35
        if length <= most:
            return page[offset : offset + length]
        least = ((self.usable - 12) * 32 // 255) - 23
        local = least + (length - least) % (self.usable - 4)
        local = local if local <= most else least
        parts = [page[offset : offset + local]]
        got, following, seen = (
            local,
            int.from_bytes(page[offset + local : offset + local + 4], "big"),
            set(),
        )
        while got < length:
            if not 0 < following <= self.count or following in seen:
                raise ValueError("a broken overflow chain")
            seen.add(following)
            overflow = self.page(following)
            parts.append(overflow[4 : 4 + min(self.usable - 4, length - got)])
            got += len(parts[-1])
            following = int.from_bytes(overflow[0:4], "big")
        return b"".join(parts)


def table_rows(path: str, columns: int) -> Iterator[list[Value]]:
    """The records of ``columns`` values in every intact table leaf page of the file at ``path``."""
    if not os.path.exists(path):
        return
    database = _File(path)
    free = database.free_pages()
    for number in range(1, database.count + 1):
        if number in free:
            continue
        page = database.page(number)
        start = 100 if number == 1 else 0
        if len(page) < start + 8 or page[start] != TABLE_LEAF:
            continue
        cells = int.from_bytes(page[start + 3 : start + 5], "big")
        for i in range(cells):
            pointer = start + 8 + 2 * i
            try:
                offset = int.from_bytes(page[pointer : pointer + 2], "big")
                values = _record(database.payload(page, offset))
            except (ValueError, IndexError, UnicodeDecodeError, struct.error):
                continue
            if len(values) == columns:
                yield values
