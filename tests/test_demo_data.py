import json
import unicodedata

from sabiscale.prep.demo_data import DEMO_LANGUAGES, generate_demo_corpus


def _read_all(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jsonl"))}


def test_generator_is_deterministic(tmp_path):
    a = _read_all(generate_demo_corpus(tmp_path / "a", 60, seed=7))
    b = _read_all(generate_demo_corpus(tmp_path / "b", 60, seed=7))
    c = _read_all(generate_demo_corpus(tmp_path / "c", 60, seed=8))
    assert a == b
    assert a != c


def test_layout_tasks_languages_and_nfc(tmp_path):
    root = generate_demo_corpus(tmp_path, 60, seed=1)
    files = _read_all(root)
    for lang in DEMO_LANGUAGES:
        for name in (f"translation/eng-{lang}.jsonl", f"ner/{lang}.jsonl", f"sentiment/{lang}.jsonl", f"text/{lang}.jsonl"):
            assert name in files
    yor = [json.loads(line) for line in (root / "translation/eng-yor.jsonl").read_text().splitlines()]
    text = " ".join(r["tgt"] for r in yor)
    assert unicodedata.is_normalized("NFC", text)
    # tonal diacritics survive as decomposable marks (e.g. acute, grave, dot below)
    marks = {c for ch in text for c in unicodedata.normalize("NFD", ch) if unicodedata.combining(c)}
    assert {"\u0301", "\u0300", "\u0323"} <= marks
    ner = [json.loads(line) for line in (root / "ner/hau.jsonl").read_text().splitlines()]
    assert all(len(r["tokens"]) == len(r["tags"]) for r in ner)
    assert {"B-PER", "B-LOC"} <= {t for r in ner for t in r["tags"]}
    labels = {json.loads(line)["label"] for line in (root / "sentiment/ibo.jsonl").read_text().splitlines()}
    assert labels == {"positive", "negative", "neutral"}
