"""The task registry: the only module that knows how a record becomes a SabiYarn-style document.

A task is declared, not coded: a prompt template, an answer template and the record fields they
read. The built-in tasks below are declared exactly as a user declares a new one in a recipe:

    data:
      task_defs:
        headline:
          prompt: "<headline> {text} <title>"
          answer: " {title}"
          fields: [text, title]

A task tag opens the prompt, a second tag closes it, and the answer follows and ends with the
end-of-text token (`{lang_tag}` is the record's language tag, e.g. `<yor>`):

    <translate> {src} <yor> {tgt}<|endoftext|>
    <classify> {text} <sentiment> : {label}<|endoftext|>
    <NER> {tokens} <tag> : {tags}<|endoftext|>
    <descramble> {shuffled words} <sentence> {original}<|endoftext|>
    <yor> {plain text}<|endoftext|>

Every `<tag>` written in a template becomes a special token of the tokenizer; the same characters
in user text (web text has them) are kept and encoded as text, never as the tag's id
(`Example.prompt_literals`, `prep/tokenizer.py::encode_with_literals`). Each `Example` carries its prompt and
answer as separate strings, so which characters are prompt and which are answer is known from
construction: the loss mask is never re-derived later by scanning for tags (scanning leaked across
packed documents in SabiYarn's code).
"""
from __future__ import annotations

import random
import re
import string
import unicodedata
from dataclasses import dataclass

from sabiscale.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, model_validator

EOS = "<|endoftext|>"
PAD = "<|pad|>"
KNOWN_LANGUAGES = ["eng", "yor", "hau", "ibo", "pcm"]

_TAG = re.compile(r"<[A-Za-z][\w-]*>")
_DERIVE = re.compile(r"^(\w+)\((\w+)\)$")
# Placeholders every template may use besides its fields.
_IMPLICIT = {"lang", "lang_tag"}


class BadRecord(UserError):
    """A record that cannot become an example; the message names its location and what to fix."""


def language_tag(lang: str) -> str:
    return f"<{lang}>"


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def strip_diacritics(text: str, rng: random.Random) -> str:
    """Tone marks and under-dots removed (the input of diacritic restoration): NFD, drop the
    combining marks, NFC again."""
    decomposed = unicodedata.normalize("NFD", text)
    return nfc("".join(c for c in decomposed if unicodedata.category(c) != "Mn"))


# Functions a task may apply to one of its fields to derive a new one: `derive: {x: fn(field)}`.
DERIVERS = {"shuffle_words": shuffle_words, "strip_diacritics": strip_diacritics}


class TaskDef(BaseModel):
    """One task: how a record's fields become a prompt and an answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str                  # context only, never supervised
    answer: str                  # supervised (EOS is appended at tokenization)
    fields: list[str] = Field(min_length=1)  # record fields read; each must be present and non-empty
    lang_field: str = "lang"     # the record field holding the document's language
    derive: dict[str, str] = {}  # new placeholder -> "function(field)", functions in DERIVERS
    aligned: list[str] = []      # list fields that must have the same length (tokens and tags)
    # Two placeholders that must differ, else the record teaches nothing (stripping diacritics
    # from text that has none) and is skipped; such records are counted in the manifest.
    skip_if_same: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> "TaskDef":
        known = set(self.fields) | set(self.derive) | _IMPLICIT
        used = placeholders(self.prompt) | placeholders(self.answer)
        if used - known:
            raise ValueError(f"template placeholder(s) {sorted(used - known)} are not fields {self.fields}, "
                             f"derived {sorted(self.derive)} or {sorted(_IMPLICIT)}")
        if not placeholders(self.answer):
            raise ValueError(f"answer template {self.answer!r} uses no placeholder: the answer would be the same "
                             "for every record")
        for name, expr in self.derive.items():
            match = _DERIVE.match(expr.replace(" ", ""))
            if not match or match[1] not in DERIVERS or match[2] not in self.fields:
                raise ValueError(f"derive {name}: {expr!r} must be function(field) with a function of "
                                 f"{sorted(DERIVERS)} and a field of {self.fields}")
        for group, names in (("aligned", self.aligned), ("skip_if_same", self.skip_if_same)):
            if set(names) - known:
                raise ValueError(f"{group} names {sorted(set(names) - known)}, which are not fields or derived")
        if self.skip_if_same and len(self.skip_if_same) != 2:
            raise ValueError("skip_if_same needs exactly two placeholders")
        return self

    def tags(self) -> list[str]:
        """The literal task tags of the templates, in order of appearance."""
        return list(dict.fromkeys(_TAG.findall(self.prompt + " " + self.answer)))


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


BUILTIN_TASKS: dict[str, TaskDef] = {
    "translation": TaskDef(prompt="<translate> {src} {lang_tag}", answer=" {tgt}", fields=["src", "tgt"],
                           lang_field="tgt_lang"),
    "sentiment": TaskDef(prompt="<classify> {text} <sentiment> :", answer=" {label}", fields=["text", "label"]),
    "ner": TaskDef(prompt="<NER> {tokens} <tag> :", answer=" {tags}", fields=["tokens", "tags"],
                   aligned=["tokens", "tags"]),
    # SabiYarn's masked-loss experiment task: shuffled words -> the sentence.
    "descramble": TaskDef(prompt="<descramble> {shuffled} <sentence>", answer=" {text}", fields=["text"],
                          derive={"shuffled": "shuffle_words(text)"}),
    "text": TaskDef(prompt="{lang_tag}", answer=" {text}", fields=["text"]),
    "langid": TaskDef(prompt="<langid> {text} <language> :", answer=" {lang}", fields=["text"]),
    # Diacritic restoration (Yoruba and Igbo tone marks, under-dots): bare text -> the written text.
    "diacritize": TaskDef(prompt="<diacritize> {bare} <clean>", answer=" {text}", fields=["text"],
                          derive={"bare": "strip_diacritics(text)"}, skip_if_same=["bare", "text"]),
    "summarize": TaskDef(prompt="<summarize> {text} <summary>", answer=" {summary}", fields=["text", "summary"]),
    "headline": TaskDef(prompt="<headline> {text} <title>", answer=" {title}", fields=["text", "title"]),
    "qa": TaskDef(prompt="<context> {context} <question> {question} <answer>", answer=" {answer}",
                  fields=["context", "question", "answer"]),
    "instruction": TaskDef(prompt="<prompt> {prompt} <response>", answer=" {response}", fields=["prompt", "response"]),
}


# One record per built-in task, for the prompt guide (`sabiscale tasks`, the README, model cards).
EXAMPLE_RECORDS: dict[str, dict] = {
    "translation": {"src": "Good morning, my friend.", "tgt": "Ẹ káàárọ̀, ọ̀rẹ́ mi.", "tgt_lang": "yor"},
    "sentiment": {"text": "I like this film well well!", "label": "positive", "lang": "pcm"},
    "ner": {"tokens": ["Shugaba", "Tinubu", "ya", "ziyarci", "Kano"], "tags": ["O", "B-PER", "O", "O", "B-LOC"],
            "lang": "hau"},
    "descramble": {"text": "Mo fẹ́ràn oúnjẹ Yorùbá", "lang": "yor"},
    "text": {"text": "Ìlú Èkó tóbi gan-an.", "lang": "yor"},
    "langid": {"text": "Kedu ka i mere?", "lang": "ibo"},
    "diacritize": {"text": "Ọjọ́ dára", "lang": "yor"},
    "summarize": {"text": "The rains came early this year, and farmers in Kaduna planted maize a month ahead of "
                          "the usual season.", "summary": "Early rains let Kaduna farmers plant maize sooner.",
                  "lang": "eng"},
    "headline": {"text": "Lagos opened a new ferry route between Ikorodu and CMS on Monday.",
                 "title": "New Ikorodu-CMS ferry route opens", "lang": "eng"},
    "qa": {"context": "Abuja became Nigeria's capital in 1991.", "question": "When did Abuja become the capital?",
           "answer": "In 1991.", "lang": "eng"},
    "instruction": {"prompt": "Greet a customer in Pidgin.", "response": "How far, wetin we fit do for you today?",
                    "lang": "pcm"},
}


def task_guide(tasks: list[str] | None = None, registry: dict[str, TaskDef] | None = None) -> str:
    """How to prompt each task, with an example rendered by the same code that writes the shards
    (markdown): what to give the model, and what it should continue with."""
    registry = registry or BUILTIN_TASKS
    lines = ["| task | template (prompt -> answer) | example prompt | expected answer |", "|---|---|---|---|"]
    for name in tasks or list(registry):
        spec, record = registry[name], EXAMPLE_RECORDS.get(name)
        example = render(name, spec, record, "example", [], 0) if record is not None else None
        cell = lambda s: f"`{s.strip()}`".replace("|", "\\|")  # noqa: E731
        lines.append(f"| {name} | {cell(spec.prompt)} -> {cell(spec.answer)} | "
                     f"{cell(example.prompt) if example else '-'} | {cell(example.answer) if example else '-'} |")
    return "\n".join(lines)


def task_registry(task_defs: dict[str, TaskDef] | None = None) -> dict[str, TaskDef]:
    """Built-in tasks, with the recipe's task_defs added (a recipe may also redefine a built-in)."""
    return {**BUILTIN_TASKS, **(task_defs or {})}


def special_tokens(languages: list[str], task_defs: list[TaskDef] | None = None) -> list[str]:
    """Every string the tokenizer must keep whole: EOS and padding first, then the tags of the tasks
    in use (all built-in ones when not given), then language tags."""
    specs = BUILTIN_TASKS.values() if task_defs is None else task_defs
    tags = list(dict.fromkeys(tag for spec in specs for tag in spec.tags()))
    langs = sorted(set(KNOWN_LANGUAGES) | set(languages))
    return [EOS, PAD, *tags, *(language_tag(lang) for lang in langs)]


@dataclass(frozen=True)
class Example:
    """One document: `prompt` is context only; `answer` (EOS appended at tokenization) is supervised."""

    task: str
    lang: str
    prompt: str
    answer: str
    source: str  # where it came from, e.g. "ner/yor.jsonl:12", for error messages and reports
    # (start, end) of tag strings inside the user's text (web text does contain "<yor>" or
    # "<translate>"): encoded as the text they are, never as the tag's special id
    prompt_literals: tuple[tuple[int, int], ...] = ()
    answer_literals: tuple[tuple[int, int], ...] = ()
    # "train", "val" or "heldout": where `prepare` sends the record (prep/corpus.py::SplitRule)
    split: str = "train"


# Placeholders whose value is a label from a small set, not free text: answers made of them are
# scored by rank classification and carry no text for the contamination check.
LABEL_PLACEHOLDERS = frozenset({"label", "tags", "lang"})


def answer_is_label(spec: "TaskDef") -> bool:
    return bool(placeholders(spec.answer)) and placeholders(spec.answer) <= LABEL_PLACEHOLDERS


class NotApplicable(Exception):
    """A well-formed record the task has nothing to learn from (see TaskDef.skip_if_same)."""


def _check_text(value: object, field: str, source: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{source}: field {field!r} must be a string, got {type(value).__name__}")
    text = nfc(value).strip()
    if not text:
        raise BadRecord(f"{source}: field {field!r} is empty")
    return text


def _field_text(record: dict, field: str, source: str, list_ok: bool) -> tuple[str, int | None]:
    """A field as text (a list of strings, for aligned fields, is joined by spaces) and, for lists,
    its length."""
    value = record[field]
    if isinstance(value, list) and not list_ok:
        raise BadRecord(f"{source}: field {field!r} is a list ({len(value)} items); this task expects a string "
                        "there (lists are for aligned fields such as NER tokens and tags)")
    if isinstance(value, list):
        if not value:
            raise BadRecord(f"{source}: field {field!r} is an empty list")
        return " ".join(_check_text(v, field, source) for v in value), len(value)
    return _check_text(value, field, source), None


# fields the template fills from the record's language, not from the user's text
SYSTEM_FIELDS = ("lang", "lang_tag")


def fill(template: str, values: dict[str, str], reserved: list[str]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """template.format_map(values), and the spans of tag strings that came from the user's values
    (the template's own tags are tags; the same characters in user text are text)."""
    out, literals = "", []
    for text, name, spec, conversion in string.Formatter().parse(template):
        out += text
        if name is None:
            continue
        value = format(string.Formatter().convert_field(values[name], conversion), spec or "")
        if name not in SYSTEM_FIELDS:
            literals += [(len(out) + at, len(out) + at + len(tag)) for tag in reserved for at in find_all(value, tag)]
        out += value
    return out, tuple(sorted(literals))


def find_all(text: str, sub: str) -> list[int]:
    found, at = [], text.find(sub)
    while at >= 0:
        found.append(at)
        at = text.find(sub, at + len(sub))
    return found


def render(task: str, spec: TaskDef, record: dict, source: str, reserved: list[str], seed: int) -> Example:
    """A record -> an Example, or BadRecord naming `source` and what is wrong."""
    missing = [f for f in spec.fields if f not in record]
    if missing:
        raise BadRecord(f"{source}: missing field(s) {missing} for task {task!r}; present: {sorted(record)}")
    lang = record.get(spec.lang_field)
    if not isinstance(lang, str) or not lang.strip():
        raise BadRecord(f"{source}: no language: field {spec.lang_field!r} is missing or empty (or set `lang` "
                        "for this source in the recipe)")
    values, lengths = {}, {}
    for field in spec.fields:
        values[field], lengths[field] = _field_text(record, field, source, field in spec.aligned)
    if spec.aligned and len({lengths[f] for f in spec.aligned}) != 1:
        raise BadRecord(f"{source}: fields {spec.aligned} must be lists of the same length, got "
                        f"{[lengths[f] for f in spec.aligned]}")
    # Seeded per record by file name and line: the same output in any process, in any order, and
    # wherever the data directory lives.
    rng = random.Random(f"{seed}:{source.rsplit('/', 1)[-1]}")
    for name, expr in spec.derive.items():
        function, argument = _DERIVE.match(expr.replace(" ", "")).groups()
        values[name] = DERIVERS[function](values[argument], rng)
    if spec.skip_if_same and values[spec.skip_if_same[0]] == values[spec.skip_if_same[1]]:
        raise NotApplicable(source)
    values.update(lang=lang, lang_tag=language_tag(lang))
    prompt, prompt_literals = fill(spec.prompt, values, reserved)
    answer, answer_literals = fill(spec.answer, values, reserved)
    return Example(task, lang, prompt, answer, source, prompt_literals, answer_literals)
