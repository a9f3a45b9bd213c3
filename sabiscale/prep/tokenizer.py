"""Train and load the multilingual tokenizer: byte-level BPE (HF `tokenizers`), NFC-normalized,
with task and language tags as special tokens. Saved as a transformers tokenizer directory, so
`AutoTokenizer.from_pretrained(dir)` loads it offline.
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sabiscale.hashing import sha256_file
from sabiscale.tasks import EOS, PAD, Example
from sabiscale.errors import MissingInput, UserError


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> PreTrainedTokenizerFast:
    """Write `tokenizer.json` plus the transformers config files into `path`'s directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    hf.save_pretrained(str(path.parent))
    return hf


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    if not path.is_file():
        raise MissingInput(f"tokenizer {path} does not exist; run `sabiscale prepare` first")
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, pad_token=PAD)
    except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
        size = path.stat().st_size
        what = "is empty (0 bytes)" if size == 0 else f"is not a tokenizer.json the tokenizers library can read ({err})"
        raise UserError(f"tokenizer {path} {what}; give a tokenizer.json written by `sabiscale prepare` or by "
                        "the Hugging Face tokenizers library (a run's tokenizer/tokenizer.json)") from None


def adopt_tokenizer(source: Path, target: Path) -> None:
    """Use an existing tokenizer.json (tokenizer.path) as this run's: copied into the run, so its
    checkpoints carry it; a missing file is named."""
    if not Path(source).is_file():
        raise MissingInput(f"tokenizer.path {source} does not exist; point it at a tokenizer.json "
                                "(a run's tokenizer/tokenizer.json)")
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(source).resolve() != target.resolve():
        shutil.copyfile(source, target)


def token_byte_lengths(tok: PreTrainedTokenizerFast) -> np.ndarray:
    """(vocab,) UTF-8 bytes each token id stands for: in byte-level BPE one character of a token's
    string is one byte; tags and other added tokens stand for no text (0). The denominator of
    bits per byte, which compares models whatever their tokenizers do."""
    lengths = np.zeros(len(tok), dtype=np.int64)
    added = set(tok.get_added_vocab().values())
    for piece, token_id in tok.backend_tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id not in added and token_id < len(lengths):
            lengths[token_id] = len(piece)
    return lengths


def tokenizer_hash(path: Path) -> str:
    return sha256_file(path)


def encode_examples(tok: PreTrainedTokenizerFast, examples: list[Example]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Examples -> (token ids, loss mask) per document: prompt tokens 0, answer tokens and EOS 1.

    Prompt and answer are encoded separately, so the mask boundary is exact by construction.
    Every prompt ends with a special tag, where the tokenizer splits anyway, so this equals
    encoding the joined string.
    """
    backend = tok.backend_tokenizer
    prompts = [p.ids for p in backend.encode_batch([e.prompt for e in examples], add_special_tokens=False)]
    answers = [a.ids for a in backend.encode_batch([e.answer for e in examples], add_special_tokens=False)]
    for i, e in enumerate(examples):  # the few with tag strings in their text, again with those as text
        if e.prompt_literals:
            prompts[i] = encode_with_literals(backend, e.prompt, e.prompt_literals)
        if e.answer_literals:
            answers[i] = encode_with_literals(backend, e.answer, e.answer_literals)
    eos_id = tok.eos_token_id
    docs = []
    for p, a in zip(prompts, answers):
        ids = np.array(p + a + [eos_id], dtype=np.uint32)
        mask = np.zeros(len(ids), dtype=np.uint8)
        mask[len(p):] = 1
        docs.append((ids, mask))
    return docs


def encode_with_literals(backend: Tokenizer, text: str, literals: tuple[tuple[int, int], ...]) -> list[int]:
    """Ids of `text` where the spans in `literals` are plain text even though they spell a tag.
    The tokenizer splits its input at every tag before anything else, so encoding the pieces
    between the real tags one by one (with tag matching off) gives the same ids as encoding the
    whole string would, except that the literals stay their bytes."""
    specials = sorted((t.content for t in backend.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    inside = {at for start, end in literals for at in range(start, end)}
    ids, pos = [], 0
    for match in pattern.finditer(text):
        if match.start() in inside:
            continue
        ids += plain_ids(backend, text[pos:match.start()]) + [backend.token_to_id(match.group())]
        pos = match.end()
    return ids + plain_ids(backend, text[pos:])


def plain_ids(backend: Tokenizer, text: str) -> list[int]:
    if not text:
        return []
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False
