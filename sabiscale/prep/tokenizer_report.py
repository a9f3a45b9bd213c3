"""`sabiscale tokenizer report`: how well a tokenizer fits each language.

Per language, over the answer text of every example (the part in that example's language; for
translation the target side):
- fertility: tokens per whitespace-separated word (lower is better; ~1.3-1.6 is typical of
  English-centric tokenizers on English),
- bytes per token: UTF-8 bytes per token (higher means more text per step of compute),
- byte-fallback share: tokens that are a lone byte of a multi-byte character, i.e. the byte-level
  BPE found no merge for that character (a tonal mark split off its vowel shows up here); a
  byte-level BPE has no unknown token, so this is its "unknown" rate.
"""
from __future__ import annotations

from collections import defaultdict

from sabiscale.tasks import Example


def _lone_byte_tokens(tok) -> set[int]:
    """Ids of tokens whose bytes are not valid UTF-8 on their own: the byte-level decoder turns
    them into U+FFFD."""
    decoder = tok.backend_tokenizer.decoder
    specials = set(tok.all_special_tokens)
    return {index for token, index in tok.get_vocab().items()
            if token not in specials and "\ufffd" in decoder.decode([token])}


def tokenizer_report(tok, examples: list[Example]) -> dict[str, dict[str, float]]:
    lone = _lone_byte_tokens(tok)
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # words, bytes, tokens, lone-byte tokens
    texts = [(e.lang, e.answer.strip()) for e in examples]
    encoded = tok.backend_tokenizer.encode_batch([t for _, t in texts], add_special_tokens=False)
    for (lang, text), enc in zip(texts, encoded):
        entry = totals[lang]
        entry[0] += len(text.split())
        entry[1] += len(text.encode("utf-8"))
        entry[2] += len(enc.ids)
        entry[3] += sum(i in lone for i in enc.ids)
    return {lang: {"words": w, "tokens": t, "fertility": t / max(w, 1), "bytes_per_token": b / max(t, 1),
                   "byte_fallback_share": f / max(t, 1)} for lang, (w, b, t, f) in sorted(totals.items())}


def format_tokenizer_report(report: dict[str, dict[str, float]]) -> str:
    lines = ["| language | words | tokens | fertility (tokens/word) | bytes/token | byte-fallback share |",
             "|---|---:|---:|---:|---:|---:|"]
    for lang, m in report.items():
        lines.append(f"| {lang} | {m['words']} | {m['tokens']} | {m['fertility']:.2f} | {m['bytes_per_token']:.2f} "
                     f"| {m['byte_fallback_share']:.2%} |")
    return "\n".join(lines)


UNITS = ("tokens", "bytes", "words")


def unit_shares(tok, examples: list[Example], temperature: float, language_weights: dict[str, float]) -> dict:
    """Per language and mixing unit (data.mix.unit): its natural share of the corpus counted in
    that unit, and the share temperature sampling would give it. Whole examples (prompt and
    answer), as the mix counts them."""
    sizes: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(UNITS, 0))
    texts = [e.prompt + e.answer for e in examples]
    for e, text, enc in zip(examples, texts, tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)):
        sizes[e.lang]["tokens"] += len(enc.ids)
        sizes[e.lang]["bytes"] += len(text.encode("utf-8"))
        sizes[e.lang]["words"] += len(text.split())
    out: dict[str, dict[str, float]] = {lang: {} for lang in sorted(sizes)}
    for unit in UNITS:
        total = sum(s[unit] for s in sizes.values()) or 1
        natural = {lang: s[unit] / total for lang, s in sizes.items()}
        score = {lang: share ** (1 / temperature) * language_weights.get(lang, 1.0) for lang, share in natural.items()}
        norm = sum(score.values()) or 1
        for lang in natural:
            out[lang][f"natural_{unit}"] = natural[lang]
            out[lang][f"mixed_{unit}"] = score[lang] / norm
    return out


def format_unit_shares(shares: dict, temperature: float) -> str:
    lines = [f"Share of each language by data.mix.unit (natural -> after temperature {temperature:g}):", "",
             "| language | " + " | ".join(UNITS) + " |", "|---|" + "---:|" * len(UNITS)]
    for lang, s in shares.items():
        lines.append(f"| {lang} | " + " | ".join(f"{s[f'natural_{u}']:.1%} -> {s[f'mixed_{u}']:.1%}" for u in UNITS) + " |")
    return "\n".join(lines)
