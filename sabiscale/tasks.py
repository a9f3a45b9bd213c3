"""Task templates in the SabiYarn style: the only module that knows the tag format.

A task tag opens the prompt, a second tag closes it, and the answer follows and ends with the
end-of-text token:

    <translate> {src} <yor> {tgt}<|endoftext|>
    <classify> {text} <sentiment> : {label}<|endoftext|>
    <NER> {tokens} <tag> : {tags}<|endoftext|>
    <descramble> {shuffled words} <sentence> {original}<|endoftext|>
    <yor> {plain text}<|endoftext|>

Each `Example` carries its prompt and answer as separate strings, so which characters are prompt
and which are answer is known from construction: the loss mask is never re-derived later by
scanning for tags (scanning leaked across packed documents in SabiYarn's code).
"""
from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TASK_TAGS = ["<translate>", "<classify>", "<sentiment>", "<NER>", "<tag>", "<descramble>", "<sentence>"]
KNOWN_LANGUAGES = ["eng", "yor", "hau", "ibo", "pcm"]


def language_tag(lang: str) -> str:
    return f"<{lang}>"


def special_tokens(languages: list[str]) -> list[str]:
    """Every string the tokenizer must keep whole: EOS and padding first, then task and language tags."""
    langs = sorted(set(KNOWN_LANGUAGES) | set(languages))
    return [EOS, PAD, *TASK_TAGS, *(language_tag(lang) for lang in langs)]


@dataclass(frozen=True)
class Example:
    """One document: `prompt` is context only; `answer` (EOS appended at tokenization) is supervised."""

    task: str
    lang: str
    prompt: str
    answer: str
    source: str  # where it came from, e.g. "ner/yor.jsonl:12", for error messages and reports


class BadRecord(ValueError):
    """A record that cannot become an example; the message names its location and what to fix."""


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _check_text(value: object, field: str, source: str, reserved: list[str]) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{source}: field {field!r} must be a string, got {type(value).__name__}")
    text = nfc(value).strip()
    if not text:
        raise BadRecord(f"{source}: field {field!r} is empty")
    for tag in reserved:
        if tag in text:
            raise BadRecord(
                f"{source}: field {field!r} contains {tag!r}, which is a special token; "
                "remove or escape it in the data"
            )
    return text


def _require(record: dict, fields: list[str], source: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise BadRecord(f"{source}: missing field(s) {missing}; present: {sorted(record)}")


def translation(record: dict, source: str, reserved: list[str]) -> Example:
    _require(record, ["src", "tgt", "tgt_lang"], source)
    src = _check_text(record["src"], "src", source, reserved)
    tgt = _check_text(record["tgt"], "tgt", source, reserved)
    lang = record["tgt_lang"]
    return Example("translation", lang, f"<translate> {src} {language_tag(lang)}", f" {tgt}", source)


def sentiment(record: dict, source: str, reserved: list[str]) -> Example:
    _require(record, ["text", "label", "lang"], source)
    text = _check_text(record["text"], "text", source, reserved)
    label = _check_text(record["label"], "label", source, reserved)
    return Example("sentiment", record["lang"], f"<classify> {text} <sentiment> :", f" {label}", source)


def ner(record: dict, source: str, reserved: list[str]) -> Example:
    _require(record, ["tokens", "tags", "lang"], source)
    tokens, tags = record["tokens"], record["tags"]
    if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
        raise BadRecord(f"{source}: 'tokens' and 'tags' must be lists of the same length")
    if not tokens:
        raise BadRecord(f"{source}: 'tokens' is empty")
    words = " ".join(_check_text(t, "tokens", source, reserved) for t in tokens)
    labels = " ".join(_check_text(t, "tags", source, reserved) for t in tags)
    return Example("ner", record["lang"], f"<NER> {words} <tag> :", f" {labels}", source)


def descramble(record: dict, source: str, reserved: list[str], rng: random.Random) -> Example:
    """Shuffled words of a sentence -> the sentence (SabiYarn's masked-loss experiment task)."""
    _require(record, ["text", "lang"], source)
    text = _check_text(record["text"], "text", source, reserved)
    words = text.split()
    shuffled = words[:]
    rng.shuffle(shuffled)
    return Example(
        "descramble", record["lang"], f"<descramble> {' '.join(shuffled)} <sentence>", f" {text}", source
    )


def plain_text(record: dict, source: str, reserved: list[str]) -> Example:
    _require(record, ["text", "lang"], source)
    text = _check_text(record["text"], "text", source, reserved)
    return Example("text", record["lang"], language_tag(record["lang"]), f" {text}", source)
