"""Source adapters: the formats people have -> records (dicts) with their location.

    jsonl   one JSON object per line; `fields` maps a task's field to the record's key
    tsv     tab-separated columns named by `columns` (or by a header line); parallel text
    conll   one token per line, its tag in the last column, a blank line between sentences
            (`-DOCSTART-` lines are skipped); a record is {tokens, tags}
    text    plain text: one document per line, or per blank-line separated paragraph

Each adapter yields (record, location) with location "file:line" (the first line of a record);
a line that cannot be a record is yielded as a BadRecord in its place, so the caller decides
whether it stops the run or is skipped and reported (--skip-bad). Reading is streaming.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sabiscale.prep.tasks import BadRecord
from sabiscale.errors import UserError

Record = tuple[dict | BadRecord, str]


def _lines(path: Path) -> Iterator[tuple[int, str | BadRecord]]:
    """(line number, text) per line; a line that is not UTF-8 comes as a BadRecord naming it."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, BadRecord(f"{path}:{line_no}: not UTF-8 (byte {err.start + 1} of the line: {err.reason}); "
                                         "convert the file to UTF-8")


def read_jsonl(path: Path, fields: dict[str, str]) -> Iterator[Record]:
    for line_no, line in _lines(path):
        where = f"{path}:{line_no}"
        if isinstance(line, BadRecord):
            yield line, where
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield BadRecord(f"{where}: not valid JSON ({err.msg} at column {err.colno})"), where
            continue
        if not isinstance(record, dict):
            yield BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}"), where
            continue
        for field, key in fields.items():
            if key in record:
                record[field] = record[key]
        yield record, where


def read_tsv(path: Path, columns: list[str], header: bool) -> Iterator[Record]:
    for line_no, line in _lines(path):
        where = f"{path}:{line_no}"
        if isinstance(line, BadRecord):
            yield line, where
            continue
        line = line.rstrip("\r\n")
        if header and line_no == 1:
            columns = columns or line.split("\t")
            continue
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(columns):
            yield BadRecord(f"{where}: {len(cells)} tab-separated column(s), expected {len(columns)} "
                            f"({', '.join(columns)})"), where
            continue
        yield dict(zip(columns, cells)), where


def _blocks(path: Path, separator: str | None = None) -> Iterator[tuple[int, list[str] | BadRecord]]:
    """(first line number, stripped lines) of each run of non-blank lines; a line equal to
    `separator` also ends a run and is dropped. A run holding an undecodable line comes as that
    line's BadRecord."""
    lines: list[str] = []
    start, bad = 0, None
    for line_no, line in _lines(path):
        text = line if isinstance(line, BadRecord) else line.strip()
        if isinstance(text, str) and (not text or text.split()[0] == separator):
            if lines or bad:
                yield start, bad or lines
            lines, bad = [], None
            continue
        if not lines and bad is None:
            start = line_no
        if isinstance(text, BadRecord):
            bad = bad or text
        else:
            lines.append(text)
    if lines or bad:
        yield start, bad or lines


def read_conll(path: Path) -> Iterator[Record]:
    for start, lines in _blocks(path, separator="-DOCSTART-"):
        where = f"{path}:{start}"
        if isinstance(lines, BadRecord):
            yield lines, where
            continue
        short = next((i for i, line in enumerate(lines) if len(line.split()) < 2), None)
        if short is not None:
            yield BadRecord(f"{path}:{start + short}: a token line needs a token and a tag (whitespace-separated), "
                            f"got {lines[short]!r}"), where
            continue
        cells = [line.split() for line in lines]
        yield {"tokens": [c[0] for c in cells], "tags": [c[-1] for c in cells]}, where


def read_text(path: Path, documents: str) -> Iterator[Record]:
    if documents == "line":
        for line_no, line in _lines(path):
            if isinstance(line, BadRecord) or line.strip():
                yield (line if isinstance(line, BadRecord) else {"text": line.strip()}), f"{path}:{line_no}"
        return
    for start, lines in _blocks(path):
        yield (lines if isinstance(lines, BadRecord) else {"text": "\n".join(lines)}), f"{path}:{start}"


def read_records(path: Path, fmt: str, fields: dict[str, str] | None = None, columns: list[str] | None = None,
                 header: bool = False, documents: str = "line") -> Iterator[Record]:
    if fmt == "jsonl":
        return read_jsonl(path, fields or {})
    if fmt == "tsv":
        return read_tsv(path, list(columns or []), header)
    if fmt == "conll":
        return read_conll(path)
    if fmt == "text":
        return read_text(path, documents)
    raise UserError(f"unknown source format {fmt!r}")
