"""Source adapters: the formats people have -> records (dicts) with their location.

    jsonl   one JSON object per line; `fields` maps a task's field to the record's key
    tsv     tab-separated columns named by `columns` (or by a header line); parallel text
    conll   one token per line, its tag in the last column, a blank line between sentences
            (`-DOCSTART-` lines are skipped); a record is {tokens, tags}
    text    plain text: one document per line, or per blank-line separated paragraph
    parquet a Parquet file, one record per row (read in row batches, never whole)
    hf      a Hugging Face `datasets` directory (save_to_disk; memory-mapped, not loaded), or a
            dataset name for datasets.load_dataset(..., streaming=True) with `hf_args`
            (jsonl, parquet and hf map fields the same way, with `fields`)

Each adapter yields (record, location) with location "file:line" (the first line of a record;
for parquet and hf the row number, counted from 1);
a line that cannot be a record is yielded as a BadRecord in its place, so the caller decides
whether it stops the run or is skipped and reported (--skip-bad). Reading is streaming.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sabiscale.tasks import BadRecord
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
        surrogate = lone_surrogate(record)
        if surrogate is not None:
            yield BadRecord(f"{where}: {surrogate}"), where
            continue
        yield mapped(record, fields), where


def lone_surrogate(value, name: str = "") -> str | None:
    """Where a string of a JSON value holds half of a UTF-16 pair (valid JSON, e.g. "\\ud800",
    but no text: it cannot be written as UTF-8), said for the error; None when there is none."""
    if isinstance(value, str):
        at = next((i for i, c in enumerate(value) if "\ud800" <= c <= "\udfff"), None)
        if at is None:
            return None
        return (f"field {name or 'value'!r} holds a lone UTF-16 surrogate (\\u{ord(value[at]):04x}) at character "
                f"{at + 1}: a \\u escape of half a character pair, which is no text; write the character itself "
                "(or its full pair of escapes), or remove it")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item, f"{name}[{key}]" if isinstance(key, int) else (f"{name}.{key}" if name else key))
        if found is not None:
            return found
    return None


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


def mapped(record: dict, fields: dict[str, str]) -> dict:
    for field, key in fields.items():
        if key in record:
            record[field] = record[key]
    return record


def read_parquet(path: Path, fields: dict[str, str]) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("format: parquet needs pyarrow: pip install 'sabiscale[hf]'") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors name no file
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield mapped(record, fields), f"{path}:{row}"


def read_hf(path: str, fields: dict[str, str], hf_args: dict) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise UserError("format: hf needs the datasets library: pip install 'sabiscale[hf]'") from None
    if Path(path).is_dir():  # save_to_disk: arrow files, memory-mapped
        rows = datasets.load_from_disk(path)
        if isinstance(rows, datasets.DatasetDict):
            split = hf_args.get("split")
            if split not in rows:
                raise UserError(f"{path} holds the splits {sorted(rows)}: choose one with hf_args: {{split: NAME}}")
            rows = rows[split]
    else:
        try:
            rows = datasets.load_dataset(path, streaming=True, **hf_args)
        except Exception as err:  # noqa: BLE001 - offline, unknown name, bad arguments: say which
            raise UserError(f"datasets.load_dataset({path!r}, **{hf_args}) failed ({type(err).__name__}: {err}); "
                            "offline, save the dataset with save_to_disk and give its directory as path") from None
    for row, record in enumerate(rows, start=1):
        yield mapped(dict(record), fields), f"{path}:{row}"


def read_records(path: Path, fmt: str, fields: dict[str, str] | None = None, columns: list[str] | None = None,
                 header: bool = False, documents: str = "line", hf_args: dict | None = None) -> Iterator[Record]:
    if fmt == "jsonl":
        return read_jsonl(path, fields or {})
    if fmt == "parquet":
        return read_parquet(path, fields or {})
    if fmt == "hf":
        return read_hf(str(path), fields or {}, hf_args or {})
    if fmt == "tsv":
        return read_tsv(path, list(columns or []), header)
    if fmt == "conll":
        return read_conll(path)
    if fmt == "text":
        return read_text(path, documents)
    raise UserError(f"unknown source format {fmt!r}")
