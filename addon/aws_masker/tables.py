"""Box tables read as the key/value text they stand for: the AWS CLI's ``--output table``.

A cell of a column table is named by the header row above it, not by anything on its own line::

    |+---------------+------------------+
    ||   accountId   |   accountName    ||
    |+---------------+------------------+
    ||  111122223333 |  acme-payments   ||

so no rule sees ``accountId`` before ``111122223333``. ``read`` writes such a table again as the JSON its
rows came from, one object per row (``{"accountId": "111122223333", "accountName": "acme-payments"}``), and
as the key/value rows the CLI prints for a section too wide for the terminal (``|  accountId  |
111122223333  |``); the rows of such a key/value section are written as one JSON object too. The masker scans
that text and keeps the hits that lie inside a cell's value, mapped back to where the value stands in the
table: a cell is masked exactly when the same value after its field name would be (in JSON or in a
key/value row), and only its value's bytes are replaced, never the table's structure.

What makes a table: a line break (``+----+----+``, inside the ``|`` of the sections it is nested in) and the
rows under it, each inside as many ``|`` as the break plus its own (the CLI nests a section's rows one ``|``
deeper on each side than its parent's). A break, one row, a break and rows as wide under it are a header row
and its rows; rows of two cells under a break that no header row names are key/value rows. Cells are split
at each ``|`` (a cell wider than its column pushes the next ones right); a row with a ``|`` in a value is
split at the columns of the break above it. The MySQL client's tables and other ``+---+`` grids read the
same way. Markdown tables (``|---|``) are not read.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from itertools import pairwise

# A line break (+----+----+ inside the pipes of the sections it is nested in, group 1) and the rows under it
# that are as deep (group 2): as many pipes, one more, then the first cell (a pipe there: a deeper row).
_RUN = re.compile(rb"[ \t]*(\|*)\+-[-+]*\+\|*[ \t]*\r?(?:\n|\Z)"
                  rb"((?:[ \t]*\1\|[^|\r\n][^\r\n]*(?:\r?\n|\Z))+)")
_PLUS_DASHES = re.compile(rb"[+]---")  # in a line break (a regex: see find)

Cell = tuple[int, int]  # a cell's value (without its padding) as a span of the text; empty: start == end
Row = list[Cell]
Run = tuple[int, int, int, list[Row]]  # a break and its rows: start, end, depth, the cells of each row
Fields = list[tuple[bytes, Cell]]  # (field name, value) of one object
# The text to scan, and per value written into it: where it starts there, where it ends, where it starts in
# the text the tables were read from
View = tuple[bytes, list[int], list[int], list[int]]


def may_hold(data: bytes) -> bool:
    """Whether ``data`` may hold a table: a ``|`` and the ``+---`` of a line break (cheap: most text has
    neither)."""
    return find(data) >= 0


def find(data: bytes) -> int:
    """Where the first ``+---`` of ``data`` is if it has a ``|`` too (where its first table may start), or
    -1. Looks from ``+`` to ``+`` (memchr) while there are few; a text of many (base64, a diff) is searched
    by a regex (bytes.find of a few bytes costs ~1 ms a MiB of text full of ``-``; the regex a quarter)."""
    if 0x7C not in data:
        return -1
    i = data.find(0x2B)
    for _ in range(64):
        if i < 0 or data[i + 1:i + 4] == b"---":
            return i
        i = data.find(0x2B, i + 1)
    m = _PLUS_DASHES.search(data, i)
    return -1 if m is None else m.start()


def holds(data: bytes, start: int = 0) -> bool:
    """Whether ``data`` holds a table from ``start`` on: a line break with a row under it (no rows read)."""
    return _next_run(data, start) is not None


def _next_run(data: bytes, pos: int) -> re.Match[bytes] | None:
    """The next line break from ``pos`` on with the rows under it (``_RUN``). A line with a ``+---`` that is
    no line break is passed whole: each line is looked at once (a regex search for the break itself would
    try each ``+---`` of a long line of them to its end)."""
    while (m := _PLUS_DASHES.search(data, pos)) is not None:
        at = m.start()
        run = _RUN.match(data, data.rfind(b"\n", 0, at) + 1)  # from the start of its line
        if run is not None:
            return run
        pos = data.find(b"\n", at) + 1
        if pos == 0:
            break
    return None


def read(data: bytes, start: int = 0) -> View | None:
    """The tables in ``data`` from ``start`` on (from the line it is in), written as JSON objects and
    key/value rows, with where each value came from; None when it holds none."""
    runs = _runs(data, start)
    objects: list[tuple[Fields, bool]] = []  # (fields, also as key/value rows)
    for k, (begin, _, depth, rows) in enumerate(runs):
        header = _header(runs[k - 1], begin, depth) if k else None
        if header is not None and any(len(row) == len(header) for row in rows):
            names = [data[s:e] for s, e in header]
            objects += [([(n, c) for n, c in zip(names, row, strict=True) if n], True)
                        for row in rows if len(row) == len(names)]
        elif not (k + 1 < len(runs) and _header(runs[k], runs[k + 1][0], runs[k + 1][2]) is not None
                  and any(len(row) == len(rows[0]) for row in runs[k + 1][3])):  # not a header row itself
            pairs = [(data[s:e], value) for (s, e), value in (row for row in rows if len(row) == 2)]
            if pairs:  # a key/value section: one object
                objects.append((pairs, False))
    return _view(data, objects) if objects else None


def _header(before: Run, start: int, depth: int) -> Row | None:
    """The row of ``before`` if it is one row right before a break at ``start``, as deep: a header row."""
    if before[1] == start and before[2] == depth and len(before[3]) == 1:
        return before[3][0]
    return None


def _runs(data: bytes, start: int) -> list[Run]:
    """Each line break in ``data`` from ``start`` on with the rows under it (breaks without a whole row under
    them are left out)."""
    runs = []
    pos = start
    while (m := _next_run(data, pos)) is not None:
        pos = m.end()
        depth = len(m.group(1))
        rows = _rows(data, m.start(), m.start(2), pos, depth)
        if rows:
            runs.append((m.start(), pos, depth, rows))
    return runs


def _rows(data: bytes, start: int, first: int, end: int, depth: int) -> list[Row]:
    """The cells of each row line from ``first`` to ``end``, under the break at ``start``; a line that is not
    a whole row is left out."""
    line_break = data[start:first].rstrip()
    columns = line_break.count(b"+") - 1
    bars: list[int] | None = None  # where the break has its "+"
    rows = []
    pos = first
    while pos < end:
        nl = data.find(b"\n", pos, end)
        stop = end if nl < 0 else nl + 1
        cells = _cells(data, pos, stop, depth)
        if cells is not None and len(cells) != columns:  # a "|" in a value: split at the break's columns
            if bars is None:
                bars = [i for i, c in enumerate(line_break) if c == 0x2B]
            cells = _by_columns(data, pos, stop, bars, len(line_break))
        if cells is not None:
            rows.append(cells)
        pos = stop
    return rows


def _cells(data: bytes, start: int, end: int, depth: int) -> Row | None:
    """The cells of the row line ``data[start:end]`` nested ``depth`` sections deep, without their padding;
    None when the line does not end in the pipes it starts with (a line cut short)."""
    line = data[start:end].rstrip()
    row = line.lstrip(b" \t")
    if len(row) < 2 * depth + 2 or not row.endswith(b"|" * (depth + 1)):  # the sections' pipes, its own
        return None
    pos = start + len(line) - len(row) + depth + 1
    cells = []
    for value in row[depth + 1:len(row) - depth - 1].split(b"|"):  # between the row's own bars
        text = value.strip(b" \t")
        s = pos + value.find(text) if text else pos  # (the first non-blank byte starts it)
        cells.append((s, s + len(text)))
        pos += len(value) + 1
    return cells


def _by_columns(data: bytes, start: int, end: int, bars: list[int], width: int) -> Row | None:
    """The cells of the row line ``data[start:end]`` split at ``bars``, where the break above it (``width``
    bytes long) has its ``+``; None unless the line is as long and has a ``|`` at each of them."""
    line = data[start:end].rstrip()
    if len(line) != width or any(line[i] != 0x7C for i in bars):
        return None
    cells = []
    for left, right in pairwise(bars):
        value = line[left + 1:right]
        s = left + 1 + len(value) - len(value.lstrip(b" \t"))
        e = right - (len(value) - len(value.rstrip(b" \t")))
        cells.append((start + s, start + max(s, e)))
    return cells


def _view(data: bytes, objects: list[tuple[Fields, bool]]) -> View:
    """The text ``read`` returns: each object as one line of JSON, then (if asked) as key/value rows; and
    where each value stands in it and in ``data``."""
    parts: list[bytes] = []
    size = 0
    starts: list[int] = []
    ends: list[int] = []
    origins: list[int] = []
    for fields, rows in objects:
        fields = [(n, c) for n, c in fields if c[1] > c[0]]  # empty cells: nothing to scan
        if not fields:
            continue
        lead = b"{"
        for name, (s, e) in fields:
            label = b'%s"%s": "' % (lead, name)
            size += len(label)
            starts.append(size)
            origins.append(s)
            parts += (label, data[s:e])
            size += e - s
            ends.append(size)
            lead = b'", '
        parts.append(b'"}\n')
        size += 3
        for name, (s, e) in fields if rows else ():
            label = b"|  %s  |  " % name
            size += len(label)
            starts.append(size)
            origins.append(s)
            parts += (label, data[s:e], b"  |\n")
            size += e - s
            ends.append(size)
            size += 4
        parts.append(b"\n")
        size += 1
    return b"".join(parts), starts, ends, origins


def inside(view: View, start: int, end: int) -> int | None:
    """Where ``view``'s text from ``start`` to ``end`` stands in the text the tables were read from, if it
    lies inside one value."""
    _, starts, ends, origins = view
    k = bisect_right(starts, start) - 1
    if k < 0 or end > ends[k]:
        return None
    return origins[k] + start - starts[k]
