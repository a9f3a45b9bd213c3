"""Raw data -> `Example`s: read a JSONL corpus laid out like ../shared/data, apply the task templates.

Layout (see ../shared/data/README.md):
    translation/eng-<lang>.jsonl   ner/<lang>.jsonl   sentiment/<lang>.jsonl   text/<lang>.jsonl
Descrambling is derived from text/ (shuffled words -> the sentence). The train/validation split is
a stable hash of each record's location, so it does not move when other files change.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from . import tasks
from .tasks import BadRecord, Example

# task -> (directory, how the file name gives the language)
_TASK_FILES = {
    "translation": ("translation", lambda stem: stem.split("-", 1)[1] if "-" in stem else stem),
    "ner": ("ner", lambda stem: stem),
    "sentiment": ("sentiment", lambda stem: stem),
    "descramble": ("text", lambda stem: stem),
    "text": ("text", lambda stem: stem),
}


def task_files(root: Path, task: str, languages: list[str] | None) -> list[tuple[Path, str]]:
    """The (file, language) pairs a task reads, sorted so every run sees the same order."""
    if task not in _TASK_FILES:
        raise BadRecord(f"unknown task {task!r}; known tasks: {sorted(_TASK_FILES)}")
    folder, lang_of = _TASK_FILES[task]
    files = sorted((root / folder).glob("*.jsonl"))
    pairs = [(f, lang_of(f.stem)) for f in files]
    return [(f, lang) for f, lang in pairs if languages is None or lang in languages]


def read_jsonl(path: Path, max_records: int | None = None,
               keep: Callable[[dict], bool] | None = None) -> Iterator[tuple[dict, str]]:
    """Yield (record, "file:line"); a line that is not a JSON object is an error naming the line.
    `max_records` counts the records that `keep` accepts."""
    with path.open(encoding="utf-8") as f:
        count = 0
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadRecord(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
            if keep is not None and not keep(record):
                continue
            yield record, where
            count += 1
            if max_records is not None and count >= max_records:
                return


def is_validation(where: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(where.split("/")[-1].encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _template(task: str, record: dict, where: str, reserved: list[str], rng: random.Random) -> Example:
    if task == "translation":
        return tasks.translation(record, where, reserved)
    if task == "ner":
        return tasks.ner(record, where, reserved)
    if task == "sentiment":
        return tasks.sentiment(record, where, reserved)
    if task == "descramble":
        return tasks.descramble(record, where, reserved, rng)
    return tasks.plain_text(record, where, reserved)


def read_examples(
    root: Path,
    task_names: list[str],
    languages: list[str] | None,
    reserved: list[str],
    seed: int,
    max_records_per_file: int | None = None,
    keep_record: Callable[[dict], bool] | None = None,
) -> Iterator[tuple[Example, str]]:
    """Yield (example, location) for every record of every task (that `keep_record` accepts),
    in a fixed order."""
    if not root.is_dir():
        raise BadRecord(f"data root {root} is not a directory (expected the layout of ../shared/data)")
    rng = random.Random(seed)
    for task in task_names:
        pairs = task_files(root, task, languages)
        if not pairs:
            raise BadRecord(f"task {task!r}: no files found under {root / _TASK_FILES[task][0]}")
        for path, lang in pairs:
            for record, where in read_jsonl(path, max_records_per_file, keep_record):
                record.setdefault("lang", lang)
                yield _template(task, record, where, reserved, rng), where


def languages_in(root: Path, task_names: list[str], languages: list[str] | None) -> list[str]:
    found = {lang for task in task_names for _, lang in task_files(root, task, languages)}
    return sorted(found | {"eng"})


def is_dev_record(record: dict) -> bool:
    """Records of an official dev split (../shared/data keeps `orig_split`; text ids carry it)."""
    return record.get("orig_split") == "dev" or "-dev-" in str(record.get("id", ""))
