"""The embedded demo corpus: a deterministic generator of small multi-task, multilingual data.

Nothing here is real language. English-like sentences are built from a small grammar, and three
invented languages are derived from them by a seeded word mapping with their own word order:

- `yor`: Yorùbá-style orthography with tonal diacritics and under-dots (stored NFC),
- `hau`: Hausa-style, adjectives after the noun,
- `ibo`: Igbo-style, adjectives after the noun and a sentence-final particle.

The files are written in the task layout (translation/eng-<lang>.jsonl,
ner/<lang>.jsonl, sentiment/<lang>.jsonl, text/<lang>.jsonl), so the demo goes through exactly
the same reading, templating and tokenization as real data. Descrambling is derived from text/.
"""
from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

DEMO_LANGUAGES = ["yor", "hau", "ibo"]

_NAMES = ["Ada", "Bola", "Chidi", "Dayo", "Emeka", "Funmi", "Garba", "Halima", "Ifeoma", "Jide",
          "Kemi", "Lami", "Musa", "Ngozi", "Olu", "Sade", "Tunde", "Uche", "Yusuf", "Zainab"]
_SURNAMES = ["Okafor", "Adeyemi", "Bello", "Eze", "Ogun", "Sani"]
_PLACES = ["Lagos", "Kano", "Enugu", "Ibadan", "Abuja", "Jos", "Owerri", "Zaria"]
_ORGS = ["Unity Bank", "Sunrise Radio", "Delta Farms", "Star Clinic"]
_NOUNS = ["book", "market", "river", "house", "song", "road", "farm", "school", "child", "teacher",
          "goat", "phone", "letter", "bread", "story", "bus"]
_VERBS = ["sees", "buys", "likes", "finds", "builds", "sells", "reads", "carries", "visits", "cleans"]
_ADJECTIVES = ["big", "small", "new", "old", "red", "long", "quiet", "busy"]
_SENTIMENT = {"positive": ["good", "wonderful", "sweet", "excellent"],
              "negative": ["bad", "terrible", "broken", "awful"],
              "neutral": ["ordinary", "normal", "usual", "average"]}
_FUNCTION = ["the", "in", "says", "is", "and", "at", "works", "today"]

_SYLLABLES = {
    "yor": ["bá", "bà", "ṣẹ", "ọ́", "ẹ̀", "kò", "ló", "mọ̀", "dé", "gbà", "rí", "wọ́", "fẹ́", "ní", "jẹ", "tọ̀", "ọ̀", "ṣé"],
    "hau": ["ka", "zu", "ma", "ts'a", "gi", "da", "ku", "ra", "wa", "sa", "yi", "ba", "fa", "ɗa"],
    "ibo": ["nwa", "ụ", "ọ", "chi", "ke", "bụ", "ri", "gba", "na", "ọn", "ji", "kwụ", "ya", "mba"],
}
_FINAL_PARTICLE = {"ibo": "o"}


def _invent_lexicon(lang: str) -> dict[str, str]:
    """A fixed, collision-free mapping from every English content and function word to a new word."""
    rng = random.Random(f"lexicon-{lang}")
    words = _NOUNS + _VERBS + _ADJECTIVES + _FUNCTION + [w for ws in _SENTIMENT.values() for w in ws]
    lexicon: dict[str, str] = {}
    used: set[str] = set()
    for word in words:
        while True:
            made = "".join(rng.choice(_SYLLABLES[lang]) for _ in range(rng.randint(1, 3)))
            made = unicodedata.normalize("NFC", made)
            if made not in used:
                used.add(made)
                lexicon[word] = made
                break
    return lexicon


class _Sentence:
    """A sentence as (word, tag) pairs; tags are IOB2 entity tags, proper names are kept verbatim."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def person(self) -> list[tuple[str, str]]:
        words = [self.rng.choice(_NAMES)] + ([self.rng.choice(_SURNAMES)] if self.rng.random() < 0.4 else [])
        return [(w, "B-PER" if i == 0 else "I-PER") for i, w in enumerate(words)]

    def place(self) -> list[tuple[str, str]]:
        return [(self.rng.choice(_PLACES), "B-LOC")]

    def org(self) -> list[tuple[str, str]]:
        words = self.rng.choice(_ORGS).split()
        return [(w, "B-ORG" if i == 0 else "I-ORG") for i, w in enumerate(words)]

    def action(self) -> list[tuple[str, str]]:
        noun_phrase = [("the", "O"), (self.rng.choice(_ADJECTIVES), "ADJ"), (self.rng.choice(_NOUNS), "O")]
        where = self.place() if self.rng.random() < 0.7 else self.org()
        return [*self.person(), (self.rng.choice(_VERBS), "O"), *noun_phrase, ("in", "O"), *where]

    def opinion(self, label: str) -> list[tuple[str, str]]:
        return [*self.person(), ("says", "O"), ("the", "O"), (self.rng.choice(_NOUNS), "O"),
                ("is", "O"), (self.rng.choice(_SENTIMENT[label]), "O")]


def _render(words: list[tuple[str, str]], lang: str, lexicons: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """English (word, tag) pairs -> the target language: map words, reorder adjectives, add particles."""
    if lang == "eng":
        return [(w, "O" if t == "ADJ" else t) for w, t in words]
    out: list[tuple[str, str]] = []
    for i, (word, tag) in enumerate(words):
        if tag == "ADJ" and lang in ("hau", "ibo"):
            continue  # placed after its noun below
        out.append((lexicons[lang].get(word, word), "O" if tag == "ADJ" else tag))
        if lang in ("hau", "ibo") and i > 0 and words[i - 1][1] == "ADJ":
            out.append((lexicons[lang][words[i - 1][0]], "O"))
    if lang in _FINAL_PARTICLE:
        out.append((_FINAL_PARTICLE[lang], "O"))
    return out


def _text(pairs: list[tuple[str, str]]) -> str:
    return unicodedata.normalize("NFC", " ".join(w for w, _ in pairs))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def generate_demo_corpus(root: Path, examples_per_task: int, seed: int) -> Path:
    """Write the demo corpus under `root` and return it; the same seed gives identical files."""
    rng = random.Random(seed)
    lexicons = {lang: _invent_lexicon(lang) for lang in DEMO_LANGUAGES}
    gen = _Sentence(rng)
    per_lang = max(1, examples_per_task // len(DEMO_LANGUAGES))
    for lang in DEMO_LANGUAGES:
        translation, ner, sentiment, text = [], [], [], []
        for i in range(per_lang):
            english = gen.action()
            translation.append({"id": f"demo-eng-{lang}-{i}", "src_lang": "eng", "tgt_lang": lang,
                                "src": _text(_render(english, "eng", lexicons)),
                                "tgt": _text(_render(english, lang, lexicons))})
            tagged = _render(gen.action(), lang, lexicons)
            ner.append({"id": f"demo-ner-{lang}-{i}", "lang": lang, "tokens": [w for w, _ in tagged],
                        "tags": [t for _, t in tagged]})
            label = rng.choice(sorted(_SENTIMENT))
            sentiment.append({"id": f"demo-sent-{lang}-{i}", "lang": lang, "label": label,
                              "text": _text(_render(gen.opinion(label), lang, lexicons))})
            sentences = [_text(_render(gen.action(), lang, lexicons)) for _ in range(rng.randint(1, 2))]
            text.append({"id": f"demo-text-{lang}-{i}", "lang": lang, "text": " . ".join(sentences)})
        _write_jsonl(root / "translation" / f"eng-{lang}.jsonl", translation)
        _write_jsonl(root / "ner" / f"{lang}.jsonl", ner)
        _write_jsonl(root / "sentiment" / f"{lang}.jsonl", sentiment)
        _write_jsonl(root / "text" / f"{lang}.jsonl", text)
    return root
