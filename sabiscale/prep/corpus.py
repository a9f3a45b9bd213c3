"""Raw data -> `Example`s: find the input files of a recipe, read them, apply the task templates.

Two ways to name inputs (data.source):
- a directory in the task layout (<root>/<task>/<lang>.jsonl; `jsonl`, and the generated `demo`):
      translation/eng-<lang>.jsonl   <task>/<lang>.jsonl
  descramble, langid and diacritize are derived from text/;
- `files`: a list of files or globs, each with its task, format (jsonl, tsv, conll, text) and
  options (sabiscale/prep/sources.py).

Held out by construction (SplitRule): a record whose `orig_split` is one of data.heldout_splits
(dev, test) is held out for evaluation and never reaches the train or validation shards; records
without that field (plain text) are held out by a stable hash of their location (file name and
line), which does not move when other files change. The validation shards take another hash
slice of the rest. Files are read independently (in parallel with
data.prepare_workers > 1) and concatenated in a fixed order, so the result never depends on scheduling.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sabiscale.config import DataConfig, FileSource, HoldBack, RunConfig
from sabiscale.parallel import SERIAL, Workers
from sabiscale.prep.sources import read_records
from sabiscale.tasks import KNOWN_LANGUAGES, BadRecord, Example, NotApplicable, TaskDef, render, special_tokens, task_registry

# Layout tasks that read another task's folder; every other task reads <root>/<task>/.
_DERIVED_FROM_TEXT = {"descramble", "langid", "diacritize"}


SPLIT_FIELD = "orig_split"
SPLIT_RULE_VERSION = 2  # 1 (no version recorded): every record hashed to train/val, dev included


@dataclass(frozen=True)
class SplitRule:
    """Where a record goes: "train", "val" (validation shards) or "heldout" (evaluation only)."""

    heldout_splits: tuple[str, ...]
    val_fraction: float
    heldout_fraction: float
    hold_back: HoldBack | None = None

    @classmethod
    def of(cls, data: DataConfig) -> "SplitRule":
        return cls(tuple(data.heldout_splits), data.val_fraction, data.heldout_fraction, data.hold_back)

    def split(self, record: dict, where: str, task: str | None = None) -> str:
        """One of "train", "val", "heldout", or "held_back" (a training record data.hold_back
        keeps out of this data: in no shard, and not an evaluation record either)."""
        at = location_fraction(where)
        declared = record.get(SPLIT_FIELD)
        if declared is not None:
            if str(declared) in self.heldout_splits:
                return "heldout"
            return self.held_back(task, where) or ("val" if at < self.val_fraction else "train")
        if at < self.val_fraction:
            return self.held_back(task, where) or "val"
        if at < self.val_fraction + self.heldout_fraction:
            return "heldout"
        return self.held_back(task, where) or "train"

    def held_back(self, task: str | None, where: str) -> str | None:
        hold = self.hold_back
        if hold is None or task not in hold.tasks:
            return None
        # its own hash, independent of the validation and held-out slices
        in_share = location_fraction(where, salt="hold_back") < hold.share
        return "held_back" if in_share == (hold.keep == "rest") else None

    def describe(self) -> dict:
        described = {"version": SPLIT_RULE_VERSION, "field": SPLIT_FIELD, "heldout_splits": list(self.heldout_splits),
                     "val_fraction": self.val_fraction, "heldout_fraction": self.heldout_fraction,
                     "rule": f"records with {SPLIT_FIELD} in {list(self.heldout_splits)} are held out; records without "
                             f"{SPLIT_FIELD} are held out when the hash of their file name and line falls in "
                             f"[{self.val_fraction}, {self.val_fraction + self.heldout_fraction}); the hash slice "
                             f"[0, {self.val_fraction}) of the rest goes to validation"}
        if self.hold_back is not None:
            hold = self.hold_back
            described["hold_back"] = hold.model_dump(mode="json")
            kept = "outside" if hold.keep == "rest" else "inside"
            described["rule"] += (f"; of the training and validation records of {hold.tasks}, only those whose salted "
                                  f"location hash falls {kept} [0, {hold.share}) are kept (the others are held back)")
        return described


def location_fraction(where: str, salt: str = "") -> float:
    """A stable number in [0, 1) for a record's location (file name and line, not the directory);
    another salt gives an independent number."""
    digest = hashlib.sha256((salt + where.split("/")[-1]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class FileResult:
    examples: list[tuple[Example, str]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"where", "task", "reason"} per skipped bad record
    not_applicable: int = 0


@dataclass
class Corpus:
    examples: list[tuple[Example, str]]  # (example, "file:line"), in a fixed order
    skipped: list[dict]
    not_applicable: dict[str, int]       # task -> records the task had nothing to learn from
    specials: list[str]                  # the tokenizer's special tokens (in user text: encoded as text)
    files: list[FileSource]              # the input files read, in order


def _layout_files(root: Path, task: str, languages: list[str] | None) -> list[FileSource]:
    folder = "text" if task in _DERIVED_FROM_TEXT else task
    files = sorted((root / folder).glob("*.jsonl"))
    if not files:
        raise BadRecord(f"task {task!r}: no files found under {root / folder} (the layout is <root>/{folder}/<lang>.jsonl; "
                        "for other layouts or formats use data.source=files)")
    pairs = [(f, f.stem.split("-", 1)[1] if task == "translation" and "-" in f.stem else f.stem) for f in files]
    return [FileSource(task=task, path=str(f), lang=lang) for f, lang in pairs if languages is None or lang in languages]


def _listed_files(data: DataConfig) -> list[FileSource]:
    out = []
    for index, src in enumerate(data.files):
        if src.task not in data.tasks:
            continue
        paths = sorted(glob.glob(src.path, recursive=True)) if glob.has_magic(src.path) else [src.path]
        if src.format == "hf" and not glob.has_magic(src.path):  # a saved dataset directory or a dataset name
            paths = [src.path]
        elif not paths or not Path(paths[0]).is_file():
            raise BadRecord(f"data.files[{index}].path {src.path!r} matches no file (relative paths are from the working "
                            f"directory, {Path.cwd()})")
        if src.lang is not None and data.languages is not None and src.lang not in data.languages:
            continue
        out += [src.model_copy(update={"path": p}) for p in paths]
    return out


def source_files(data: DataConfig, root: Path | None) -> list[FileSource]:
    """Every input file of the recipe's tasks, in the order they are read."""
    if data.source == "files":
        return _listed_files(data)
    if root is None or not root.is_dir():
        raise BadRecord(f"data root {root} is not a directory (expected the task layout: <root>/<task>/<lang>.jsonl, translation/eng-<lang>.jsonl)")
    return [f for task in data.tasks for f in _layout_files(root, task, data.languages)]


def declared_languages(data: DataConfig, files: list[FileSource]) -> list[str]:
    """Languages known before reading: their tags are special tokens (in user text: plain text)."""
    return sorted(set(KNOWN_LANGUAGES) | set(data.languages or []) | {f.lang for f in files if f.lang})


def reserved_tokens(data: DataConfig, files: list[FileSource]) -> list[str]:
    registry = task_registry(data.task_defs)
    return special_tokens(declared_languages(data, files), [registry[t] for t in data.tasks])


def read_file(source: FileSource, spec: TaskDef, reserved: list[str], languages: list[str], seed: int,
              rule: SplitRule, max_records: int | None = None, splits: frozenset[str] | None = None,
              skip_bad: bool = False, wanted: list[str] | None = None) -> FileResult:
    """One file's examples, each marked with its split; a bad record raises BadRecord, or with
    skip_bad is listed in `skipped`. `max_records` counts the records of `splits` (None: all)."""
    result = FileResult()
    count = 0
    records = read_records(Path(source.path), source.format, dict(source.fields), list(source.columns), source.header,
                           source.documents, dict(source.hf_args))
    for record, where in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            split = rule.split(record, where, source.task)
            if splits is not None and split not in splits:
                continue
            if source.lang is not None:
                record.setdefault(spec.lang_field, source.lang)
            lang = record.get(spec.lang_field)
            if wanted is not None and lang not in wanted:
                continue
            if isinstance(lang, str) and lang not in languages:
                raise BadRecord(f"{where}: language {lang!r} (field {spec.lang_field!r}) is not declared; add it to "
                                "data.languages (its tag becomes a special token) or set `lang` for this source")
            example = render(source.task, spec, record, where, reserved, seed)
            result.examples.append((dataclasses.replace(example, split=split), where))
        except NotApplicable:
            result.not_applicable += 1
        except BadRecord as err:
            if not skip_bad:
                raise
            result.skipped.append({"where": where, "task": source.task, "reason": str(err).removeprefix(f"{where}: ")})
        count += 1
        if max_records is not None and count >= max_records:
            break
    return result


def evenly_spaced(items: list, k: int | None) -> list:
    """At most `k` items spread over the whole list, from its first on. Data files are often
    ordered (by label, source, length: the first 100 dev records of sentiment/pcm.jsonl are all
    negative), so a file's head is no sample of it."""
    if k is None or len(items) <= k:
        return items
    return [items[i * len(items) // k] for i in range(k)]


def load_corpus(cfg: RunConfig, root: Path | None, splits: set[str] | None = None,
                max_records: int | None = None, workers: Workers = SERIAL, spread: bool = False) -> Corpus:
    """Every example of the recipe's inputs (under `root` for the directory layouts), of `splits`
    ("train", "val", "heldout"; None: all). With `spread`, `max_records` per file are taken evenly
    over each file (evaluation) instead of from its head (which reads no further: preparing a
    quick subset)."""
    data = cfg.data
    files = source_files(data, root)
    if not files:
        raise BadRecord(f"no input files for tasks {data.tasks} and languages {data.languages}")
    reserved = reserved_tokens(data, files)
    languages = declared_languages(data, files)
    registry = task_registry(data.task_defs)
    readers = {task: partial(read_file, spec=registry[task], reserved=reserved, languages=languages, seed=cfg.seed,
                             rule=SplitRule.of(data), max_records=None if spread else
                             max_records if max_records is not None else data.max_records_per_file,
                             splits=frozenset(splits) if splits is not None else None, skip_bad=data.skip_bad,
                             wanted=data.languages) for task in data.tasks}
    results = workers.map(_read_one, [(readers[f.task], f) for f in files])
    if spread:
        for result in results:
            result.examples = evenly_spaced(result.examples, max_records)
    examples, skipped, not_applicable = [], [], {}
    for source, result in zip(files, results):
        examples += result.examples
        skipped += result.skipped
        if result.not_applicable:
            not_applicable[source.task] = not_applicable.get(source.task, 0) + result.not_applicable
    return Corpus(examples, skipped, not_applicable, reserved, files)


def _read_one(job: tuple[Callable[[FileSource], FileResult], FileSource]) -> FileResult:
    reader, source = job
    return reader(source)
